"""Weights fetched into L2 before the kernels that read them start.

Built in notebooks/08_cuda_graphs_and_decode_attention. At batch 1 an NF4 decode step is a chain
of small kernels that each wait on HBM latency (the norms, RoPE, attention and the router move
almost nothing; the NF4 GEMVs stream at a fifth to two fifths of the copy bandwidth): for much
of the step HBM is idle. Hopper's copy engine can fetch a byte range into L2 on its own (`cp.async.bulk.prefetch.L2`,
one instruction from one thread), so a kernel at the start of a layer can ask for the weights
that kernels later in the layer will read, and those then find them in L2 (a few hundred cycles
away instead of HBM's latency). An H100 has 50 MB of L2: a layer's NF4 o_proj and shared expert
(20 MB with their absmax) fit, its bf16 ones (78 MB) do not.

`L2Prefetch(tensors)` cuts the tensors' bytes into chunks once (a device table: nothing moves at
run time, so a CUDA graph can hold the launch), `prefetch()` launches one program per SM that
asks for its chunks and returns. A hint: the hardware may drop it, and nothing waits for it.
"""

import torch
import triton
import triton.language as tl

from .pdl import launch_args

# One thread of the program asks L2 for $2 bytes from $1 (16-byte aligned, a multiple of 16;
# 0: nothing), sm_90's bulk prefetch: the copy engine fetches them while the program goes on.
PREFETCH_L2_ASM = tl.constexpr("""{
.reg .pred p, q;
.reg .b32 t;
mov.u32 t, %tid.x;
setp.eq.u32 p, t, 0;
setp.ne.u32 q, $2, 0;
and.pred p, p, q;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}""")

CHUNK_BYTES = 1 << 17  # 128 KB a prefetch instruction: an NF4 layer's 20 MB are ~150 chunks over the SMs


@triton.jit
def prefetch_l2(base, start, end, live):
    """Prefetch bytes [start, end) after the byte pointer `base` (16-byte aligned) into L2, from one
    thread, widened to 16-byte bounds (within the allocation's 512-byte granules); nothing unless live."""
    lo = start // 16 * 16
    size = tl.where(live & (end > start), (end + 15) // 16 * 16 - lo, 0)
    tl.inline_asm_elementwise(PREFETCH_L2_ASM, "=r,l,r", [(base + lo).to(tl.int64), size.to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2_share(base, nbytes, index, shares, live):
    """Prefetch share `index` of `shares` equal shares of the nbytes after `base` (see `prefetch_l2`):
    the programs of a launch splitting one range between them."""
    share = tl.cdiv(nbytes, shares)
    prefetch_l2(base, index * share, tl.minimum((index + 1) * share, nbytes), live)


@triton.jit
def _prefetch_kernel(chunks_ptr, num_chunks, USE_PDL: tl.constexpr = False):
    """Program p asks for chunks p, p + P, ... of the table ([address, bytes] int64 rows)."""
    if USE_PDL:  # nothing here depends on the kernel before: let the next one be placed at once
        tl.extra.cuda.gdc_launch_dependents()
    for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        address = tl.load(chunks_ptr + 2 * c)
        size = tl.load(chunks_ptr + 2 * c + 1).to(tl.int32)
        tl.inline_asm_elementwise(PREFETCH_L2_ASM, "=r,l,r", [address, size], dtype=tl.int32, is_pure=False,
                                  pack=1)
    if USE_PDL:  # finish only after the kernel before: the kernel after waits on this one
        tl.extra.cuda.gdc_wait()


def chunk_spans(spans: list[tuple[int, int]], chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """(address, bytes) spans (16-byte aligned addresses) cut into (address, size) chunks of at most
    chunk_bytes, sizes rounded up to 16 bytes: one bulk prefetch each."""
    if chunk_bytes <= 0 or chunk_bytes % 16:
        raise ValueError(f"chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
    rows = []
    for address, nbytes in spans:
        if address % 16:
            raise ValueError(f"L2 prefetch needs 16-byte aligned addresses, got {address:#x}")
        nbytes = (nbytes + 15) // 16 * 16
        rows += [(address + at, min(chunk_bytes, nbytes - at)) for at in range(0, nbytes, chunk_bytes)]
    return rows


class L2Prefetch:
    """A fixed set of byte ranges (whole tensors) to fetch into L2 with one launch."""

    def __init__(self, tensors: list[torch.Tensor], chunk_bytes: int = CHUNK_BYTES):
        for t in tensors:
            if not t.is_cuda:
                raise ValueError(f"L2 prefetch is for CUDA tensors, got one on {t.device}")
        rows = chunk_spans([(t.data_ptr(), t.numel() * t.element_size()) for t in tensors], chunk_bytes)
        self.nbytes = sum(size for _, size in rows)
        device = tensors[0].device if tensors else None
        self.chunks = torch.tensor(rows, dtype=torch.int64, device=device) if rows else None
        self.programs = min(len(rows), torch.cuda.get_device_properties(device).multi_processor_count) if rows else 0
        self._keep = tensors  # the addresses stay valid as long as this object lives

    def prefetch(self) -> None:
        """Launch the prefetches (no wait, no host sync: safe inside a CUDA graph)."""
        if self.chunks is not None:  # one program per SM at most
            _prefetch_kernel[(self.programs,)](self.chunks, self.chunks.shape[0], num_warps=1,
                                               **launch_args(self.chunks))
