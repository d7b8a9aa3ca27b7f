"""maxlm.quantization: int8 math against NumPy's integers, and the compiled program XLA runs
for the server: which weights reach it as int8, and that it makes no float copy of them."""

import hashlib
import math
import re
import shutil
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from test_model import FLOAT32_DOT
from test_paged_kv import numpy_attention, numpy_int8_rows
from test_serving import CONTEXT, PROMPT, random_run, save_random_checkpoint, train_tokenizer

from maxlm import quantization
from maxlm.model import ModelConfig, kv_cache
from serving import engine as engine_module
from serving.engine import Engine, SamplingSettings, with_serving_dtype
from serving.orchestrator import Orchestrator


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return random_run(tmp_path_factory)


@pytest.fixture(scope="module")
def compiled(run_dir):
  """(the int8 engine, the compiled text of its decode step: the program every token runs; a
  scoring pack's padded activations can take a weight's shape, this one's cannot)."""
  engine = Engine.from_checkpoint(run_dir, slots=1, quantize="int8")
  rows, table = np.full(1, engine.slots, np.int32), np.zeros((1, 1), np.int32)
  return engine, engine._step.lower(engine.params, engine.init_decode_state(), rows,
                                    table).compile().as_text()


def int8_leaves(params) -> list[quantization.Int8Array]:
  return [leaf for leaf in jax.tree.leaves(params, is_leaf=quantization.is_quantized)
          if quantization.is_quantized(leaf)]


def shape_text(shape) -> str:
  return ",".join(map(str, shape))


def float_copy_shapes(params) -> set[str]:
  """Each int8 weight's shape and its 2D flattenings: a float copy could take any of them."""
  shapes = set()
  for leaf in int8_leaves(params):
    shape = leaf.values.shape
    shapes.add(shape_text(shape))
    shapes |= {shape_text((math.prod(shape[:i]), math.prod(shape[i:])))
               for i in range(1, len(shape))}
  return shapes


def entry_signature(hlo_text: str) -> str:
  return next(line for line in hlo_text.splitlines() if line.startswith("ENTRY"))


def test_every_matrix_reaches_the_compiled_program_as_int8_never_float32(compiled):
  engine, text = compiled
  shapes = {shape_text(leaf.values.shape) for leaf in int8_leaves(engine.params)}
  assert len(shapes) >= 4  # embedding, attention, MLP and output matrices
  signature = entry_signature(text)
  for shape in shapes:
    assert f"s8[{shape}]" in signature
    assert f"f32[{shape}]" not in signature


def test_int8_weights_take_a_quarter_of_float32s_bytes_plus_their_scales(compiled):
  engine, _ = compiled
  matrices = int8_leaves(engine.params)
  int8_bytes = sum(m.values.nbytes + m.scale.nbytes for m in matrices)
  float_bytes = sum(np.prod(m.values.shape) * 4 for m in matrices)
  assert int8_bytes < 0.3 * float_bytes


def test_no_float32_copy_of_a_whole_int8_weight_appears_inside_the_program(compiled):
  engine, text = compiled
  for shape in float_copy_shapes(engine.params):
    assert not re.search(rf"f32\[{shape}\]", text), shape
  assert re.search(r"s32\[[0-9,]+\]\{[0-9,]+\} dot\(", text), "no int8 x int8 -> int32 matmul"


def test_int8_rounding_error_is_at_most_half_a_step_per_contracted_slice():
  weight = np.random.default_rng(5).normal(size=(3, 8, 48)).astype(np.float32)  # like `o`
  weight[:, :, 0] = 0.0  # an all-zero output channel
  quantized = quantization.quantize_int8(weight, (0, 1))
  step = np.abs(weight).max(axis=(0, 1), keepdims=True) / 127
  assert quantized.values.dtype == np.int8 and quantized.scale.shape == (1, 1, 48)
  restored = np.asarray(quantization.dequantize(quantized))
  assert (np.abs(restored - weight) <= step / 2 + 1e-7).all()
  assert (restored[:, :, 0] == 0).all()


