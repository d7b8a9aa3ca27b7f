"""The model against an independent float64 NumPy transformer, and the configs' sizes."""

import functools
import re
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlm.model import ModelConfig, Transformer, count_params, init_kv_cache, layers

# A dot XLA computes in float32, in a compiled program's text.
FLOAT32_DOT = r"= f32\[[0-9,]*\]\{[0-9,]*\} dot\("
CONFIG = ModelConfig(vocab_size=97, num_layers=2, embed_dim=48, num_heads=6, num_kv_heads=2,
                     head_dim=8, mlp_dim=80, max_seq_len=64)


def _np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, positions, theta):
  """x: [seq, heads, head_dim]; rotates pairs (i, i + head_dim/2)."""
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for s, pos in enumerate(positions):
    for i in range(half):
      angle = pos / theta ** (2 * i / x.shape[-1])
      a, b = x[s, :, i], x[s, :, i + half]
      out[s, :, i] = a * np.cos(angle) - b * np.sin(angle)
      out[s, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
  return out


def _np_forward(params, tokens, positions, segment_ids, c):
  """One sequence, written loop-by-loop from the Llama recipe, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = p["embedding"][tokens]
  seq = len(tokens)
  group = c.num_heads // c.num_kv_heads
  for layer in range(c.num_layers):
    blk = p["blocks"][layer]
    h = _np_rms_norm(x, blk["attention_norm"]["scale"], c.norm_eps)
    q = _np_rope(np.einsum("se,ehd->shd", h, blk["attention"]["q"]), positions, c.rope_theta)
    k = _np_rope(np.einsum("se,ehd->shd", h, blk["attention"]["k"]), positions, c.rope_theta)
    v = np.einsum("se,ehd->shd", h, blk["attention"]["v"])
    heads_out = np.zeros((seq, c.num_heads, c.head_dim))
    for head in range(c.num_heads):
      kv = head // group
      for i in range(seq):
        allowed = [j for j in range(i + 1) if segment_ids[j] == segment_ids[i]]
        scores = np.array([q[i, head] @ k[j, kv] for j in allowed]) / np.sqrt(c.head_dim)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        heads_out[i, head] = sum(w * v[j, kv] for w, j in zip(weights, allowed))
    x = x + np.einsum("shd,hde->se", heads_out, blk["attention"]["o"])
    h = _np_rms_norm(x, blk["mlp_norm"]["scale"], c.norm_eps)
    gate = h @ blk["mlp"]["gate"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ blk["mlp"]["up"])) @ blk["mlp"]["down"]
  x = _np_rms_norm(x, p["final_norm"]["scale"], c.norm_eps)
  unembed = p["embedding"].T if c.tie_embeddings else p["unembedding"]
  return x @ unembed


def _packed_example(rng, batch, seq):
  tokens = rng.integers(1, CONFIG.vocab_size, (batch, seq)).astype(np.int32)
  segment_ids = np.zeros((batch, seq), np.int32)
  positions = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    cuts = sorted(rng.choice(np.arange(1, seq - 2), size=2, replace=False))
    bounds = [0, *cuts, seq - 2]  # two trailing pad tokens
    for segment, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
      segment_ids[b, start:end] = segment
      positions[b, start:end] = np.arange(end - start)
  return tokens, segment_ids, positions


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_float64_numpy_reference(tie):
  config = ModelConfig(**{**CONFIG.__dict__, "tie_embeddings": tie})
  model = Transformer(config, rngs=nnx.Rngs(3))
  params = nnx.to_pure_dict(nnx.state(model))
  tokens, segment_ids, positions = _packed_example(np.random.default_rng(0), 2, 24)
  logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))
  for b in range(2):
    expected = _np_forward(params, tokens[b], positions[b], segment_ids[b], config)
    real = segment_ids[b] != 0  # padding rows attend only to padding: not compared
    np.testing.assert_allclose(np.asarray(logits[b])[real], expected[real], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_a_new_model_predicts_nearly_uniformly(tie):
  """At initialisation the next-token loss is near ln(vocab), a uniform guess's; tied
  embeddings once made every logit std ~sqrt(embed_dim) (loss 1884 on the 1b shapes)."""
  config = ModelConfig(vocab_size=512, num_layers=2, embed_dim=256, num_heads=4, num_kv_heads=2,
                       head_dim=64, mlp_dim=512, max_seq_len=64, tie_embeddings=tie)
  model = Transformer(config, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 512, (4, 33))
  logits, _ = model(jnp.asarray(tokens[:, :-1]))
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  loss = -np.take_along_axis(log_probs, tokens[:, 1:, None], -1).mean()
  assert abs(loss - np.log(512)) < 1.0, (loss, np.log(512))


def test_packed_documents_do_not_see_each_other():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  first, second = rng.integers(1, 97, 10), rng.integers(1, 97, 12)
  packed = np.concatenate([first, second])[None]
  segments = np.array([[1] * 10 + [2] * 12])
  positions = np.concatenate([np.arange(10), np.arange(12)])[None]
  packed_logits, _ = model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments))
  alone_logits, _ = model(jnp.asarray(second[None]))
  np.testing.assert_allclose(packed_logits[0, 10:], alone_logits[0], rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_matches_full_forward():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, 97, (2, 12)), jnp.int32)
  full, _ = model(tokens)
  cache = init_kv_cache(CONFIG, batch=2, max_len=32)
  prefill, cache = model(tokens[:, :7], cache=cache)
  steps = [prefill]
  for pos in range(7, 12):
    step_logits, cache = model(tokens[:, pos:pos + 1], jnp.full((2, 1), pos), cache=cache)
    steps.append(step_logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_param_count_matches_closed_form():
  for tie in (False, True):
    config = ModelConfig(**{**CONFIG.__dict__, "tie_embeddings": tie})
    params = nnx.state(nnx.eval_shape(lambda c=config: Transformer(c, rngs=nnx.Rngs(0))))
    assert sum(x.size for x in jax.tree.leaves(params)) == count_params(config)


@pytest.mark.parametrize("name, expected_millions", [
    ("tiny.gin", 3.147456), ("125m.gin", 109.53), ("1b.gin", 1235.81), ("7b.gin", 6738.42)])
def test_config_sizes(name, expected_millions):
  """Counted by hand: layers*(attn + 3*embed*mlp + 2*embed) + embeddings + final norm. tiny:
  4*(192*64*(2*3+2*1) + 3*192*512 + 2*192) + 2*4096*192 + 192, with the vocabulary that
  tiny.gin asks of the default corpus (its ModelConfig.vocab_size comes from the data)."""
  path = Path(__file__).parent.parent / "configs" / name
  gin.clear_config()
  gin.parse_config_file(str(path), skip_unknown=True)
  config = ModelConfig()
  if config.vocab_size is None:
    vocab = re.search(r"ensure_default_corpus.vocab_size = (\d+)", path.read_text()).group(1)
    config = ModelConfig(**{**config.__dict__, "vocab_size": int(vocab)})
  gin.clear_config()
  params = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  assert sum(x.size for x in jax.tree.leaves(params)) / 1e6 == pytest.approx(expected_millions,
                                                                             abs=0.01)


@pytest.mark.parametrize("projector,contrastive_dim", [("linear", 0), ("mlp", 0), ("mlp", 12)])
def test_param_count_includes_the_vision_tower_and_projector(projector, contrastive_dim):
  from maxlm.model.vit import VisionConfig
  vision = VisionConfig(image_size=16, patch_size=8, num_layers=2, embed_dim=24, num_heads=4,
                        num_kv_heads=2, head_dim=6, mlp_dim=40, projector=projector,
                        image_token_id=5, contrastive_dim=contrastive_dim)
  config = ModelConfig(**{**CONFIG.__dict__, "vision": vision})
  state = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  sizes = {path[0]: 0 for path, _ in jax.tree_util.tree_leaves_with_path(state)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    sizes[path[0]] += leaf.size
  assert count_params(config) == count_params(config, active=True) == sum(sizes.values())
  vision_sizes = sizes.pop(jax.tree_util.DictKey("vision")) + sizes.pop(
      jax.tree_util.DictKey("projector")) + sizes.pop(jax.tree_util.DictKey("contrastive"), 0)
  assert count_params(config) - count_params(CONFIG) == vision_sizes


def test_training_flops_per_token_leave_the_vision_tower_out():
  from maxlm.model import training_flops_per_token
  from maxlm.model.vit import VisionConfig
  config = ModelConfig(**{**CONFIG.__dict__, "vision": VisionConfig(image_token_id=5)})
  assert training_flops_per_token(config, 24) == training_flops_per_token(CONFIG, 24)


def test_training_flops_per_token_by_hand():
  from maxlm.model import training_flops_per_token
  # 2 layers: attention 48*8*(2*6+2*2)=6144, mlp 3*48*80=11520, norms 96 -> 17760 per layer;
  # matmul weights: 2*17760 (norm scales counted as a few extra) + final norm 48 + unembed 97*48.
  matmul = 2 * 17760 + 48 + 97 * 48
  attention = 6 * 2 * 6 * 8 * 24
  assert training_flops_per_token(CONFIG, seq_len=24) == 6 * matmul + attention


@pytest.mark.slow  # in `pytest -m slow` (CI keeps under 15 minutes)
def test_pallas_attention_matches_xla_in_loss_and_gradients_sharded_too():
  """The model with the flash kernel (interpret mode on CPU) against the XLA path, alone and
  in a train step on a (data=2, fsdp=2, tensor=2) mesh, where it runs under shard_map."""
  from maxlm import optim, sharding, steps, tasks
  tokens, segment_ids, positions = _packed_example(np.random.default_rng(4), 8, 32)
  batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
  results = {}
  for implementation in ("xla", "pallas"):
    config = ModelConfig(**{**CONFIG.__dict__, "attention": implementation})
    model = Transformer(config, rngs=nnx.Rngs(0))
    grads = nnx.grad(lambda m: tasks.next_token_loss(m, batch)[0])(model)
    mesh = sharding.make_mesh(2, 2, 2)
    optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, 1))
    graphdef, abstract_state = steps.abstract_model(config)
    shardings = steps.state_shardings(abstract_state, optimizer, mesh)
    train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                       sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      _, metrics = train_step(steps.init_train_state(config, optimizer, shardings), batch)
    results[implementation] = (nnx.to_pure_dict(grads), float(metrics["loss"]))
  np.testing.assert_allclose(results["pallas"][1], results["xla"][1], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(results["pallas"][0]), jax.tree.leaves(results["xla"][0])):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name, backend, dtype, head_dim, seq_len, branches, expected", [
    ("auto", "gpu", "bfloat16", 64, 4096, False, "cudnn"),
    ("auto", "gpu", "float16", 128, 2048, False, "cudnn"),
    ("auto", "gpu", "bfloat16", 64, 4096, True, "pallas"),   # cuDNN takes no branch ids
    ("auto", "gpu", "float32", 64, 4096, False, "xla"),      # cuDNN refuses float32
    ("auto", "gpu", "float32", 64, 4096, True, "xla"),
    ("auto", "gpu", "bfloat16", 256, 4096, False, "xla"),    # over cuDNN's head dim
    ("auto", "gpu", "bfloat16", 60, 4096, False, "xla"),     # not a multiple of 8
    ("auto", "gpu", "bfloat16", 64, 4095, False, "xla"),     # cuDNN's masked training: even
    ("auto", "cpu", "bfloat16", 64, 4096, False, "xla"),
    ("auto", "tpu", "bfloat16", 64, 4096, True, "xla"),
    ("pallas", "cpu", "float32", 64, 4096, False, "pallas"),
    ("cudnn", "gpu", "float32", 64, 4096, True, "cudnn")])
def test_auto_attention_is_cudnn_where_it_takes_the_shapes_and_xla_elsewhere(
    name, backend, dtype, head_dim, seq_len, branches, expected):
  from maxlm.model import attention
  assert attention.implementation_for(name, dtype=dtype, head_dim=head_dim, seq_len=seq_len,
                                      with_branches=branches, backend=backend) == expected


def test_the_default_attention_is_auto():
  assert ModelConfig().attention == "auto"


def test_unknown_attention_is_refused():
  with pytest.raises(ValueError, match="ModelConfig.attention='flash'"):
    ModelConfig(attention="flash")


def _loss_and_grads(config, batch):
  from maxlm import tasks
  model = Transformer(config, rngs=nnx.Rngs(0))
  loss, grads = nnx.value_and_grad(lambda m: tasks.next_token_loss(m, batch)[0])(model)
  return loss, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: layers.dense's own vjp
def test_remat_gives_the_same_gradients_as_none(remat, dtype):
  tokens, segment_ids, positions = _packed_example(np.random.default_rng(5), 2, 24)
  batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
  base_config = ModelConfig(**{**CONFIG.__dict__, "dtype": dtype})
  base_loss, base_grads = jax.jit(lambda b: _loss_and_grads(base_config, b))(batch)
  config = ModelConfig(**{**base_config.__dict__, "remat": remat})
  loss, grads = jax.jit(lambda b: _loss_and_grads(config, b))(batch)
  jaxpr = str(jax.make_jaxpr(lambda b: _loss_and_grads(config, b))(batch))
  assert jaxpr.count(" remat2[") == CONFIG.num_layers  # jax.checkpoint, once per layer
  np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
    if dtype == "float32":
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    else:  # recomputed activations fuse otherwise, so round otherwise: 1.0% here at most
      assert np.linalg.norm(got - want) < 3e-2 * np.linalg.norm(want)


def _masked_attention(q, k, v, mask):
  """Grouped-query attention as one masked product, autodiff all the way: the reference for
  causal_attention's query blocks and custom gradient. mask: bool [batch, 1, q_len, kv_len]."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
  return jnp.einsum("bhqs,bshd->bqhd", probs, v)


def test_causal_attention_in_query_blocks_matches_one_masked_product():
  from maxlm.model import layers
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 24, heads, 8)), jnp.float32)
             for heads in (6, 2, 2))
  _, segment_ids, _ = _packed_example(rng, 2, 24)
  index = jnp.broadcast_to(jnp.arange(24), (2, 24))
  mask = layers.attention_mask(index, index[0], segment_ids, segment_ids)
  expected = _masked_attention(q, k, v, mask)
  for query_block in (5, 8, 24):
    np.testing.assert_allclose(layers.causal_attention(q, k, v, segment_ids, query_block),
                               expected, rtol=1e-6, atol=1e-6)



