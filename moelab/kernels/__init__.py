"""Triton kernels only. Importing a kernel module defines (jit-compiles) its kernels, so
`moelab/__init__.py` sets TRITON_INTERPRET=1 before any of them is imported on a machine
without CUDA."""
