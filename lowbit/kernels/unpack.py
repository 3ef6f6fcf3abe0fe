"""Unpacking int4 nibbles in registers, four bytes per instruction sequence (Triton inline PTX).

Triton lowers elementwise ops on uint8 tensors one byte at a time (extract, widen, mask, combine).
On a 32-bit register holding four bytes the same work takes a handful of instructions for eight
nibbles, the trick Marlin's dequantization is built on (``lop3`` with a mask and a float exponent
pattern, no integer-to-float conversion):

- fp16: ``(word & 0x000F000F) | 0x64006400`` is two fp16 numbers 1024 + u;
- bf16: ``| 0x43004300`` gives two bf16 numbers 128 + u;
- int8: ``word & 0x0F0F0F0F`` is four int8 numbers u (the 8-bit MMA takes them as they are).

``tl.inline_asm_elementwise(pack=4)`` hands the assembly four consecutive uint8 elements in one
register. ``prmt`` first reorders the bytes (0, 2, 1, 3) so that each output half lines up with its
own input byte, which keeps the operation elementwise (output i depends on input byte i only), as
inline_asm_elementwise requires. Under ``TRITON_INTERPRET`` (CI) the same numbers come from plain
Triton ops (``ASM=False``).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# False in Triton's interpreter, which cannot run PTX
USE_ASM = os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True")


def _float_asm(hi: bool, pattern: int) -> str:
    s0, s1 = (4, 12) if hi else (0, 8)
    return (
        "{ .reg .b32 t, u;\n"
        "prmt.b32 t, $2, 0, 0x3120;\n"
        f"shr.b32 u, t, {s0};\n"
        f"lop3.b32 $0, u, 0x000F000F, {pattern:#x}, 0xEA;\n"
        f"shr.b32 u, t, {s1};\n"
        f"lop3.b32 $1, u, 0x000F000F, {pattern:#x}, 0xEA;\n"
        "}"
    )


# constexpr: a @triton.jit (or @gluon.jit: lowbit.kernels.mixed_wgmma) function may only read globals that are
F16_LO_ASM, F16_HI_ASM = tl.constexpr(_float_asm(False, 0x64006400)), tl.constexpr(_float_asm(True, 0x64006400))
BF16_LO_ASM, BF16_HI_ASM = tl.constexpr(_float_asm(False, 0x43004300)), tl.constexpr(_float_asm(True, 0x43004300))
I8_LO_ASM = tl.constexpr("and.b32 $0, $1, 0x0F0F0F0F;")
I8_HI_ASM = tl.constexpr("{ .reg .b32 t;\nshr.b32 t, $1, 4;\nand.b32 $0, t, 0x0F0F0F0F;\n}")


@triton.jit
def nibbles_float(b, HI: tl.constexpr, IS_FP16: tl.constexpr, ASM: tl.constexpr):
    """uint8 tensor -> BASE + (low or high nibble) as fp16 (BASE 1024) or bf16 (BASE 128), exactly."""
    # one exit: Triton checks that every `return` of a function has the same type
    if ASM:
        if IS_FP16:
            if HI:
                out = tl.inline_asm_elementwise(F16_HI_ASM, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
            else:
                out = tl.inline_asm_elementwise(F16_LO_ASM, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
        else:
            if HI:
                out = tl.inline_asm_elementwise(BF16_HI_ASM, "=r,=r,r", [b], dtype=tl.bfloat16, is_pure=True, pack=4)
            else:
                out = tl.inline_asm_elementwise(BF16_LO_ASM, "=r,=r,r", [b], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        if HI:
            u = b.to(tl.int16) >> 4
        else:
            u = b.to(tl.int16) & 0xF
        if IS_FP16:
            out = (u | 0x6400).to(tl.float16, bitcast=True)
        else:
            out = (u | 0x4300).to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def nibbles_int8(b, HI: tl.constexpr, ASM: tl.constexpr):
    """uint8 tensor -> its low or high nibble (0..15) as int8."""
    if ASM:
        if HI:
            out = tl.inline_asm_elementwise(I8_HI_ASM, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(I8_LO_ASM, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        if HI:
            out = (b >> 4).to(tl.int8)
        else:
            out = (b & 0xF).to(tl.int8)
    return out