def test_causal_attention_gradients_match_autodiff_of_one_masked_product():
  from maxlm.model import layers
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 24, heads, 8)), jnp.float32)
             for heads in (6, 2, 2))
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  _, segment_ids, _ = _packed_example(rng, 2, 24)
  index = jnp.broadcast_to(jnp.arange(24), (2, 24))
  mask = layers.attention_mask(index, index[0], segment_ids, segment_ids)

  def gradients(attend):
    return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * d_out), argnums=(0, 1, 2))(q, k, v)

  expected = gradients(lambda q, k, v: _masked_attention(q, k, v, mask))
  for query_block in (5, 8, 24):
    got = gradients(functools.partial(layers.causal_attention, segment_ids=segment_ids,
                                      query_block=query_block))
    for got_grad, want_grad in zip(got, expected):
      np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_rope_gradient_is_the_opposite_rotation():
  from maxlm.model import layers
  rng = np.random.default_rng(9)
  x, d_out = (rng.normal(size=(1, 12, 3, 8)) for _ in range(2))
  positions = rng.integers(0, 1000, (1, 12))
  grad = jax.grad(lambda x: jnp.sum(layers.rope(x, jnp.asarray(positions), 10000.0) * d_out))(
      jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(grad[0], _np_rope(d_out[0], -positions[0], 10000.0),
                             rtol=1e-4, atol=1e-4)


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match="ModelConfig.remat='some'"):
    ModelConfig(remat="some")


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_weights_and_gradients():
  """1b.gin and 7b.gin train this way: float32 master weights, bfloat16 matmuls."""
  tokens, segment_ids, positions = _packed_example(np.random.default_rng(6), 2, 24)
  batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
  config = ModelConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"})
  loss, grads = jax.jit(lambda b: _loss_and_grads(config, b))(batch)
  base_loss, base_grads = jax.jit(lambda b: _loss_and_grads(CONFIG, b))(batch)
  params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  # bfloat16 keeps 8 bits of mantissa (relative error 2**-9 per rounding): a few 1e-3 on a
  # loss of ~4.6 after a few dozen roundings.
  np.testing.assert_allclose(loss, base_loss, rtol=1e-2)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
    assert np.linalg.norm(got - want) < 0.1 * np.linalg.norm(want)
  jaxpr = jax.make_jaxpr(lambda b: _loss_and_grads(config, b))(batch)
  forward_matmuls = [eqn for eqn in equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
  assert forward_matmuls and all(
      {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)} for eqn in forward_matmuls)
  logits, _ = Transformer(config, rngs=nnx.Rngs(0))(jnp.asarray(tokens))
  assert logits.dtype == jnp.float32  # the loss's softmax runs in float32


