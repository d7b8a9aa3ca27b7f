"""Flash attention (Pallas, interpret mode on CPU) against a float64 NumPy attention and its gradients.

Tolerance: float32 inputs, outputs and q/k/v gradients within atol = rtol = 2e-5 of float64 NumPy.
The Mosaic GPU (Hopper) kernels run under JAX's Mosaic GPU interpreter with bfloat16 inputs (2e-2);
for every accelerator the compiled kernels are only lowered (jax.export), never compiled or run here.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import kernels_pallas
from kernels_pallas import (
  flash_attention_mosaic_gpu,
  flash_attention_mosaic_gpu_backward,
)
from kernels_pallas.flash_attention_kernels import KernelConfig

ATOL = RTOL = 2e-5


def numpy_mask(batch, q_len, kv_len, causal, segment_ids):
  """bool [batch, q_len, kv_len]."""
  q_pos = np.arange(q_len)[:, None]
  k_pos = np.arange(kv_len)[None, :]
  mask = np.broadcast_to((k_pos <= q_pos + kv_len - q_len) | (not causal), (batch, q_len, kv_len))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def numpy_attention(q, k, v, mask, scale):
  """float64 attention and its pullback. q: [b, lq, h, d]; k, v: [b, lk, kvh, d]; mask: [b, lq, lk]."""
  group = q.shape[2] // k.shape[2]
  k_heads, v_heads = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k_heads) * scale
  scores = np.where(mask[:, None], scores, -np.inf)
  row_max = scores.max(-1, keepdims=True)
  weights = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
  row_sum = weights.sum(-1, keepdims=True)
  probs = weights / np.where(row_sum == 0, 1.0, row_sum)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v_heads)

  def pullback(d_out):
    d_probs = np.einsum("bqhd,bkhd->bhqk", d_out, v_heads)
    d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", d_scores, k_heads) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", d_scores, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", probs, d_out)
    sum_group = lambda x: x.reshape(x.shape[:2] + (k.shape[2], group, x.shape[3])).sum(3)
    return dq, sum_group(dk), sum_group(dv)

  return out, pullback


def assert_vjp_matches_numpy(flash, q, k, v, d_out, mask, scale) -> np.ndarray:
  """`flash`'s output and its q/k/v gradients equal float64 NumPy's under `mask`; returns
  NumPy's output."""
  out, vjp = jax.vjp(flash, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  want_out, pullback = numpy_attention(*(x.astype(np.float64) for x in (q, k, v)), mask, scale)
  for name, got, want in zip(["out", "dq", "dk", "dv"], (out, *vjp(jnp.asarray(d_out))),
                             (want_out, *pullback(d_out.astype(np.float64)))):
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL, err_msg=name)
  return want_out


