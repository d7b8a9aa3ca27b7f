"""Pure functions for the transformer's math, with shapes in the docstrings."""

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give a uniform softmax instead of NaN


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x: [..., embed]; scale: [embed]. Normalizes in float32, returns x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float,
         scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
  """Rotary position embedding, rotating the two halves of head_dim (Hugging Face Llama's
  `rotate_half` convention).

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] integers; `scaling`: Llama 3's
  (factor, low_freq_factor, high_freq_factor, original_max_len), or None.
  """
  inv_freq = rope_frequencies(x.shape[-1], theta, scaling)                # [head_dim/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq            # [b, s, head_dim/2]
  return _rotate_halves(x, jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :])


def rope_frequencies(head_dim: int, theta: float,
                     scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
  """The rotation frequency of each pair of head_dim: [head_dim/2] float32."""
  fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** fraction)
  return inv_freq if scaling is None else _llama3_scaled(inv_freq, *scaling)


def _llama3_scaled(inv_freq: jax.Array, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_max_len: int) -> jax.Array:
  """Llama 3.1's long-context frequencies: wavelengths shorter than original_max_len /
  high_freq_factor keep theirs, those longer than original_max_len / low_freq_factor slow by
  `factor`, and the band between blends the two linearly in original_max_len / wavelength."""
  wavelength = 2 * math.pi / inv_freq
  blend = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
  blended = (1 - blend) * inv_freq / factor + blend * inv_freq
  slowed = jnp.where(wavelength > original_max_len / low_freq_factor, inv_freq / factor, blended)
  return jnp.where(wavelength < original_max_len / high_freq_factor, inv_freq, slowed)