@pytest.mark.parametrize("tokens", [48, 45])  # 45: not in groups of 8, autodiff's road
def test_a_bfloat16_dense_layers_gradients_equal_float64_numpy_and_multiply_in_bfloat16(tokens):
  """XLA:CPU ran a bfloat16 dense layer's weight and input gradients as float32 dots;
  `layers.dense` contracts each as two axes so that they run in bfloat16 (see
  WEIGHT_GRADIENT_GROUPS)."""
  rng = np.random.default_rng(7)
  x, kernel = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
               for shape in ((tokens // 3, 3, 16), (16, 12)))
  d_out = jnp.asarray(rng.standard_normal((tokens // 3, 3, 12)), jnp.bfloat16)
  gradients = jax.jit(lambda x, kernel, d_out: jax.vjp(layers.dense, x, kernel)[1](d_out))
  d_x, d_kernel = gradients(x, kernel, d_out)
  x64, kernel64, d_out64 = (np.asarray(a, np.float64) for a in (x, kernel, d_out))
  want_kernel = x64.reshape(-1, 16).T @ d_out64.reshape(-1, 12)
  # bfloat16 results: one rounding of 2**-9 relative after a float32 sum.
  np.testing.assert_allclose(np.asarray(d_kernel, np.float64), want_kernel, rtol=1e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(d_x, np.float64), d_out64 @ kernel64.T, rtol=1e-2,
                             atol=2e-2)
  compiled = gradients.lower(x, kernel, d_out).compile().as_text()
  float32_dots = re.findall(FLOAT32_DOT, compiled)
  assert (not float32_dots) if tokens % layers.WEIGHT_GRADIENT_GROUPS == 0 else float32_dots


def test_one_bfloat16_row_times_a_weight_equals_float64_numpy_and_multiplies_in_bfloat16():
  """XLA:CPU ran one bfloat16 row times a weight as a float32 matrix-vector product (the
  weight converted every call); `layers.dense` multiplies it beside a zero row."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((1, 1, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((16, 12)), jnp.bfloat16)
  product = jax.jit(layers.dense)
  want = np.asarray(x, np.float64).reshape(1, 16) @ np.asarray(kernel, np.float64)
  np.testing.assert_allclose(np.asarray(product(x, kernel), np.float64).reshape(1, 12), want,
                             rtol=1e-2, atol=2e-2)
  compiled = product.lower(x, kernel).compile().as_text()
  assert not re.search(FLOAT32_DOT, compiled)
  plain = jax.jit(lambda x, kernel: x.reshape(1, 16) @ kernel).lower(x, kernel).compile()
  assert re.search(FLOAT32_DOT, plain.as_text())  # what it avoids


def equations(jaxpr):
  """Every equation, descending into the sub-jaxprs of jit, remat and the like."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from equations(inner)


def _np_branch_mask(segment_ids, branch_ids):
  """bool [seq, seq] pair by pair: causal within a segment, and a key of branch 0 or of the
  query's own branch."""
  seq = len(segment_ids)
  return np.array([[segment_ids[i] == segment_ids[j] and j <= i
                    and branch_ids[j] in (0, branch_ids[i]) for j in range(seq)]
                   for i in range(seq)])


def _np_attention(q, k, v, mask):
  """float64. q: [seq, heads, d]; k, v: [seq, kv_heads, d]; mask: bool [seq, seq]."""
  group = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
  scores = np.einsum("qhd,shd->hqs", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("hqs,shd->qhd", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("query_block", [8, 128])
def test_xla_attention_with_branch_ids_keeps_a_pairs_replies_apart_as_numpy_does(query_block):
  """Shared-prompt preference rows: [prefix, chosen, rejected] segments, one with an empty
  chosen continuation; the rejected replies straddle the query blocks of 8."""
  from maxlm.model import layers
  rng = np.random.default_rng(9)
  segment_ids = np.array([[1] * 11 + [2] * 9 + [3] * 3 + [0], [1] * 24])
  branch_ids = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 0, 2, 0],
                         [0] * 6 + [1] * 9 + [2] * 9])
  q = rng.standard_normal((2, 24, 6, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, 24, 2, 8)).astype(np.float32) for _ in range(2))
  got = layers.causal_attention(*map(jnp.asarray, (q, k, v, segment_ids)), query_block,
                                branch_ids=jnp.asarray(branch_ids))
  for row in range(2):
    mask = _np_branch_mask(segment_ids[row], branch_ids[row])
    want = _np_attention(*(x[row].astype(np.float64) for x in (q, k, v)), mask)
    np.testing.assert_allclose(np.asarray(got[row]), want, atol=2e-5, rtol=2e-5)
