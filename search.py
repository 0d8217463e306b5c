"""Pareto search over quantization configurations -> configset.json: see conf/search.yaml.

The app is ``coalora.cli.search`` (also installed as ``coalora-search``, usable from any directory).
"""

from coalora.cli.search import main

if __name__ == "__main__":
    main()