def numpy_int8(array: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
  """(int64 values, float64 step) of symmetric int8 rounding with one step across `axes`."""
  step = np.abs(array).max(axis=axes, keepdims=True) / 127
  step[step == 0] = 1
  return np.clip(np.round(array / step), -127, 127).astype(np.int64), step


def test_int8_dense_equals_numpy_integer_matmul_of_per_token_rounded_inputs():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  x[0, 1] = 0.0  # an all-zero token
  weight = rng.normal(size=(3, 8, 48)).astype(np.float32)
  kernel = quantization.quantize_int8(weight, (0, 1))
  got = np.asarray(quantization.dense(x, kernel, contracting_dims=2))
  x_values, x_step = numpy_int8(x.reshape(10, 24).astype(np.float64), -1)
  w_values, w_step = numpy_int8(weight.reshape(24, 48).astype(np.float64), 0)
  expected = (x_values @ w_values) * x_step * w_step
  np.testing.assert_allclose(got.reshape(10, 48), expected, rtol=1e-5, atol=1e-6)


def test_int8_tied_logits_and_embedding_rows_equal_numpy():
  rng = np.random.default_rng(8)
  embedding = rng.normal(size=(40, 16)).astype(np.float32)
  kernel = quantization.quantize_int8(embedding, (1,))
  e_values, e_step = numpy_int8(embedding.astype(np.float64), 1)
  ids = np.array([[3, 0, 39]])
  np.testing.assert_allclose(np.asarray(quantization.take_rows(kernel, ids, np.float32)),
                             (e_values * e_step)[ids], rtol=1e-6)
  x = rng.normal(size=(1, 4, 16)).astype(np.float32)
  x_values, x_step = numpy_int8(x[0].astype(np.float64), -1)
  expected = (x_values @ e_values.T) * x_step * e_step.T
  np.testing.assert_allclose(np.asarray(quantization.dense_transposed(x, kernel))[0], expected,
                             rtol=1e-5, atol=1e-6)


def test_only_the_language_models_matrices_are_quantized():
  params = {"embedding": np.ones((8, 4)), "final_norm": {"scale": np.ones(4)},
            "vision": {"patch": np.ones((4, 4))},
            "blocks": [{"attention": {"o": np.ones((2, 2, 4)), "q_lora_a": np.ones((4, 2))},
                        "mlp": {"router": np.ones((4, 3)), "gate": np.ones((3, 4, 8))},
                        "shared_mlp": {"down": np.ones((8, 4))}}]}
  quantized = quantization.quantize_params(params, "int8")
  block = quantized["blocks"][0]
  assert [quantization.is_quantized(leaf) for leaf in (
      quantized["embedding"], block["attention"]["o"], block["shared_mlp"]["down"])] == [True] * 3
  assert not any(quantization.is_quantized(leaf) for leaf in (
      quantized["final_norm"]["scale"], quantized["vision"]["patch"],
      block["attention"]["q_lora_a"], block["mlp"]["router"]))
  assert block["attention"]["o"].scale.shape == (1, 1, 4)
  assert quantized["embedding"].scale.shape == (8, 1)
  assert block["mlp"]["gate"].scale.shape == (3, 1, 8)  # MoE experts: one scale per expert


def test_int8_expert_matmuls_equal_numpy_integer_matmuls_per_expert():
  """MoE experts [experts, in, out]: the dropless path's grouped matmul over copies sorted by
  expert, and the capacity path's per-expert buffers."""
  rng = np.random.default_rng(9)
  weight = rng.normal(size=(3, 8, 12)).astype(np.float32)
  kernel = quantization.quantize_int8(weight, (1,))
  w_values, w_step = numpy_int8(weight.astype(np.float64), 1)
  row_experts = np.array([0, 0, 2, 2, 2, 2])  # expert 1 gets no copy
  copies = rng.normal(size=(6, 8)).astype(np.float32)
  copies[3] = 0.0
  got = quantization.grouped_dense(jnp.asarray(copies), kernel, jnp.asarray([2, 0, 4]),
                                   jnp.asarray(row_experts))
  x_values, x_step = numpy_int8(copies.astype(np.float64), -1)
  expected = np.stack([(x_values[row] @ w_values[e]) * x_step[row] * w_step[e, 0]
                       for row, e in enumerate(row_experts)])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  buffers = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)  # [batch, experts, capacity, in]
  got = quantization.per_group_dense(jnp.asarray(buffers), kernel)
  x_values, x_step = numpy_int8(buffers.astype(np.float64), -1)
  expected = np.einsum("becd,edf->becf", x_values, w_values) * x_step * w_step
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> np.ndarray:
  log_p, log_q = log_softmax(logits_p), log_softmax(logits_q)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def assert_near_float(engine: Engine, reduced: Engine, max_kl: float, min_agreement: float):
  """`reduced` (the same run at lower precision) differs from `engine`'s logits, but by at most
  `max_kl` nats on average, and picks the same argmax at `min_agreement` of the positions."""
  token_ids = engine.encode(Path(textwrap.__file__).read_text()[:400])[:60]
  approx, exact = reduced.logits_without_cache(token_ids), engine.logits_without_cache(token_ids)
  assert not np.allclose(approx, exact, rtol=1e-4, atol=1e-4)
  assert kl_divergence(exact, approx).mean() < max_kl
  assert (approx.argmax(-1) == exact.argmax(-1)).mean() >= min_agreement


