"""Export a trained run as a PEFT LoRA adapter for one configuration: see conf/export.yaml.

The app is ``coalora.cli.export`` (also installed as ``coalora-export``, usable from any directory).
"""

from coalora.cli.export import main

if __name__ == "__main__":
    main()
