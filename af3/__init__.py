"""af3: a standalone, pure-PyTorch reference implementation of Audio Flamingo 3."""

from af3.checkpoint import load

__version__ = "0.1.0"
__all__ = ["__version__", "load"]
