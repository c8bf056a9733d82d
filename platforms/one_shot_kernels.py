"""The Triton kernel of ``platforms.symm_mem.OneShotAllReduce`` (imported only where triton is).

One launch per all-reduce, no barrier: every program pushes its slice of this rank's tensor
straight into each peer's buffer (stores through the peer's address, over NVLink), then reads
the peers' slices from its own buffer as they arrive and sums them. A slot that has not arrived
holds ``-0.0`` (the sentinel); pushed values never do (``-0.0`` is sent as ``+0.0``, which sums
the same), so arrival is seen value by value, and the reader resets each slot to the sentinel
after reading it (Lamport's one-shot scheme, as TensorRT-LLM's low-latency all-reduce).

Each program alternates between two regions of the buffer, counting its calls in device memory
(``counters``), so a CUDA graph replays it correctly. Region reuse is safe without a barrier: a
peer pushes into a region again only two calls later, which it reaches only after receiving this
rank's next call's values - pushed by a kernel that started after this one's reset had finished.
"""
from __future__ import annotations

import triton
import triton.language as tl


# One compiled kernel for every size (``n`` not specialized): loading a kernel into a context may
# wait for that context's running kernels, and one of them may be spinning here.
@triton.jit(do_not_specialize=["n"])
def one_shot_all_reduce_kernel(x_ptr, out_ptr, peers_ptr, counter_ptr, n, stride_slot,
                               RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                               SENTINEL: tl.constexpr, PDL: tl.constexpr):
    """``out = sum over ranks of x`` (in rank order, in float32): program p sums elements
    ``[p * BLOCK, (p + 1) * BLOCK)``. ``peers_ptr``: int64 base addresses of every rank's buffer of
    ``2 regions x WORLD slots x stride_slot`` elements; ``SENTINEL``: ``-0.0``'s bits as a signed
    integer of the element's width."""
    if PDL:  # the next kernel may launch now (its weight prefetch overlaps the exchange); x and
        tl.extra.cuda.gdc_launch_dependents()  # the counter are written by kernels before this one
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    count = tl.load(counter_ptr + pid)
    region = (count % 2) * WORLD
    dtype = x_ptr.dtype.element_ty
    bits = tl.int16 if dtype.primitive_bitwidth == 16 else tl.int32
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = tl.where(x == 0, 0.0, x).to(dtype)  # -0.0 would read as "not arrived"
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            dst = tl.load(peers_ptr + peer).to(tl.pointer_type(dtype))
            tl.store(dst + (region + RANK) * stride_slot + offs, x, mask=mask)
    own = tl.load(peers_ptr + RANK).to(tl.pointer_type(dtype))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        if src == RANK:
            acc += x.to(tl.float32)
        else:
            slot = own + (region + src) * stride_slot + offs
            v = tl.load(slot, mask=mask, other=0.0, volatile=True)
            while tl.sum(((v.to(bits, bitcast=True) == SENTINEL) & mask).to(tl.int32)) > 0:
                v = tl.load(slot, mask=mask, other=0.0, volatile=True)
            acc += v.to(tl.float32)
            tl.store(slot.to(tl.pointer_type(bits)), tl.full([BLOCK], SENTINEL, bits), mask=mask)
    tl.store(out_ptr + offs, acc.to(dtype), mask=mask)
    tl.store(counter_ptr + pid, count + 1)
