"""fp8 (e4m3) K/V tiles widened to bf16 inside a Triton kernel by inline PTX (NVIDIA, sm89+), for
the unified attention kernel's ``PAGED_FP8`` key mode (``attention.triton_kernels``)."""
import triton
import triton.language as tl

# 4 e4m3 bytes (one 32-bit word) -> 4 bf16: e4m3x2 -> f16x2 is one instruction, f16 -> f32 -> bf16
# is exact (every e4m3 value, subnormals too, is a normal f16 and a normal bf16). (Integer bit
# moves instead of the conversion unit measured 7-12% slower on an H200.)
_E4M3X4_TO_BF16 = tl.constexpr("""{
.reg .b16 a0, a1, x0, x1, x2, x3;
.reg .b32 h0, h1;
.reg .f32 f0, f1, f2, f3;
mov.b32 {a0, a1}, $4;
cvt.rn.f16x2.e4m3x2 h0, a0;
cvt.rn.f16x2.e4m3x2 h1, a1;
mov.b32 {x0, x1}, h0;
mov.b32 {x2, x3}, h1;
cvt.f32.f16 f0, x0;
cvt.f32.f16 f1, x1;
cvt.f32.f16 f2, x2;
cvt.f32.f16 f3, x3;
cvt.rn.bf16.f32 $0, f0;
cvt.rn.bf16.f32 $1, f1;
cvt.rn.bf16.f32 $2, f2;
cvt.rn.bf16.f32 $3, f3;
}""")


@triton.jit
def fp8_tile(words_ptrs, mask, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A ``[BLOCK_N, HEAD_DIM]`` bf16 tile of an fp8 e4m3 cache, loaded as ``[BLOCK_N, HEAD_DIM / 4]``
    32-bit words and widened in the load's own layout. (Loaded as fp8 and cast, the tile would
    travel to the dot's layout through shared memory as bytes, read back one at a time: slower
    than the bf16 cache despite half the bytes. Words, not byte pairs: Triton pipelines their
    loads through shared memory, which measured ~8% faster.)"""
    if mask is None:
        w = tl.load(words_ptrs)
    else:
        w = tl.load(words_ptrs, mask=mask, other=0)
    b0, b1, b2, b3 = tl.inline_asm_elementwise(_E4M3X4_TO_BF16, "=h,=h,=h,=h,r", [w],
                                               dtype=(tl.bfloat16,) * 4, is_pure=True, pack=1)
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BLOCK_N, HEAD_DIM))
