"""Pallas kernels and their pure-JAX references (flash attention lands here)."""
