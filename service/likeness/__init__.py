"""Likeness: consistent Stable Diffusion characters, built, measured and served."""

__version__ = "0.1.0"
