"""Quantization algorithms, pure PyTorch and device-agnostic (they never import lowbit.kernels)."""
