"""The Flower ServerApp side of fedpriv: configuration, the round loop, run directory and checkpoints."""
