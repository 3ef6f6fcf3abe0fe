"""Bit-exact numerics shared by the algorithms (``lowbit.quant``), the model's reference path and the
kernels' references: quantize / dequantize / pack, and the KV cache's quantization."""
