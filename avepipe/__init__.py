"""avepipe: reproducible audio-visual event localization pipeline (AVE, UnAV-100)."""

__version__ = "0.1.0"
