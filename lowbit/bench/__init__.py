"""Benchmarks: kernel speed (``kernels``) against cuBLAS, on the GPU; a load test of the server (``load``)."""
