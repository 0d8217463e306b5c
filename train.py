"""Train an adapter on a (quantized) transformer: ``python train.py [group=option ...]``.

The app is ``coalora.cli.train`` (also installed as ``coalora-train``, usable from any directory).
"""

from coalora.cli.train import main

if __name__ == "__main__":
    main()
