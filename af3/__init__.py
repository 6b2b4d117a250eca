"""af3: a standalone, pure-PyTorch reference implementation of Audio Flamingo 3."""

__version__ = "0.1.0"
