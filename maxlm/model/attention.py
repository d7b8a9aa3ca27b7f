"""Fused training attention: our Pallas flash kernel or cuDNN, run per shard under a mesh.

A Pallas kernel is a per-device program, so under a mesh it runs inside `shard_map` over the
batch and head axes; the plain XLA attention (`layers.causal_attention`) needs no wrapper.
"""


import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import kernels_pallas
from maxlm.model import layers
from maxlm.sharding import logical_to_spec


def _pallas(q, k, v, segment_ids=None, bidirectional_ids=None, branch_ids=None):
  return kernels_pallas.flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                        bidirectional_ids=bidirectional_ids,
                                        branch_ids=branch_ids)


def _cudnn(q, k, v, segment_ids=None, bidirectional_ids=None, branch_ids=None):
  if branch_ids is not None:
    raise ValueError("ModelConfig.attention='cudnn' does not take branch_ids (shared-prompt "
                     "preference rows); use attention='pallas' or 'xla'")
  mask = None
  if segment_ids is not None or bidirectional_ids is not None:
    ids = segment_ids if segment_ids is not None else bidirectional_ids
    mask = layers.attention_mask(jnp.broadcast_to(jnp.arange(q.shape[1]), ids.shape),
                                 jnp.arange(k.shape[1]), segment_ids, segment_ids,
                                 bidirectional_ids, bidirectional_ids)
  # Causal unless a prefix is bidirectional: with a mask too, cuDNN then skips the tiles above
  # the diagonal (H200, 4k packed: 222.8 TF/s forward against 127.3 with the mask alone).
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=bidirectional_ids is None,
                                      implementation="cudnn")


_KERNELS = {"pallas": _pallas, "cudnn": _cudnn}


def implementation_for(name: str, *, dtype, head_dim: int, seq_len: int,
                       with_branches: bool = False, backend: str | None = None) -> str:
  """`ModelConfig.attention` as run on `backend` (default: JAX's). "auto" is cuDNN on a GPU
  where cuDNN's flash attention takes the shapes (16-bit, head_dim a multiple of 8 up to 128,
  an even length), our Pallas kernel for rows with `branch_ids`, which cuDNN cannot mask, and
  plain XLA elsewhere: in float32 (cuDNN refuses it, and our GPU kernels would round to tf32),
  on a CPU (the Pallas kernel only interprets there), on TPU (no TPU has run our kernel yet).
  One H200, 1b step at 8 x 4096: cuDNN 0.691 s, Pallas 0.721 s; attention alone ~10x XLA's."""
  if name != "auto":
    return name
  on_gpu = (backend or jax.default_backend()) == "gpu"
  if not on_gpu or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  if with_branches:
    return "pallas"
  return "cudnn" if head_dim % 8 == 0 and head_dim <= 128 and seq_len % 2 == 0 else "xla"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                    implementation: str, bidirectional_ids: jax.Array | None = None,
                    branch_ids: jax.Array | None = None) -> jax.Array:
  """Causal attention within segments. q: [batch, seq, heads, head_dim]; k, v: [batch, seq,
  kv_heads, head_dim]; segment_ids, bidirectional_ids, branch_ids (see
  `layers.attention_mask`): [batch, seq] or None. Returns q's shape."""
  kernel = _KERNELS[implementation]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v, segment_ids, bidirectional_ids, branch_ids)
  mesh_shape = dict(mesh.shape)
  batch_axes = logical_to_spec(("batch",), q.shape[:1], mesh_shape)[0]
  # Heads split only where query and KV heads split alike, so each shard keeps whole groups.
  q_heads = logical_to_spec(("heads",), q.shape[2:3], mesh_shape)[0]
  kv_heads = logical_to_spec(("kv_heads",), k.shape[2:3], mesh_shape)[0]
  head_axes = q_heads if q_heads == kv_heads else None
  qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
  # The id arrays that are given go in by name; a None one is not a shard_map argument.
  ids = {name: value for name, value in (("segment_ids", segment_ids),
                                         ("bidirectional_ids", bidirectional_ids),
                                         ("branch_ids", branch_ids))
         if value is not None}
  per_shard = lambda q_, k_, v_, ids_: kernel(q_, k_, v_, **ids_)
  ids_spec = {name: PartitionSpec(batch_axes, None) for name in ids}
  specs, args = (qkv_spec,) * 3 + (ids_spec,), (q, k, v, ids)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                       check_vma=False)(*args)
