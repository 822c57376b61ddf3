"""Backends: the only modules that import torch, diffusers, insightface, faiss or open_clip."""