def documents(batch, seq_len, num_docs, rng):
  """segment_ids [batch, seq_len]: num_docs documents 1..n of random lengths, then padding segment 0."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq_len - 2), size=num_docs, replace=False))
    row = np.zeros(seq_len, np.int32)
    for doc, (start, end) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
      row[start:end] = doc + 1
    rows.append(row)
  return np.stack(rows)


def random_inputs(rng, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim):
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return (normal(batch, q_len, num_heads, head_dim), normal(batch, kv_len, num_kv_heads, head_dim),
          normal(batch, kv_len, num_kv_heads, head_dim), normal(batch, q_len, num_heads, head_dim))


CASES = [
    # batch, q_len, kv_len, heads, kv_heads, head_dim, causal, num_docs, block_q, block_k
    (1, 64, 64, 2, 2, 16, True, 0, None, None),
    (2, 37, 37, 4, 2, 16, True, 0, 16, 16),
    (1, 50, 50, 4, 1, 32, False, 0, 24, 16),
    (2, 45, 45, 2, 1, 16, True, 2, 16, 24),
    (1, 70, 70, 4, 4, 16, False, 3, 32, 40),
    (2, 33, 33, 4, 1, 16, False, 2, 8, 16),
    (1, 96, 96, 2, 1, 32, True, 3, 32, 32),
    (1, 77, 77, 4, 1, 16, True, 3, 16, 32),   # 4 heads x 5 q blocks feed each k block; documents; padding
    (1, 29, 53, 4, 2, 16, True, 0, 16, 16),   # fewer queries than keys: causal aligned to the end
    (2, 41, 23, 2, 2, 16, True, 0, 16, 8),    # more queries than keys: leading queries see nothing
    (1, 20, 61, 2, 1, 16, False, 0, None, 24),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_q{}_k{}_h{}_kv{}_d{}_c{}_docs{}_bq{}_bk{}".format(*c))
def test_matches_numpy_outputs_and_gradients(case):
  batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, causal, num_docs, block_q, block_k = case
  rng = np.random.default_rng(abs(hash(case)) % 2**32)
  q, k, v, d_out = random_inputs(rng, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim)
  segment_ids = documents(batch, q_len, num_docs, rng) if num_docs else None
  scale = head_dim ** -0.5

  def flash(q, k, v):
    return kernels_pallas.flash_attention(
        q, k, v, causal=causal, segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
        block_q=block_q, block_k=block_k)

  out, vjp = jax.vjp(flash, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  grads = vjp(jnp.asarray(d_out))
  mask = numpy_mask(batch, q_len, kv_len, causal, segment_ids)
  want_out, pullback = numpy_attention(*(x.astype(np.float64) for x in (q, k, v)), mask, scale)
  want_grads = pullback(d_out.astype(np.float64))

  np.testing.assert_allclose(np.asarray(out), want_out, atol=ATOL, rtol=RTOL)
  for name, got, want in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL, err_msg=f"d{name}")


def test_triton_structure_matches_numpy_in_interpreter():
  """Triton runs grid programs in parallel, so its dk/dv loops over the queries inside each program
  instead of revisiting outputs across a query-block grid axis (TPU); run that structure interpreted."""
  rng = np.random.default_rng(6)
  q, k, v, d_out = random_inputs(rng, 1, 45, 45, 4, 2, 16)
  segment_ids = documents(1, 45, 2, rng)
  cfg = KernelConfig(sm_scale=0.25, causal=True, block_q=16, block_k=16, q_len=45, kv_len=45,
                     interpret=True, triton=True)
  module = importlib.import_module("kernels_pallas.flash_attention")   # the package exports the function
  flash = lambda q, k, v: module._pallas_attention(q, k, v, jnp.asarray(segment_ids), cfg)
  assert_vjp_matches_numpy(flash, q, k, v, d_out, numpy_mask(1, 45, 45, True, segment_ids), 0.25)


def image_blocks(batch, seq_len, rng):
  """bidirectional ids [batch, seq_len]: two runs of 1 and 2 (images) at random places, else 0."""
  ids = np.zeros((batch, seq_len), np.int32)
  for row in ids:
    starts = np.sort(rng.choice(seq_len - 12, 2, replace=False))
    row[starts[0]:starts[0] + 9] = 1
    row[max(starts[1], starts[0] + 10):starts[1] + 12] = 2
  return ids


PREFIX_LM_CASES = [
    # batch, seq, heads, kv_heads, head_dim, num_docs, block_q, block_k, triton
    (2, 45, 4, 2, 16, 0, 16, 16, False),   # images across block boundaries, past the diagonal
    (1, 61, 2, 1, 16, 2, 16, 24, False),   # with documents; padding block
    (1, 40, 4, 2, 16, 2, 8, 16, True),     # Triton's dk/dv structure
]


@pytest.mark.parametrize("case", PREFIX_LM_CASES, ids=lambda c: "b{}_s{}_h{}_kv{}_d{}_docs{}_bq{}_bk{}_triton{}".format(*c))
def test_prefix_lm_mask_matches_numpy_outputs_and_gradients(case):
  """Causal text, images (bidirectional ids) that see themselves whole, within documents."""
  batch, seq, num_heads, num_kv_heads, head_dim, num_docs, block_q, block_k, triton = case
  rng = np.random.default_rng(abs(hash(case)) % 2**32)
  q, k, v, d_out = random_inputs(rng, batch, seq, seq, num_heads, num_kv_heads, head_dim)
  segment_ids = documents(batch, seq, num_docs, rng) if num_docs else None
  block_ids = image_blocks(batch, seq, rng)
  mask = numpy_mask(batch, seq, seq, True, None)
  mask = mask | ((block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] != 0))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if triton:
    module = importlib.import_module("kernels_pallas.flash_attention")
    cfg = KernelConfig(sm_scale=head_dim ** -0.5, causal=True, block_q=block_q, block_k=block_k,
                       q_len=seq, kv_len=seq, interpret=True, triton=True, bidirectional=True)
    packed = module.layout.pack_ids(None if segment_ids is None else jnp.asarray(segment_ids),
                                    jnp.asarray(block_ids))
    flash = lambda q, k, v: module._pallas_attention(q, k, v, packed, cfg)
  else:
    flash = lambda q, k, v: kernels_pallas.flash_attention(
        q, k, v, segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
        bidirectional_ids=jnp.asarray(block_ids), block_q=block_q, block_k=block_k)
  want_out = assert_vjp_matches_numpy(flash, q, k, v, d_out, mask, head_dim ** -0.5)
  reference = kernels_pallas.reference_attention(
      q, k, v, segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
      bidirectional_ids=jnp.asarray(block_ids))
  np.testing.assert_allclose(np.asarray(reference), want_out, atol=ATOL, rtol=RTOL)


def preference_branches(batch, seq_len, rng):
  """(segment ids, branch ids) [batch, seq_len]: segments of a shared prefix (0), a chosen (1)
  and a rejected (2) continuation, random lengths (a continuation may be empty), then padding."""
  segment_ids, branch_ids = np.zeros((2, batch, seq_len), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    while True:
      lengths = rng.integers([1, 0, 1], [12, 10, 10])
      if start + lengths.sum() > seq_len:
        break
      for branch, length in enumerate(lengths):
        segment_ids[row, start:start + length] = segment
        branch_ids[row, start:start + length] = branch
        start += length
      segment += 1
  return segment_ids, branch_ids


BRANCH_CASES = [
    # batch, seq, heads, kv_heads, head_dim, block_q, block_k, triton
    (2, 45, 4, 2, 16, 16, 16, False),   # continuations across block boundaries
    (1, 61, 2, 1, 16, 16, 24, False),   # padding block
    (1, 40, 4, 2, 16, 8, 16, True),     # Triton's dk/dv structure
]


@pytest.mark.parametrize("case", BRANCH_CASES, ids=lambda c: "b{}_s{}_h{}_kv{}_d{}_bq{}_bk{}_triton{}".format(*c))
def test_branch_mask_matches_numpy_outputs_and_gradients(case):
  """Shared-prompt preference rows: a reply sees its prefix and itself, never the other reply."""
  batch, seq, num_heads, num_kv_heads, head_dim, block_q, block_k, triton = case
  rng = np.random.default_rng(abs(hash(case)) % 2**32)
  q, k, v, d_out = random_inputs(rng, batch, seq, seq, num_heads, num_kv_heads, head_dim)
  segment_ids, branch_ids = preference_branches(batch, seq, rng)
  mask = numpy_mask(batch, seq, seq, True, segment_ids)
  mask = mask & ((branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None]))
  assert (mask != numpy_mask(batch, seq, seq, True, segment_ids)).any()
  if triton:
    module = importlib.import_module("kernels_pallas.flash_attention")
    cfg = KernelConfig(sm_scale=head_dim ** -0.5, causal=True, block_q=block_q, block_k=block_k,
                       q_len=seq, kv_len=seq, interpret=True, triton=True, branches=True)
    packed = module.layout.pack_ids(jnp.asarray(segment_ids), jnp.asarray(branch_ids))
    flash = lambda q, k, v: module._pallas_attention(q, k, v, packed, cfg)
  else:
    flash = lambda q, k, v: kernels_pallas.flash_attention(
        q, k, v, segment_ids=jnp.asarray(segment_ids), branch_ids=jnp.asarray(branch_ids),
        block_q=block_q, block_k=block_k)
  want_out = assert_vjp_matches_numpy(flash, q, k, v, d_out, mask, head_dim ** -0.5)
  reference = kernels_pallas.reference_attention(
      q, k, v, segment_ids=jnp.asarray(segment_ids), branch_ids=jnp.asarray(branch_ids))
  np.testing.assert_allclose(np.asarray(reference), want_out, atol=ATOL, rtol=RTOL)


def test_query_that_sees_no_key_gives_zeros_not_nan():
  rng = np.random.default_rng(0)
  q, k, v, d_out = random_inputs(rng, 1, 24, 8, 2, 1, 16)   # causal with 24 queries over 8 keys
  flash = lambda q, k, v: kernels_pallas.flash_attention(q, k, v, causal=True, block_q=8, block_k=8)
  out, vjp = jax.vjp(flash, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  grads = vjp(jnp.asarray(d_out))
  assert all(np.isfinite(np.asarray(x)).all() for x in (out, *grads))
  np.testing.assert_array_equal(np.asarray(out)[:, :16], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[:, :16], 0.0)


def test_padded_block_and_padding_segment_have_no_nan():
  rng = np.random.default_rng(1)
  q, k, v, d_out = random_inputs(rng, 1, 21, 21, 2, 2, 16)
  segment_ids = jnp.asarray([[1] * 10 + [2] * 6 + [0] * 5], jnp.int32)
  flash = lambda q, k, v: kernels_pallas.flash_attention(q, k, v, segment_ids=segment_ids, block_q=16)
  out, vjp = jax.vjp(flash, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  assert all(np.isfinite(np.asarray(x)).all() for x in (out, *vjp(jnp.asarray(d_out))))


@pytest.mark.parametrize("causal, num_docs", [(True, 0), (False, 2), (True, 3)])
def test_reference_attention_matches_numpy(causal, num_docs):
  rng = np.random.default_rng(2)
  q, k, v, _ = random_inputs(rng, 2, 30, 30, 4, 2, 16)
  segment_ids = documents(2, 30, num_docs, rng) if num_docs else None
  got = kernels_pallas.reference_attention(
      q, k, v, causal=causal, segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
  mask = numpy_mask(2, 30, 30, causal, segment_ids)
  want, _ = numpy_attention(*(x.astype(np.float64) for x in (q, k, v)), mask, 16 ** -0.5)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL)


def test_bfloat16_inputs_close_to_reference():
  rng = np.random.default_rng(3)
  q, k, v, _ = (jnp.asarray(x, jnp.bfloat16) for x in random_inputs(rng, 1, 40, 40, 2, 1, 16))
  got = kernels_pallas.flash_attention(q, k, v, block_q=16, block_k=16)
  want = kernels_pallas.reference_attention(q, k, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def test_numpy_pullback_matches_finite_differences():
  rng = np.random.default_rng(4)
  q, k, v, d_out = (x.astype(np.float64) for x in random_inputs(rng, 1, 5, 5, 2, 1, 3))
  mask = numpy_mask(1, 5, 5, True, np.array([[1, 1, 2, 2, 0]]))
  loss = lambda q, k, v: (numpy_attention(q, k, v, mask, 0.7)[0] * d_out).sum()
  grads = numpy_attention(q, k, v, mask, 0.7)[1](d_out)
  eps = 1e-6
  for arg, grad in enumerate(grads):
    inputs = [q, k, v]
    numeric = np.zeros_like(grad)
    for index in np.ndindex(grad.shape):
      plus, minus = [x.copy() for x in inputs], [x.copy() for x in inputs]
      plus[arg][index] += eps
      minus[arg][index] -= eps
      numeric[index] = (loss(*plus) - loss(*minus)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-6, rtol=1e-6)


def test_bad_arguments_raise_one_sentence():
  q = jnp.zeros((1, 16, 2, 16))
  with pytest.raises(ValueError, match="multiple of 8"):
    kernels_pallas.flash_attention(q, q, q, block_q=12)
  with pytest.raises(ValueError, match="q_len == kv_len"):
    kernels_pallas.flash_attention(q, q[:, :8], q[:, :8], segment_ids=jnp.zeros((1, 16), jnp.int32))
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    kernels_pallas.flash_attention(jnp.zeros((1, 16, 3, 16)), q, q)
  ids = jnp.ones((1, 16), jnp.int32)
  with pytest.raises(ValueError, match="bidirectional_ids or branch_ids, not both"):
    kernels_pallas.flash_attention(q, q, q, bidirectional_ids=ids, branch_ids=ids)


def gradient_of_sum(block_q=None, interpret=False):
  """jit of q, k, v, segment_ids -> gradients of sum(flash_attention(...)) w.r.t. q, k, v."""
  def loss(q, k, v, segment_ids):
    out = kernels_pallas.flash_attention(q, k, v, segment_ids=segment_ids, block_q=block_q, block_k=64,
                                         interpret=interpret)
    return out.astype(jnp.float32).sum()

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def export_gradient(platform, device_kind, dtype=jnp.bfloat16, head_dim=64, block_q=None, interpret=False):
  """jax.export of forward + backward (compiled kernels by default) for `platform` without the hardware."""
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                       platform="tpu" if platform == "tpu" else "gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
  q = jax.ShapeDtypeStruct((1, 128, 4, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((1, 128, 2, head_dim), dtype)
  segment_ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  unchecked = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(gradient_of_sum(block_q, interpret), platforms=[platform],
                                 disabled_checks=unchecked)(q, kv, kv, segment_ids)
  return exported.mlir_module(), (q, kv)


H100 = "NVIDIA H100 80GB HBM3"
MOSAIC_GPU_CALL = "custom_call @mosaic_gpu_v2"
TRITON_CALL = "custom_call @__gpu$xla.gpu.triton"


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("platform, device_kind, kernel_call", [
    ("tpu", "TPU v5 lite", "tpu_custom_call"), ("cuda", H100, MOSAIC_GPU_CALL)])
def test_lowers_for_accelerators(platform, device_kind, kernel_call):
  """Compiled forward and backward lower to TPU Mosaic / Mosaic GPU (not Triton) without the hardware.

  Only lowering is checked: the backend compilers (Mosaic TPU, ptxas) themselves need the device.
  """
  module, _ = export_gradient(platform, device_kind)
  assert module.count(kernel_call) == 3   # forward, dq, dk/dv
  assert TRITON_CALL not in module


@pytest.mark.parametrize("platform, device_kind, kernel_call", [
    ("tpu", "TPU v5 lite", "tpu_custom_call"), ("cuda", H100, MOSAIC_GPU_CALL)])
def test_interpret_left_unset_follows_the_lowering_platform_not_the_host(platform, device_kind, kernel_call):
  """interpret=None on this CPU host: an export for an accelerator gets its kernels, a CPU run the
  interpreter (the AOT-compile-from-a-CPU-host case)."""
  module, _ = export_gradient(platform, device_kind, interpret=None)
  assert module.count(kernel_call) == 3
  rng = np.random.default_rng(5)
  q, k, v, _ = random_inputs(rng, 1, 100, 100, 4, 2, 64)
  segment_ids = documents(1, 100, 2, rng)
  grads = gradient_of_sum(interpret=None)(q, k, v, jnp.asarray(segment_ids))
  _, pullback = numpy_attention(*(x.astype(np.float64) for x in (q, k, v)),
                                numpy_mask(1, 100, 100, True, segment_ids), 64 ** -0.5)
  for name, got, want in zip("qkv", grads, pullback(np.ones(q.shape))):
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL, err_msg=f"d{name}")


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype, head_dim, block_q, why", [
    (jnp.float32, 64, None, "bfloat16/float16"),
    (jnp.bfloat16, 32, None, "head_dim a multiple of 64"),
    (jnp.bfloat16, 64, 32, "multiples of 64"),
])
def test_cuda_falls_back_to_triton_only_where_mosaic_gpu_cannot(dtype, head_dim, block_q, why):
  module, (q, kv) = export_gradient("cuda", H100, dtype, head_dim, block_q)
  backend, reason = kernels_pallas.gpu_backend(q, kv, kv, block_q=block_q, block_k=64)
  assert backend == "triton" and why in reason
  assert module.count(TRITON_CALL) == 3 and MOSAIC_GPU_CALL not in module


def test_mosaic_gpu_declines_tiles_beyond_smem():
  q = jax.ShapeDtypeStruct((1, 512, 2, 256), jnp.bfloat16)
  assert kernels_pallas.gpu_backend(q, q, q) == ("mosaic_gpu", None)
  backend, reason = kernels_pallas.gpu_backend(q, q, q, block_q=128, block_k=256)
  assert backend == "triton" and "SMEM" in reason


def test_mosaic_gpu_declines_gpus_other_than_hopper(monkeypatch):
  q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  gpu = lambda capability: type("Gpu", (), {"compute_capability": capability})()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [gpu("8.0")])
  backend, reason = kernels_pallas.gpu_backend(q, q, q)
  assert backend == "triton" and "compute capability 8.0" in reason
  monkeypatch.setattr(jax, "devices", lambda: [gpu("9.0")])
  assert kernels_pallas.gpu_backend(q, q, q) == ("mosaic_gpu", None)


MOSAIC_GPU_CASES = [
    # batch, q_len, kv_len, heads, kv_heads, head_dim, causal, num_docs
    (2, 100, 100, 4, 2, 64, True, 3),   # GQA, documents, padded blocks, two K/V blocks in flight
    (1, 70, 150, 2, 1, 128, True, 0),   # fewer queries than keys
    (1, 150, 70, 2, 2, 64, True, 0),    # more queries than keys: leading queries see nothing
    (1, 130, 130, 2, 1, 64, False, 2),
]


@pytest.mark.parametrize("case", MOSAIC_GPU_CASES, ids=lambda c: "b{}_q{}_k{}_h{}_kv{}_d{}_c{}_docs{}".format(*c))
def test_mosaic_gpu_kernels_match_numpy_in_gpu_interpreter(case):
  """The Mosaic GPU kernels run by JAX's Mosaic GPU interpreter on CPU.

  The interpreter's race detector is on, but in JAX 0.12 it does not track wgmma's SMEM reads, so it
  would not notice a missing barrier wait before a wgmma (tried: it does not); the barriers are unverified.

  bfloat16 inputs; the float64 NumPy reference sees the same bfloat16 values. The kernels round
  probabilities and outputs to bfloat16, hence atol = rtol = 2e-2.
  """
  batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, causal, num_docs = case
  rng = np.random.default_rng(abs(hash(case)) % 2**32)
  inputs = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
            for x in random_inputs(rng, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim)]
  segment_ids = documents(batch, q_len, num_docs, rng) if num_docs else None
  blocks = flash_attention_mosaic_gpu.choose_blocks(q_len, kv_len, head_dim)
  cfg = KernelConfig(sm_scale=head_dim ** -0.5, causal=causal, block_q=blocks.block_q, block_k=blocks.block_k,
                     q_len=q_len, kv_len=kv_len, interpret=plgpu.InterpretGPUParams(detect_races=True))

  def flash(q, k, v):
    segments = None if segment_ids is None else jnp.asarray(segment_ids)
    return flash_attention_mosaic_gpu_backward.attention(q, k, v, segments, cfg)

  q, k, v, d_out = (jnp.asarray(x, jnp.bfloat16) for x in inputs)
  out, vjp = jax.vjp(flash, q, k, v)
  grads = vjp(d_out)
  want_out, pullback = numpy_attention(*inputs[:3], numpy_mask(batch, q_len, kv_len, causal, segment_ids),
                                       head_dim ** -0.5)
  for name, got, want in zip(["out", "dq", "dk", "dv"], (out, *grads), (want_out, *pullback(inputs[3]))):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2, rtol=2e-2, err_msg=name)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("check", [
    lambda: test_matches_numpy_outputs_and_gradients(CASES[3]),   # causal, GQA, documents, padding
    test_triton_structure_matches_numpy_in_interpreter,
    lambda: test_mosaic_gpu_kernels_match_numpy_in_gpu_interpreter(MOSAIC_GPU_CASES[0]),
    lambda: test_lowers_for_accelerators("tpu", "TPU v5 lite", "tpu_custom_call"),
    lambda: test_lowers_for_accelerators("cuda", H100, MOSAIC_GPU_CALL),
], ids=["interpret", "triton_structure", "mosaic_gpu_interpret", "lower_tpu", "lower_cuda"])
def test_kernels_match_numpy_with_jax_enable_x64(check):
  """With x64 on (as users of float64 references run it), Python ints in index arithmetic become
  int64 while program ids and loop counters stay int32; every kernel still traces, lowers and
  matches the float64 NumPy reference."""
  with jax.enable_x64(True):
    assert jnp.arange(1).dtype == jnp.int64
    check()
