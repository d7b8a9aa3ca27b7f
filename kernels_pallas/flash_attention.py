"""Flash attention: Pallas forward and backward behind a `jax.custom_vjp`, one kernel family per backend.

`flash_attention` takes the model's [batch, seq, heads, head_dim] layout, pads both sequences to whole
blocks, moves heads in front of the sequence for the kernels (`layout.py`), and undoes both on the way
out. Which kernels run is decided when the computation is lowered (`jax.lax.platform_dependent`), so an
export or AOT compile for "cuda" or "tpu" from a CPU host gets that platform's kernels, and "cpu" the
Pallas interpreter (unless `interpret` says otherwise):
- CUDA: Mosaic GPU kernels for Hopper (sm_90a) in `flash_attention_mosaic_gpu.py` (forward) and
  `flash_attention_mosaic_gpu_backward.py` (dq, dk/dv) wherever they take the call. They do not take
  float32 (wgmma has no full-float32 mode; tf32 is not implemented here), head_dim not a multiple of 64 or
  above 256, blocks not multiples of 64, tiles beyond the SMEM of one block, or a local GPU that is not
  a Hopper (without a local GPU, as when exporting from a CPU host, Hopper is assumed); those calls, and
  only those, use the Triton kernels below (Pallas-Triton, deprecated since JAX 0.11). `gpu_backend` names the path and the reason.
- TPU (Mosaic), ROCm (Triton) and interpret mode: the generic `pl.pallas_call` kernels in
  `flash_attention_kernels.py` (forward) and `flash_attention_backward.py` (dq, dk/dv; dk/dv has a
  query-block grid axis except on Triton); their backend caveats (VMEM bound of forward and dq on TPU,
  power-of-two blocks on Triton) are at the top of `flash_attention_kernels.py`.
`reference.py` is the plain-XLA path with the same semantics. A multi-platform export that includes
"cuda" fails on the Mosaic GPU path: JAX 0.12 lowers Mosaic GPU kernels for one platform at a time.
"""

import functools
import math

import jax
from jax.experimental import pallas as pl

from kernels_pallas import (
  flash_attention_backward,
  flash_attention_kernels,
  flash_attention_mosaic_gpu,
  flash_attention_mosaic_gpu_backward,
  layout,
)
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


def _check_shapes(q, k, v, segment_ids, bidirectional_ids=None, branch_ids=None):
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"flash_attention wants q [batch, q_len, heads, head_dim] and k, v alike "
                     f"[batch, kv_len, kv_heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q {q.shape} and k/v {k.shape} need equal batch and head_dim, and num_heads a "
                     f"multiple of num_kv_heads.")
  if segment_ids is not None and (q.shape[1] != k.shape[1] or segment_ids.shape != q.shape[:2]):
    raise ValueError(f"segment_ids {segment_ids.shape} must be [batch, seq_len] = {q.shape[:2]} with "
                     f"q_len == kv_len; pass segment_ids=None for cross-length attention.")
  for name, ids in (("bidirectional_ids", bidirectional_ids), ("branch_ids", branch_ids)):
    if ids is not None and (q.shape[1] != k.shape[1] or ids.shape != q.shape[:2]):
      raise ValueError(f"{name} {ids.shape} must be [batch, seq_len] = {q.shape[:2]} with "
                       f"q_len == kv_len.")
  if bidirectional_ids is not None and branch_ids is not None:
    raise ValueError("flash_attention takes bidirectional_ids or branch_ids, not both; pass one.")


def _pallas_attention(q, k, v, segment_ids, cfg: KernelConfig):
  """The generic pallas_call kernels (interpret, TPU Mosaic, Triton) in the model layout."""
  q5, k4, v4 = layout.to_kernel_layout(q, k, v, cfg.block_q, cfg.block_k)
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg, kv_seg = layout.segments_to_kernel_layout(segment_ids, q5.shape[3], k4.shape[2],
                                                     packed=cfg.packed)
  return layout.from_kernel_layout(_flash(q5, k4, v4, q_seg, kv_seg, cfg), q.shape[1])


