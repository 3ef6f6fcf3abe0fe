"""Saving and loading quantized models (lowbit's native format)."""