@jax.custom_vjp
def _rotate_halves(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """x: [..., head_dim]; sin, cos: broadcast against [..., head_dim/2].

  The gradient of a rotation is the rotation by the opposite angle: one fused pass, where
  autodiff's split halves come back as zero-padded sums.
  """
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def _rotate_halves_forward(x, sin, cos):
  return _rotate_halves(x, sin, cos), (sin, cos)


def _rotate_halves_backward(residuals, d_rotated):
  sin, cos = residuals
  return _rotate_halves(d_rotated, -sin, cos), None, None


_rotate_halves.defvjp(_rotate_halves_forward, _rotate_halves_backward)


def attention_mask(q_index: jax.Array, kv_index: jax.Array,
                   q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None,
                   q_bidirectional_ids: jax.Array | None = None,
                   kv_bidirectional_ids: jax.Array | None = None,
                   q_branch_ids: jax.Array | None = None,
                   kv_branch_ids: jax.Array | None = None) -> jax.Array:
  """Causal (and same-document) mask, with bidirectional blocks (prefix-LM) and branches.

  q_index: [batch, q_len] index of each query in the key sequence; kv_index: [kv_len].
  segment ids: [batch, q_len] / [batch, kv_len], or None for one document per row.
  bidirectional ids: alike, or None; a query also sees every key of its own nonzero id (an
  image's patches see each other whole), 0 stays causal.
  branch ids: alike, or None; a query sees a key of branch 0 (a shared prefix) or of its own
  branch only (a preference pair's two replies after their shared prompt).
  Returns bool [batch, 1, q_len, kv_len] (broadcasts over heads).
  """
  mask = kv_index[None, None, :] <= q_index[:, :, None]
  if q_bidirectional_ids is not None:
    same_block = q_bidirectional_ids[:, :, None] == kv_bidirectional_ids[:, None, :]
    mask |= same_block & (q_bidirectional_ids[:, :, None] != 0)
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if q_branch_ids is not None:
    kv_branch = kv_branch_ids[:, None, :]
    mask &= (kv_branch == 0) | (kv_branch == q_branch_ids[:, :, None])
  return mask[:, None]


def dense(x: jax.Array, kernel: jax.Array, contracting_dims: int = 1) -> jax.Array:
  """x: [..., *kernel.shape[:contracting_dims]]; returns [..., *kernel.shape[contracting_dims:]].

  One 2D matmul over all leading axes: XLA:CPU runs the weight gradient of a 3D einsum
  ("bse,bsf->ef") about 1.4x slower than the same product of flattened [tokens, embed] arrays.
  """
  in_shape, out_shape = kernel.shape[:contracting_dims], kernel.shape[contracting_dims:]
  leading = x.shape[:x.ndim - contracting_dims]
  in_size = math.prod(in_shape)
  rows, matrix = x.reshape(-1, in_size), kernel.reshape(in_size, -1)
  if _takes_split_backward(rows, matrix):
    product = _matmul_with_split_backward(rows, matrix)
  elif rows.shape[0] == 1 and rows.dtype == matrix.dtype == jnp.bfloat16:
    product = jax.lax.platform_dependent(rows, matrix, cpu=_one_row_as_two, default=jnp.matmul)
  else:
    product = rows @ matrix
  return product.reshape(*leading, *out_shape)


def _one_row_as_two(row: jax.Array, matrix: jax.Array) -> jax.Array:
  """row [1, in] @ matrix beside a zero row: one bfloat16 row XLA:CPU runs as a float32
  matrix-vector product, the whole matrix converted every call (0.81 ms for 1,024 x 4,096),
  where two rows take YNNPACK's bfloat16 kernel (0.26 ms); see WEIGHT_GRADIENT_GROUPS."""
  return (jnp.concatenate([row, jnp.zeros_like(row)]) @ matrix)[:1]


# XLA:CPU multiplies bfloat16 in YNNPACK only where the lhs contracts its last axis and the
# rhs its first; any other matmul with one contracting axis it converts to float32 and back.
# A dense layer's backward has two such: the weight gradient (both contract the tokens, the
# first axis) at 119-150 GFLOP/s on the ViT's shapes where PyTorch reaches 400, and the input
# gradient (against the kernel's last axis). Contracting an axis as two (groups, then within
# them) makes XLA lay the operand out as YNNPACK takes it, in bfloat16: 280-326 GFLOP/s on the
# weight gradient, the same sums. Other backends take autodiff's products.
WEIGHT_GRADIENT_GROUPS = 8


def _takes_split_backward(rows: jax.Array, matrix: jax.Array) -> bool:
  return (rows.dtype == matrix.dtype == jnp.bfloat16
          and rows.shape[0] % WEIGHT_GRADIENT_GROUPS == 0 and matrix.shape[1] % 2 == 0)


@jax.custom_vjp
def _matmul_with_split_backward(rows: jax.Array, matrix: jax.Array) -> jax.Array:
  """rows: [tokens, in]; matrix: [in, out]; tokens divisible by WEIGHT_GRADIENT_GROUPS, out
  by 2."""
  return rows @ matrix


def _split_matmul_forward(rows, matrix):
  return rows @ matrix, (rows, matrix)


def _split_matmul_backward(residuals, d_product):
  rows, matrix = residuals
  return jax.lax.platform_dependent(rows, matrix, d_product, cpu=_gradients_in_two_axes,
                                    default=_gradients)


def _gradients(rows, matrix, d_product):
  """(d rows, d matrix) of rows @ matrix, as autodiff computes them."""
  return d_product @ matrix.T, rows.T @ d_product


def _gradients_in_two_axes(rows, matrix, d_product):
  """`_gradients`, each contraction split in two axes (see WEIGHT_GRADIENT_GROUPS)."""
  groups, (tokens, in_size), out_size = WEIGHT_GRADIENT_GROUPS, rows.shape, matrix.shape[1]
  d_rows = jnp.einsum("thp,ihp->ti", d_product.reshape(tokens, 2, -1),
                      matrix.reshape(in_size, 2, -1))
  d_matrix = jnp.einsum("gti,gto->io", rows.reshape(groups, -1, in_size),
                        d_product.reshape(groups, -1, out_size))
  return d_rows, d_matrix


_matmul_with_split_backward.defvjp(_split_matmul_forward, _split_matmul_backward)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     query_block: int = 128,
                     bidirectional_ids: jax.Array | None = None,
                     branch_ids: jax.Array | None = None) -> jax.Array:
  """Causal attention within segments, for a whole sequence (training, no cache).

  q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids,
  bidirectional_ids, branch_ids: [batch, seq] or None (see `attention_mask`). Queries go in
  blocks of `query_block`, each against only the keys up to its end: 4 blocks skip 3/8 of the score
  matrix that the mask would discard. A bidirectional block may reach past that end, so with
  `bidirectional_ids` every query block takes every key.
  """
  index = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  mask = attention_mask(index, index[0], segment_ids, segment_ids, bidirectional_ids,
                        bidirectional_ids, branch_ids, branch_ids)
  return query_blocked_attention(q, k, v, mask, query_block,
                                 reach_past_block=bidirectional_ids is not None)