def gpu_backend(q, k, v, *, block_q=None, block_k=None):
  """("mosaic_gpu", None) when the Mosaic GPU kernels take this call on CUDA, else ("triton", why not).

  Arguments as for `flash_attention` (arrays or `jax.ShapeDtypeStruct`s).
  """
  blocks = flash_attention_mosaic_gpu.choose_blocks(q.shape[1], k.shape[1], q.shape[3], block_q, block_k)
  reason = (flash_attention_mosaic_gpu.unsupported_reason(q, k, v, blocks)
            or flash_attention_mosaic_gpu.device_reason())
  return ("triton", reason) if reason else ("mosaic_gpu", None)


def flash_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None,
                    block_q=None, block_k=None, interpret=None, bidirectional_ids=None,
                    branch_ids=None):
  """Softmax attention computed block by block in Pallas, differentiable.

  q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_len, num_kv_heads, head_dim] with num_heads a
  multiple of num_kv_heads (query head h uses kv head h // (num_heads // num_kv_heads)).
  causal: query i sees keys j <= i + kv_len - q_len. segment_ids: [batch, seq_len] int or None
  (needs q_len == kv_len); tokens attend only within their segment. bidirectional_ids: [batch, seq_len]
  int (< 2**16) or None: with causal, a query also sees every key of its own nonzero id (prefix-LM:
  an image's patches see each other whole); the loops then visit every key block, not only those up to
  the diagonal, and CUDA takes the Triton kernels. branch_ids: [batch, seq_len] int (< 2**16) or None:
  a query sees only keys of branch 0 or of its own branch (a preference pair's two replies after their
  shared prompt); CUDA takes the Triton kernels. Not both. sm_scale: default 1/sqrt(head_dim).
  block_q, block_k: multiples of 8, default 128, clipped to the sequence. interpret: True runs the
  Pallas interpreter, False the compiled kernels; None (default) decides at lowering, per platform:
  the interpreter for "cpu", compiled kernels elsewhere. A query that sees no key returns zeros.
  Backend (chosen at lowering): on CUDA the Mosaic GPU kernels for bfloat16/float16, head_dim a multiple
  of 64 up to 256 and blocks (if given) multiples of 64 (defaults there: 64 queries x 128 keys, 64 keys
  for head_dim > 128); every other CUDA call falls back to Triton, see `gpu_backend`. TPU Mosaic on TPU.
  Returns [batch, q_len, num_heads, head_dim] in q's dtype.
  """
  _check_shapes(q, k, v, segment_ids, bidirectional_ids, branch_ids)
  q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
  bidirectional = bool(causal) and bidirectional_ids is not None  # without causal all keys are seen
  branched = branch_ids is not None
  if bidirectional:
    segment_ids = layout.pack_ids(segment_ids, bidirectional_ids)
  if branched:
    segment_ids = layout.pack_ids(segment_ids, branch_ids)
  config = functools.partial(
      KernelConfig,
      sm_scale=float(1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale),
      causal=bool(causal),
      q_len=q_len,
      kv_len=kv_len,
      bidirectional=bidirectional,
      branches=branched,
  )
  generic_blocks = {"block_q": _block_size(block_q, q_len, "block_q"),
                    "block_k": _block_size(block_k, kv_len, "block_k")}

  def generic(interpret, triton=False):
    cfg = config(**generic_blocks, interpret=interpret, triton=triton)
    return functools.partial(_pallas_attention, cfg=cfg)

  if interpret:
    return generic(True)(q, k, v, segment_ids)
  # Decided per lowering platform, not by the host: an AOT compile for TPU from a CPU host gets Mosaic.
  branches = {"tpu": generic(False), "default": generic(False, triton=True)}
  if interpret is None:
    branches["cpu"] = generic(True)
  if not (bidirectional or branched) and gpu_backend(q, k, v, block_q=block_q,
                                                     block_k=block_k)[0] == "mosaic_gpu":
    blocks = flash_attention_mosaic_gpu.choose_blocks(q_len, kv_len, head_dim, block_q, block_k)
    branches["cuda"] = functools.partial(
        flash_attention_mosaic_gpu_backward.attention,
        cfg=config(block_q=blocks.block_q, block_k=blocks.block_k, interpret=False))
  return jax.lax.platform_dependent(q, k, v, segment_ids, **branches)
