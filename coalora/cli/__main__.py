"""``python -m coalora.cli <stage> [overrides]``, the same as the ``coalora`` command."""

from coalora.cli import main

main()
