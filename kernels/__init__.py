"""Triton kernels for BLT, importable as ``bltdist.kernels``.

The PyTorch implementations in ``bltdist.model`` are the specification; kernels added here must
match them and are chosen automatically on CUDA.
"""
