"""af3: a standalone, pure-PyTorch reference implementation of Audio Flamingo 3."""

from af3.bundle import load
from af3.config import AF3Config
from af3.model import AudioFlamingo3

__version__ = "0.1.0"
__all__ = ["AF3Config", "AudioFlamingo3", "__version__", "load"]
