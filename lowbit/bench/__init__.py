"""Benchmarks: kernel speed (``kernels``) against cuBLAS, on the GPU."""
