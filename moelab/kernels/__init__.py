"""Triton kernels only. Importing a kernel module defines (jit-compiles) its kernels, so
`moelab/__init__.py` sets TRITON_INTERPRET=1 before any of them is imported on a machine
without CUDA."""

import os
import sys


def _interpret_triton_language() -> None:
    """Make Triton's own @jit helpers (tl.max, tl.sum, ...) runnable in the interpreter.

    Triton builds them when it is first imported. If that happened before TRITON_INTERPRET=1
    was set (importing transformers' Qwen2-MoE code before moelab does it, through torch),
    they were built for a GPU and every kernel that calls them fails on the CPU with
    "Cannot call @triton.jit'd outside of the scope of a kernel". Rebuild them interpreted.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton  # noqa: F401  (imported now with the interpreter on, if not already)
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if name.startswith("triton.language") and module is not None:
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
                    setattr(module, attr, InterpretedFunction(value.fn))


_interpret_triton_language()
