"""Flash attention: Pallas forward and backward behind a `jax.custom_vjp`.

`flash_attention` takes the model's [batch, seq, heads, head_dim] layout, pads both sequences to whole
blocks, moves heads in front of the sequence for the kernels, and undoes both on the way out. The
kernels live in `flash_attention_kernels.py` (forward) and `flash_attention_backward.py` (dq, dk/dv);
`reference.py` is the plain-XLA path with the same semantics. Backend caveats (VMEM bound on TPU,
power-of-two blocks on Triton) are at the top of `flash_attention_kernels.py`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import flash_attention_backward, flash_attention_kernels
from kernels_pallas.flash_attention_kernels import KernelConfig

DEFAULT_BLOCK = 128
MIN_BLOCK = 16   # smallest tile Triton's dot accepts; default blocks never go below it


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg: KernelConfig):
  """Kernel layout in and out: q: [b, kvh, g, lq, d]; k, v: [b, kvh, lk, d] -> [b, kvh, g, lq, d]."""
  return flash_attention_kernels.forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
  o, lse = flash_attention_kernels.forward(q, k, v, q_seg, kv_seg, cfg)
  return o, (q, k, v, o, lse, q_seg, kv_seg)


def _flash_bwd(cfg, residuals, do):
  q, k, v, o, lse, q_seg, kv_seg = residuals
  dq, dk, dv = flash_attention_backward.backward(q, k, v, o, lse, do, q_seg, kv_seg, cfg)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_size(requested, length, name):
  """The block for a sequence of `length`: `requested` (or the default) clipped to the padded length."""
  if requested is not None and (requested <= 0 or requested % 8):
    raise ValueError(f"{name}={requested} must be a positive multiple of 8; pass e.g. 16, 64 or 128.")
  block = DEFAULT_BLOCK if requested is None else requested
  return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


def _pad_axis(x, axis, size, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _check_shapes(q, k, v, segment_ids):
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"flash_attention wants q [batch, q_len, heads, head_dim] and k, v alike "
                     f"[batch, kv_len, kv_heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q {q.shape} and k/v {k.shape} need equal batch and head_dim, and num_heads a "
                     f"multiple of num_kv_heads.")
  if segment_ids is not None and (q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]):
    raise ValueError(f"segment_ids {segment_ids.shape} must be [batch, seq_len] = {q.shape[:2]} with "
                     f"q_len == kv_len; pass segment_ids=None for cross-length attention.")


def _to_kernel_layout(q, k, v, cfg: KernelConfig):
  """[b, l, h, d] -> q: [b, kvh, g, lq_padded, d]; k, v: [b, kvh, lk_padded, d]."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q_len_padded = pl.cdiv(q_len, cfg.block_q) * cfg.block_q
  kv_len_padded = pl.cdiv(cfg.kv_len, cfg.block_k) * cfg.block_k
  q = _pad_axis(q, 1, q_len_padded).reshape(batch, q_len_padded, kv_heads, num_heads // kv_heads, head_dim)
  to_heads_first = lambda x: jnp.moveaxis(_pad_axis(x, 1, kv_len_padded), 1, 2)
  return q.transpose(0, 2, 3, 1, 4), to_heads_first(k), to_heads_first(v)


def _segments_to_kernel_layout(segment_ids, q_len_padded, kv_len_padded):
  """[b, l] -> q side [b, lq_padded, 1], kv side [b, 1, lk_padded]; padded queries match no key."""
  segment_ids = segment_ids.astype(jnp.int32)
  q_seg = _pad_axis(segment_ids, 1, q_len_padded, value=-1)
  kv_seg = _pad_axis(segment_ids, 1, kv_len_padded, value=-2)
  return q_seg[:, :, None], kv_seg[:, None, :]


def _from_kernel_layout(o, q_len):
  """[b, kvh, g, lq_padded, d] -> [b, q_len, kvh * g, d]."""
  batch, kv_heads, group, _, head_dim = o.shape
  return o.transpose(0, 3, 1, 2, 4)[:, :q_len].reshape(batch, q_len, kv_heads * group, head_dim)


def flash_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                    block_q=None, block_k=None, interpret=None):
  """Softmax attention computed block by block in Pallas, differentiable.

  q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim] with num_heads a
  multiple of num_kv_heads (query head h uses kv head h // (num_heads // num_kv_heads)).
  causal: query i sees keys j <= i + kv_len - q_len. segment_ids: [batch, seq_len] int or None
  (needs q_len == kv_len); tokens attend only within their segment. sm_scale: default 1/sqrt(head_dim).
  block_q, block_k: multiples of 8, default 128, clipped to the sequence. interpret: default Pallas
  interpret mode on the CPU backend. A query that sees no key returns zeros.
  Returns [batch, q_len, num_heads, head_dim] in q's dtype.
  """
  _check_shapes(q, k, v, segment_ids)
  q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
  cfg = KernelConfig(
      sm_scale=float(1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale),
      causal=bool(causal),
      block_q=_block_size(block_q, q_len, "block_q"),
      block_k=_block_size(block_k, kv_len, "block_k"),
      q_len=q_len,
      kv_len=kv_len,
      interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret),
  )
  q5, k4, v4 = _to_kernel_layout(q, k, v, cfg)
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg, kv_seg = _segments_to_kernel_layout(segment_ids, q5.shape[3], k4.shape[2])
  return _from_kernel_layout(_flash(q5, k4, v4, q_seg, kv_seg, cfg), q_len)
