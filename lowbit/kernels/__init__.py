"""GPU kernels (Triton), each with a plain-PyTorch reference in ``reference.py`` that defines its numerics.

Importing this package never touches the GPU; Triton is imported by the kernel modules only. On a
machine without CUDA the same kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported), which is how CI tests them.
"""