def served_greedy(engine: Engine, prompt_ids: list[int], tokens: int) -> list[int]:
  orchestrator = Orchestrator(engine).start()
  greedy = [d.token_id for d in orchestrator.generate(
      prompt_ids, max_tokens=tokens, settings=SamplingSettings(temperature=0.0))]
  orchestrator.shutdown(grace_s=10)
  return greedy


def test_int8_engine_stays_near_float_and_its_paged_decode_equals_its_full_recompute(run_dir):
  engine = Engine.from_checkpoint(run_dir, slots=2)
  int8 = Engine.from_checkpoint(run_dir, slots=2, quantize="int8")
  assert quantization.nbytes(int8.params) < 0.3 * quantization.nbytes(engine.params)
  # INIT_SCALE's sharp random model amplifies rounding: weight-only int8 measured KL 0.06 here
  assert_near_float(engine, int8, max_kl=0.15, min_agreement=0.8)
  prompt_ids = engine.encode(PROMPT)
  assert served_greedy(int8, prompt_ids, 8) == int8.greedy_decode_without_cache(prompt_ids, 8)


def test_an_int8_moe_engine_keeps_its_experts_int8_and_stays_near_float(tmp_path):
  """Experts hold most of an MoE model's weights: int8 at rest and inside the program (the
  dropless path's grouped matmuls take the int8 values), the logits near float32's, and
  paged decode equal to the full recompute."""
  tokenizer_file = train_tokenizer(tmp_path)
  vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()
  config = ModelConfig(vocab_size=vocab_size, num_layers=2, embed_dim=64, num_heads=4,
                       num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=CONTEXT,
                       num_experts=8, experts_per_token=2, moe_mlp_dim=32,
                       num_shared_experts=1, first_dense_layers=1)
  save_random_checkpoint(tmp_path / "run", config,
                         hashlib.sha256(tokenizer_file.read_bytes()).hexdigest())
  shutil.copy(tokenizer_file, tmp_path / "run" / "tokenizer.model")
  engine = Engine.from_checkpoint(tmp_path / "run", slots=2)
  int8 = Engine.from_checkpoint(tmp_path / "run", slots=2, quantize="int8")
  experts = [block["mlp"][name] for block in int8.params["blocks"].values()
             if "router" in block["mlp"] for name in ("gate", "up", "down")]
  assert len(experts) == 3 and all(quantization.is_quantized(kernel) for kernel in experts)
  assert quantization.nbytes(int8.params) < 0.3 * quantization.nbytes(engine.params)
  rows, table = np.full(1, int8.slots, np.int32), np.zeros((1, 1), np.int32)
  text = int8._step.lower(int8.params, int8.init_decode_state(), rows, table).compile().as_text()
  signature = entry_signature(text)
  for kernel in experts:
    assert f"s8[{shape_text(kernel.values.shape)}]" in signature
  for shape in float_copy_shapes({"experts": experts}):
    assert not re.search(rf"f32\[{shape}\]", text), shape
  assert_near_float(engine, int8, max_kl=0.15, min_agreement=0.8)
  prompt_ids = engine.encode(PROMPT)
  assert served_greedy(int8, prompt_ids, 8) == int8.greedy_decode_without_cache(prompt_ids, 8)


