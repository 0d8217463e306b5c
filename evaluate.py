"""Evaluate a trained run at any budget (zero-cost adaptation): see conf/evaluate.yaml.

The app is ``coalora.cli.evaluate`` (also installed as ``coalora-evaluate``, usable from any directory).
"""

from coalora.cli.evaluate import main

if __name__ == "__main__":
    main()
