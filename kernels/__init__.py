"""Triton kernels of dmil_fast (installed as dmil_fast.kernels). They know only tensors."""