def test_an_int8_dense_cache_rounds_keys_and_values_as_the_paged_pool_does():
  """The eval harness' `--kv_cache_dtype=int8` scores through this cache."""
  rng = np.random.default_rng(3)
  batch, seq, kv_heads, heads, head_dim = 2, 7, 2, 4, 8
  keys, values = (rng.normal(size=(batch, seq, kv_heads, head_dim)) for _ in range(2))
  cache = kv_cache.empty(1, batch, seq, kv_heads, head_dim, jnp.int8)[0]
  positions = np.broadcast_to(np.arange(seq), (batch, seq))
  cache = kv_cache.write(cache, *(jnp.asarray(a, jnp.float32) for a in (keys, values)),
                         jnp.asarray(positions))
  assert cache["k"].dtype == jnp.int8 and cache["v_scale"].shape == (batch, kv_heads, seq)
  q = rng.normal(size=(batch, seq, heads, head_dim))
  out = kv_cache.attend(cache, jnp.asarray(q, jnp.float32), jnp.asarray(positions))
  expected = numpy_attention(q, numpy_int8_rows(keys), numpy_int8_rows(values), positions)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_a_bfloat16_engine_holds_bfloat16_weights_and_cache_and_decodes_as_it_recomputes(
    run_dir):
  engine = Engine.from_checkpoint(run_dir, slots=2)
  bf16 = Engine.from_checkpoint(run_dir, slots=2, dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
  assert quantization.nbytes(bf16.params) * 2 == quantization.nbytes(engine.params)
  pools = bf16.init_decode_state().pools
  assert {leaf.dtype for leaf in jax.tree.leaves(pools)} == {jnp.dtype(jnp.bfloat16)}
  assert_near_float(engine, bf16, max_kl=0.05, min_agreement=0.9)
  prompt_ids = engine.encode(PROMPT)
  greedy = served_greedy(bf16, prompt_ids, 8)
  # bfloat16 rounds the cached and the recomputed paths differently, so at a near tie they may
  # pick different tokens: each paged choice must be the recompute's argmax up to that rounding
  recomputed = bf16.logits_without_cache(prompt_ids + greedy)[len(prompt_ids) - 1:-1]
  chosen = recomputed[np.arange(len(greedy)), greedy]
  np.testing.assert_array_less(recomputed.max(-1) - chosen, 0.05)


def test_a_serving_dtype_other_than_float32_or_bfloat16_is_refused_naming_the_flag():
  with pytest.raises(ValueError, match="--dtype=float16; use auto, float32 or bfloat16"):
    with_serving_dtype({}, None, "float16")


def decode_program(engine: Engine, rows: int) -> str:
  """The compiled text of `engine`'s decode step over `rows` rows."""
  table = np.zeros((rows, engine.max_blocks), np.int32)
  return engine._step.lower(engine.params, engine.init_decode_state(),
                            np.full(rows, engine.slots, np.int32), table).compile().as_text()


def test_a_tied_bfloat16_engine_multiplies_by_a_transposed_copy_and_decodes_as_before(
    tmp_path, monkeypatch):
  """XLA:CPU converted a tied bfloat16 embedding to float32 for every logits product; the
  engine keeps it transposed as an unembedding, and serves the same logits and tokens."""
  tokenizer_file = train_tokenizer(tmp_path)
  vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()
  config = ModelConfig(vocab_size=vocab_size, num_layers=2, embed_dim=64, num_heads=4,
                       num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=CONTEXT,
                       tie_embeddings=True)
  save_random_checkpoint(tmp_path / "run", config,
                         hashlib.sha256(tokenizer_file.read_bytes()).hexdigest())
  shutil.copy(tokenizer_file, tmp_path / "run" / "tokenizer.model")
  bf16 = Engine.from_checkpoint(tmp_path / "run", slots=2, dtype="bfloat16")
  assert not bf16.config.tie_embeddings
  np.testing.assert_array_equal(bf16.params["unembedding"], bf16.params["embedding"].T)
  for unchanged in (Engine.from_checkpoint(tmp_path / "run", slots=2),  # float32
                    Engine.from_checkpoint(tmp_path / "run", slots=2, dtype="bfloat16",
                                           quantize="int8")):
    assert unchanged.config.tie_embeddings and "unembedding" not in unchanged.params
  monkeypatch.setattr(engine_module, "with_canonical_unembedding", lambda *args: args[:2])
  tied = Engine.from_checkpoint(tmp_path / "run", slots=2, dtype="bfloat16")
  assert tied.config.tie_embeddings
  token_ids = tied.encode(PROMPT)
  # logits of std ~4 here: a bfloat16 rounding of the products is 2**-9 of them
  np.testing.assert_allclose(bf16.logits_without_cache(token_ids),
                             tied.logits_without_cache(token_ids), rtol=1e-2, atol=1e-2)
  assert served_greedy(bf16, token_ids, 8) == served_greedy(tied, token_ids, 8)
  converted_embedding = rf"f32\[{vocab_size},64\]"
  assert re.search(converted_embedding, decode_program(tied, 2))
  assert not re.search(converted_embedding, decode_program(bf16, 2))


def test_a_bfloat16_engine_decodes_one_request_with_products_that_stay_bfloat16(run_dir):
  """One bfloat16 row times a weight XLA:CPU ran as a float32 matrix-vector product, every
  weight converted each step; `layers.dense` multiplies one row beside a zero row."""
  bf16 = Engine.from_checkpoint(run_dir, slots=4, dtype="bfloat16")
  assert not re.search(FLOAT32_DOT, decode_program(bf16, 1))
  assert not re.search(FLOAT32_DOT, decode_program(bf16, 2))
  prompt_ids = bf16.encode(PROMPT)
  greedy = served_greedy(bf16, prompt_ids, 8)  # one request alone: a one-row decode step
  recomputed = bf16.logits_without_cache(prompt_ids + greedy)[len(prompt_ids) - 1:-1]
  chosen = recomputed[np.arange(len(greedy)), greedy]
  np.testing.assert_array_less(recomputed.max(-1) - chosen, 0.05)
