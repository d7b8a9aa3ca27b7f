"""Pallas kernels and their pure-JAX references (flash attention lands here)."""

from kernels_pallas.flash_attention import flash_attention, gpu_backend
from kernels_pallas.paged_attention import paged_attention
from kernels_pallas.reference import reference_attention

__all__ = ["flash_attention", "gpu_backend", "paged_attention", "reference_attention"]