def query_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                            query_block: int, reach_past_block: bool = False) -> jax.Array:
  """Masked attention with queries in blocks of `query_block`, each against the keys up to
  its own end only (the keys past q's length come first: a context every block takes), or
  all of them with `reach_past_block`.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, keys, kv_heads, head_dim], keys >= q_len,
  the last q_len of them the queries' own; mask: bool [batch, 1, q_len, keys]. Returns q's
  shape."""
  batch, q_len, heads, head_dim = q.shape
  kv_heads, keys_before = k.shape[2], k.shape[1] - q_len
  grouped_q = (q * head_dim ** -0.5).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  grouped_q = grouped_q.transpose(0, 2, 3, 1, 4)                         # [b, kv, group, q, d]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                 # [b, kv, s, d]
  mask = mask[:, :, None]
  outputs = []
  for start in range(0, q_len, query_block):
    query_end = min(start + query_block, q_len)
    key_end = k.shape[2] if reach_past_block else keys_before + query_end
    outputs.append(_softmax_attention(grouped_q[:, :, :, start:query_end], k[:, :, :key_end],
                                      v[:, :, :key_end], mask[..., start:query_end, :key_end]))
  out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q k^T) v, heads-major, with the scale already in q.

  q: [batch, kv_heads, group, q_len, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim];
  mask: bool [batch, 1, 1, q_len, kv_len]. Returns q's shape.
  The gradient keeps only the output and each row's log-normalizer from the forward pass and
  recomputes the probabilities: no [q_len, kv_len] array is stored per layer, and the
  backward makes two passes over the scores instead of XLA's six.
  """
  return _softmax_attention_forward(q, k, v, mask)[0]


def _masked_scores(q, k, mask):
  scores = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32)
  return jnp.where(mask, scores, NEG_INF)


def _softmax_attention_forward(q, k, v, mask):
  scores = _masked_scores(q, k, mask)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  exps = jnp.exp(scores - row_max)
  row_sum = jnp.sum(exps, axis=-1, keepdims=True)
  out = jnp.einsum("bkgqs,bksd->bkgqd", exps.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / row_sum
  log_normalizer = row_max + jnp.log(row_sum)
  out = out.astype(q.dtype)
  return out, (q, k, v, mask, out, log_normalizer)


def _softmax_attention_backward(residuals, d_out):
  q, k, v, mask, out, log_normalizer = residuals
  probs = jnp.exp(_masked_scores(q, k, mask) - log_normalizer)
  d_v = jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(d_out.dtype), d_out,
                   preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out, v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs * (d_probs - row_dot)).astype(q.dtype)
  d_q = jnp.einsum("bkgqs,bksd->bkgqd", d_scores, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("bkgqs,bkgqd->bksd", d_scores, q, preferred_element_type=jnp.float32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Attention where every query sees every key, unmasked: a ViT's patches.

  q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]. Returns q's shape.
  Meant for short sequences: the gradient keeps the probabilities ([batch, kv_heads, group,
  seq, seq], no bigger than q when seq <= head_dim) instead of recomputing them, and the
  tokens stay on the second axis, so no transpose of q, k or v is written.
  """
  batch, seq, heads, head_dim = q.shape
  grouped_q = (q * head_dim ** -0.5).reshape(batch, seq, k.shape[2], heads // k.shape[2],
                                             head_dim)
  return _full_attention(grouped_q, k, v).reshape(q.shape)


@jax.custom_vjp
def _full_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """q: [batch, seq, kv_heads, group, head_dim], scaled; k, v: [batch, seq, kv_heads,
  head_dim]. Returns q's shape."""
  return _full_attention_forward(q, k, v)[0]


def _full_attention_forward(q, k, v):
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype), (q, k, v, probs)


def _full_attention_backward(residuals, d_out):
  q, k, v, probs = residuals
  d_v = jnp.einsum("bkgqs,bqkgd->bskd", probs.astype(d_out.dtype), d_out,
                   preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("bqkgd,bskd->bkgqs", d_out, v, preferred_element_type=jnp.float32)
  d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  d_scores = d_scores.astype(q.dtype)
  d_q = jnp.einsum("bkgqs,bskd->bqkgd", d_scores, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("bkgqs,bqkgd->bskd", d_scores, q, preferred_element_type=jnp.float32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


_full_attention.defvjp(_full_attention_forward, _full_attention_backward)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """The SwiGLU MLP's hidden activation. gate, up: [..., mlp] (x times each kernel)."""
  return jax.nn.silu(gate) * up


@jax.custom_vjp
def packed_swiglu(gate_up: jax.Array) -> jax.Array:
  """`swiglu` of gate and up side by side, as one matmul with [gate | up] makes them.

  gate_up: [..., 2 * mlp] -> [..., mlp]. The gradient comes back packed alike from one pass
  over gate_up (autodiff's takes several passes and a concatenate).
  """
  gate, up = jnp.split(gate_up, 2, axis=-1)
  return swiglu(gate, up)


def _packed_swiglu_forward(gate_up):
  return packed_swiglu(gate_up), gate_up


def _packed_swiglu_backward(gate_up, d_hidden):
  gate, up = jnp.split(gate_up, 2, axis=-1)
  sigmoid = jax.nn.sigmoid(gate)
  d_gate = d_hidden * up * sigmoid * (1 + gate * (1 - sigmoid))
  return (jnp.concatenate([d_gate, d_hidden * gate * sigmoid], axis=-1),)


packed_swiglu.defvjp(_packed_swiglu_forward, _packed_swiglu_backward)


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float,
             contracting_dims: int = 1) -> jax.Array:
  """A LoRA adapter's term (x A) B * scale, added to `dense(x, kernel)`.

  x: [..., *in]; a: [*in, rank]; b: [rank, *out]; `contracting_dims` = len(in).
  """
  return dense(dense(x, a, contracting_dims), b) * scale


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """The one kernel W + A B * scale that computes `dense(x, W) + low_rank(x, A, B, scale)`.

  kernel: [*in, *out]; a: [*in, rank]; b: [rank, *out].
  """
  return kernel + jnp.tensordot(a, b, axes=1) * scale
