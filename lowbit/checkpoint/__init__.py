"""Quantized checkpoint formats on disk: lowbit's native one (native.py), and other tools' read into
lowbit's layers (compressed_tensors.py, awq.py, on translate.py) or written for them (compressed-tensors)."""
