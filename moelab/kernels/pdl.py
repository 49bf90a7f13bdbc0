"""Programmatic dependent launch (PDL): a decode kernel placed on the GPU while the one before
it finishes.

Built in notebooks/08_cuda_graphs_and_decode_attention. A CUDA graph removes the CPU's launch
cost, not the GPU's: a kernel that depends on the one before still waits for it to drain and
for its writes to be visible, and only then are its programs placed on the SMs, at every
boundary of a decode step's ~290 kernels. On Hopper (sm_90) a kernel launched with PDL
(Triton: `launch_pdl=True`) is placed early and waits in the kernel instead: `gdc_wait()`
returns once the kernel before has finished and its writes are visible. Each kernel here
calls it before its first memory access, so only the launch and the placement overlap, never
the data. `gdc_launch_dependents()` lets the next kernel be placed in turn (it waits for this
one to finish all the same): called right after the wait, the next kernel's programs sit on
the SMs beside this one's for all of its run, holding warp slots and registers a kernel that
needs every SM's room in one wave (the NF4 decode GEMVs) then lacks; called at the end of each
program's main loop (`let_next_kernel_start`) they are placed only as this kernel's programs
finish. Launchers choose (`launch_args(t, late=...)`): the experts' gate_up and the NF4 GEMVs at
the end, the rest at the start (notebook 08, section 11, has the measurements).
benchmarks/results/pdl_probe_2026-12-06_h100.json: 1.19 -> 0.84 us per dependent kernel inside
a captured graph (torch 2.11, triton 3.6).
"""

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("MOELAB_PDL", "1") != "0"  # MOELAB_PDL=0 launches without it (for comparisons)
# Where a kernel lets the next one be placed: "auto" (each launch site's choice), or "start" /
# "end" for every kernel (comparisons: MOELAB_PDL_NEXT).
NEXT_AT = os.environ.get("MOELAB_PDL_NEXT", "auto")


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def uses_pdl(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL: CUDA on sm_90 or newer, and ENABLED."""
    return ENABLED and device.type == "cuda" and _supported(device.index if device.index is not None
                                                            else torch.cuda.current_device())


def launch_args(t: torch.Tensor, late: bool = False) -> dict:
    """The keyword arguments that launch a kernel taking `USE_PDL` on t's device with PDL where
    it applies (none of them in the interpreter, which has no grid dependencies). USE_PDL is 1
    when the next kernel is placed from this one's start, 2 from the end of its main loop:
    `late` asks for the end (a launch whose next kernel's programs would take room this one
    needs), NEXT_AT "start" / "end" overrides every launch."""
    if not uses_pdl(t.device):
        return {"USE_PDL": False}
    if NEXT_AT not in ("auto", "start", "end"):
        raise ValueError(f"MOELAB_PDL_NEXT must be 'auto', 'start' or 'end', got {NEXT_AT!r}")
    at_end = NEXT_AT == "end" or (NEXT_AT == "auto" and late)
    return {"USE_PDL": 2 if at_end else 1, "launch_pdl": True}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """Call first in a kernel launched with `launch_args`: waits until the kernel before has
    finished and its writes are visible (and with USE_PDL 1 lets the next kernel be placed)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if USE_PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def let_next_kernel_start(USE_PDL: tl.constexpr):
    """Call after a kernel's main loop (USE_PDL 2): once every program has passed here, or
    finished, the next kernel's programs may be placed. Its writes still wait (the next
    kernel's `wait_for_previous_kernel` waits for this whole kernel)."""
    if USE_PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
