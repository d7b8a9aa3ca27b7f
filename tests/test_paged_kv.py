"""The paged KV cache (maxlm.model.paged_kv, maxlm.paged_sampling, serving.kv_pages) against
NumPy attention in float64 and against decoding without any cache, under memory pressure too."""

import math
import queue
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

import kernels_pallas
from maxlm.model import ModelConfig, Transformer, paged_kv
from serving import kv_pages
from serving.engine import Engine, SamplingSettings
from serving.orchestrator import Orchestrator, Request

BLOCK_SIZE = 4
CONTEXT = 32
GREEDY = SamplingSettings(temperature=0.0)


# --- attention through block tables ------------------------------------------------------------

def numpy_attention(q, keys, values, positions):
  """q: [batch, q_len, heads, d]; keys, values: [batch, seq, kv_heads, d] in position order;
  each query sees positions <= its own."""
  batch, q_len, heads, head_dim = q.shape
  group = heads // keys.shape[2]
  out = np.zeros(q.shape)
  for b in range(batch):
    for i in range(q_len):
      seen = positions[b, i] + 1
      for h in range(heads):
        scores = keys[b, :seen, h // group] @ q[b, i, h] / math.sqrt(head_dim)
        weights = np.exp(scores - scores.max())
        out[b, i, h] = weights / weights.sum() @ values[b, :seen, h // group]
  return out


def random_tables(rng, batch: int, width: int, num_blocks: int) -> np.ndarray:
  """Every row gets distinct blocks in a random order (never block 0, the trash block)."""
  return (rng.permutation(num_blocks - 1)[:batch * width] + 1).reshape(batch, width)


def assert_paged_attention_equals_numpy_in_float64(rng, width: int, positions: np.ndarray,
                                                   kv_heads: int = 2, heads: int = 6,
                                                   head_dim: int = 8):
  """Keys and values for every position of `width` random blocks per row, written through
  the pool; queries at `positions` [batch, q_len] attend through `attend`."""
  batch, q_len = positions.shape
  seq = width * BLOCK_SIZE
  with jax.enable_x64(True):
    table = random_tables(rng, batch, width, num_blocks=40)
    keys, values = (rng.normal(size=(batch, seq, kv_heads, head_dim)) for _ in range(2))
    pool = paged_kv.empty(1, 40, BLOCK_SIZE, kv_heads, head_dim, jnp.float64)[0]
    layer = paged_kv.write({**pool, "block_table": jnp.asarray(table)}, jnp.asarray(keys),
                           jnp.asarray(values), jnp.broadcast_to(jnp.arange(seq), (batch, seq)))
    q = rng.normal(size=(batch, q_len, heads, head_dim))
    out = paged_kv.attend(layer, jnp.asarray(q), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, keys, values, positions),
                               rtol=1e-12, atol=1e-12)


def test_paged_attention_equals_numpy_in_float64_for_random_block_tables():
  lengths = np.array([3, 11, 20])  # a row inside its first block, one mid-table, one full
  assert_paged_attention_equals_numpy_in_float64(np.random.default_rng(0), width=5,
                                                 positions=lengths[:, None] - 2 + np.arange(2))


def test_a_decode_step_attends_like_numpy_in_float64_a_chunk_of_blocks_at_a_time():
  """One query per row through `attend` (the CPU decode path): a table of 7 blocks read in
  chunks of 4 (so the last chunk is padded), rows ending in the first and the second chunk."""
  assert_paged_attention_equals_numpy_in_float64(np.random.default_rng(3), width=7,
                                                 positions=np.array([[2], [17], [27]]))


@pytest.mark.parametrize("q_len", [1, 3])  # a decode step; a prefill chunk
def test_chunked_attention_reads_no_block_past_the_chunk_of_its_furthest_position(q_len):
  """The blocks a table names past the live ones hold NaN: read at all, they would turn the
  output NaN (a masked NaN value still multiplies a zero weight). Chunks of 2 blocks over 4
  live ones: the rows end in the first and the second chunk, the queries of a prefill chunk
  straddle a chunk's edge, and each row's result equals float64 NumPy."""
  rng = np.random.default_rng(4)
  batch, width, live, kv_heads, heads, head_dim = 2, 8, 4, 1, 2, 8
  seq = live * BLOCK_SIZE
  table = random_tables(rng, batch, width, num_blocks=40)
  keys, values = (rng.normal(size=(batch, seq, kv_heads, head_dim)) for _ in range(2))
  pool = {name: jnp.full((kv_heads, 40, BLOCK_SIZE, head_dim), jnp.nan) for name in "kv"}
  layer = paged_kv.write({**pool, "block_table": jnp.asarray(table)},
                         *(jnp.asarray(a, jnp.float32) for a in (keys, values)),
                         jnp.broadcast_to(jnp.arange(seq), (batch, seq)))
  positions = np.array([[5], [seq - 1]]) - q_len + 1 + np.arange(q_len)
  q = rng.normal(size=(batch, q_len, heads, head_dim))
  out = paged_kv.chunked_attend(layer, jnp.asarray(q, jnp.float32), jnp.asarray(positions),
                                chunk_blocks=2)
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, keys, values, positions),
                             rtol=1e-5, atol=1e-5)


def numpy_int8_rows(rows: np.ndarray) -> np.ndarray:
  """rows [..., d] rounded to int8 with one step per row, back in float64."""
  step = np.abs(rows).max(axis=-1, keepdims=True) / 127
  step[step == 0] = 1
  return np.clip(np.round(rows / step), -127, 127) * step


def test_an_int8_pool_attends_like_numpy_over_per_token_and_head_rounded_keys_and_values():
  rng = np.random.default_rng(1)
  batch, width, kv_heads, heads, head_dim, q_len = 3, 5, 2, 6, 8, 1
  seq = width * BLOCK_SIZE
  table = random_tables(rng, batch, width, num_blocks=40)
  keys, values = (rng.normal(size=(batch, seq, kv_heads, head_dim)) for _ in range(2))
  pool = paged_kv.empty(1, 40, BLOCK_SIZE, kv_heads, head_dim, jnp.int8)[0]
  assert pool["k"].dtype == jnp.int8 and pool["k_scale"].shape == (kv_heads, 40, BLOCK_SIZE)
  layer = paged_kv.write({**pool, "block_table": jnp.asarray(table)},
                         *(jnp.asarray(a, jnp.float32) for a in (keys, values)),
                         jnp.broadcast_to(jnp.arange(seq), (batch, seq)))
  positions = np.array([[2], [11], [19]])
  q = rng.normal(size=(batch, q_len, heads, head_dim))
  out = paged_kv.attend(layer, jnp.asarray(q, jnp.float32), jnp.asarray(positions))
  expected = numpy_attention(q, numpy_int8_rows(keys), numpy_int8_rows(values), positions)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(out) - numpy_attention(q, keys, values, positions)).max() > 1e-4


def test_an_int8_block_takes_its_bytes_plus_a_float32_scale_per_token_and_head():
  float_bytes = paged_kv.block_bytes(2, 16, 4, 64, jnp.float32)
  assert float_bytes == 2 * 2 * 16 * 4 * 64 * 4
  assert paged_kv.block_bytes(2, 16, 4, 64, jnp.int8) == 2 * 2 * 16 * 4 * (64 + 4)


def test_a_write_lands_in_the_block_its_table_names():
  table = np.array([[7, 2]])
  pool = paged_kv.empty(1, 8, BLOCK_SIZE, 1, 1, jnp.float32)[0]
  k = jnp.ones((1, 1, 1, 1))
  layer = paged_kv.write({**pool, "block_table": jnp.asarray(table)}, k, k * 2,
                         jnp.array([[BLOCK_SIZE + 1]]))
  assert np.argwhere(np.asarray(layer["k"])).tolist() == [[0, 2, 1, 0]]
  assert float(layer["v"][0, 2, 1, 0]) == 2.0


# --- the host's books --------------------------------------------------------------------------

def test_blocks_are_allocated_as_a_sequence_grows_and_all_return_at_its_end():
  pages = kv_pages.PageTables(kv_pages.BlockAllocator(6), slots=2, block_size=4, max_blocks=8)
  assert pages.assign(0, 5) == [1, 2]
  for _ in range(3):  # positions 5, 6, 7 fit the second block
    pages.grow([0])
    pages.advance([0])
  assert len(pages.blocks[0]) == 2
  pages.grow([0])  # position 8 opens a third
  assert len(pages.blocks[0]) == 3 and pages.allocator.free == 3
  pages.release(0)
  assert pages.allocator.free == 6 and pages.active() == []


def test_a_dry_pool_raises_pool_exhausted_and_fits_says_so_first():
  pages = kv_pages.PageTables(kv_pages.BlockAllocator(2), slots=2, block_size=4, max_blocks=8)
  pages.assign(0, 8)
  assert not pages.fits(1)
  with pytest.raises(kv_pages.PoolExhausted):
    pages.grow([0])


def test_batches_and_tables_are_padded_to_powers_of_two_within_their_limit():
  assert [kv_pages.bucket(n, 12) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
  assert kv_pages.buckets(12) == [1, 2, 4, 8, 12]


def test_a_memory_budget_too_small_for_one_block_names_the_fix():
  with pytest.raises(ValueError, match="raise it to at least"):
    kv_pages.capacity(block_bytes=2**20, block_size=16, kv_cache_memory_gib=0.0001, slots=8,
                      context_length=64)


# --- the engine and orchestrator over the pool -------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> spm.SentencePieceProcessor:
  lines = [line for line in Path(textwrap.__file__).read_text().splitlines() if line.strip()]
  prefix = tmp_path_factory.mktemp("spm") / "spm"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=384,
      byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


@pytest.fixture(scope="module")
def model(tokenizer):
  config = ModelConfig(vocab_size=tokenizer.vocab_size(), num_layers=2, embed_dim=32,
                       num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=CONTEXT)
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda p: p * 2.0, nnx.to_pure_dict(state))  # sharper: varied greedy
  return graphdef, params, config


def make_engine(model, tokenizer, blocks: int | None = None, slots: int | None = 4,
                kv_cache_dtype: str | None = None) -> Engine:
  graphdef, params, config = model
  memory = None
  if blocks is not None:
    block_bytes = paged_kv.block_bytes(config.num_layers, BLOCK_SIZE, config.num_kv_heads,
                                       config.head_dim, kv_cache_dtype or config.dtype)
    memory = (blocks + 1) * block_bytes / 2**30
  return Engine(graphdef, params, config, tokenizer, model_name="paged", slots=slots,
                kv_cache_memory=memory, block_size=BLOCK_SIZE, kv_cache_dtype=kv_cache_dtype)


def staggered(orchestrator: Orchestrator, requests: list[tuple[list[int], int]],
              gap_s: float = 0.02) -> list[list[int]]:
  """Submits the requests `gap_s` apart (later ones join a batch already decoding); each
  one's generated ids."""
  outputs = [queue.Queue() for _ in requests]
  for (prompt_ids, max_tokens), output in zip(requests, outputs):
    orchestrator.submit(Request(prompt_ids, max_tokens=max_tokens, emit=output.put,
                                settings=GREEDY, ignore_eos=True))
    time.sleep(gap_s)
  results = []
  for output in outputs:
    ids = []
    while (item := output.get(timeout=120)) is not None:
      assert not isinstance(item, BaseException), item
      ids.append(item.token_id)
    results.append(ids)
  return results


def prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
  text = tokenizer.encode(Path(threading.__file__).read_text()[:4000])
  return [[tokenizer.bos_id()] + text[i * 7:i * 7 + n - 1] for i, n in enumerate(lengths)]


def reference(engine: Engine, requests) -> list[list[int]]:
  return [engine.greedy_decode_without_cache(ids, n, stop_at_eos=False) for ids, n in requests]


def test_greedy_output_with_paging_equals_decoding_without_cache_for_staggered_arrivals(
    model, tokenizer):
  engine = make_engine(model, tokenizer)
  requests = list(zip(prompts(tokenizer, [1, 6, 13, 3, 9, 17]), [12, 9, 14, 20, 6, 11]))
  orchestrator = Orchestrator(engine).start()
  try:
    results = staggered(orchestrator, requests)
  finally:
    orchestrator.shutdown(grace_s=10)
  assert results == reference(engine, requests)
  assert engine.pages.allocator.free == engine.capacity.blocks


def test_a_padding_row_stays_at_position_0_so_a_step_reads_only_the_live_rows_blocks(
    model, tokenizer):
  """A decode step reads up to its furthest position: a padding row that advanced like a real
  one would soon have every step read the whole table."""
  engine = make_engine(model, tokenizer)
  state = engine.init_decode_state()
  for slot, prompt_ids in enumerate(prompts(tokenizer, [3, 5, 2])):
    prefilled, _ = engine.prefill(prompt_ids, GREEDY)
    state = engine.insert(prefilled, state, slot)
  for _ in range(8):  # three slots decode in a batch of four: one padding row
    state, _ = engine.generate(state)
  assert int(state.positions[engine.slots]) <= 1
  assert list(np.asarray(state.positions[:3])) == [11, 13, 10]


def test_under_a_tiny_pool_the_youngest_is_preempted_and_every_request_still_matches(
    model, tokenizer):
  engine = make_engine(model, tokenizer, blocks=8)  # 32 tokens in flight: 1 to 2 at a time
  requests = list(zip(prompts(tokenizer, [5, 9, 3, 7, 11]), [14, 10, 18, 12, 9]))
  orchestrator = Orchestrator(engine).start()
  try:
    results = staggered(orchestrator, requests, gap_s=0.0)
  finally:
    orchestrator.shutdown(grace_s=10)
  assert results == reference(engine, requests)
  assert orchestrator.metrics.preemptions._value.get() > 0
  assert engine.pages.allocator.free == engine.capacity.blocks


def test_cancelled_and_finished_requests_leave_every_block_free(model, tokenizer):
  engine = make_engine(model, tokenizer, blocks=12)
  orchestrator = Orchestrator(engine).start()
  try:
    cancelled = Request(prompts(tokenizer, [9])[0], max_tokens=20, emit=lambda _: None,
                        settings=GREEDY, ignore_eos=True)
    orchestrator.submit(cancelled)
    cancelled.cancel()
    staggered(orchestrator, list(zip(prompts(tokenizer, [4, 8]), [5, 7])))
  finally:
    orchestrator.shutdown(grace_s=10)
  assert engine.pages.active() == []
  assert engine.pages.allocator.free == engine.capacity.blocks


def test_a_memory_budget_sets_the_slots_and_caps_the_context(model, tokenizer):
  engine = make_engine(model, tokenizer, blocks=6, slots=None)
  assert (engine.capacity.blocks, engine.slots) == (6, 6)
  assert engine.context_length == 6 * BLOCK_SIZE
  assert "24 tokens in flight" in engine.describe_cache()


def test_an_int8_kv_cache_decodes_the_float_caches_greedy_tokens(model, tokenizer):
  engine = make_engine(model, tokenizer, blocks=24, kv_cache_dtype="int8")
  assert engine.describe_cache().startswith("int8 KV cache")
  assert engine.capacity.blocks == 24  # the budget paid for int8 blocks, not float32 ones
  requests = list(zip(prompts(tokenizer, [3, 8, 12]), [4, 4, 4]))
  orchestrator = Orchestrator(engine).start()
  try:
    results = staggered(orchestrator, requests)
  finally:
    orchestrator.shutdown(grace_s=10)
  assert results == reference(make_engine(model, tokenizer), requests)


# --- the ragged Pallas kernel ------------------------------------------------------------------

def kernel_inputs(rng, batch=4, width=6, kv_heads=2, heads=6, head_dim=16, num_blocks=40):
  table = random_tables(rng, batch, width, num_blocks)
  pools = [rng.normal(size=(kv_heads, num_blocks, BLOCK_SIZE, head_dim)) for _ in range(2)]
  q = rng.normal(size=(batch, heads, head_dim))
  lengths = np.array([1, 7, width * BLOCK_SIZE, 12])[:batch]  # one position, mid-block, full
  return q, *pools, table, lengths


def in_position_order(pool, table):
  """[kv_heads, blocks, block_size, d] through table [batch, width] -> [batch, seq, kv_heads, d]."""
  rows = pool[:, table]                                  # [kv, batch, width, block_size, d]
  return rows.reshape(*rows.shape[:2], -1, rows.shape[-1]).transpose(1, 2, 0, 3)


def test_the_ragged_pallas_kernel_equals_numpy_in_float64_in_interpret_mode():
  q, k_pool, v_pool, table, lengths = kernel_inputs(np.random.default_rng(1))
  with jax.enable_x64(True):
    out = kernels_pallas.paged_attention(*(jnp.asarray(x) for x in (q, k_pool, v_pool, table,
                                                                     lengths)), interpret=True)
  expected = numpy_attention(q[:, None], in_position_order(k_pool, table),
                             in_position_order(v_pool, table), lengths[:, None] - 1)[:, 0]
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)


def test_the_ragged_pallas_kernel_equals_the_gather_path_in_float32():
  q, k_pool, v_pool, table, lengths = (x.astype(np.float32) if x.dtype == np.float64 else x
                                       for x in kernel_inputs(np.random.default_rng(2)))
  layer = {"k": jnp.asarray(k_pool), "v": jnp.asarray(v_pool), "block_table": jnp.asarray(table)}
  gathered = paged_kv.gathered_attend(layer, jnp.asarray(q)[:, None],
                                      jnp.asarray(lengths)[:, None] - 1)[:, 0]
  kernel = kernels_pallas.paged_attention(jnp.asarray(q), layer["k"], layer["v"],
                                          layer["block_table"], jnp.asarray(lengths),
                                          interpret=True)
  np.testing.assert_allclose(np.asarray(kernel), np.asarray(gathered), rtol=2e-5, atol=2e-5)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_a_decode_step_lowers_to_the_kernel_for_cuda_and_to_the_gather_on_cpu():
  """Lowering only: compiling needs the GPU. A decode step's attention (one query per row)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=1,
                                       platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)
  layer = {name: jax.ShapeDtypeStruct((2, 40, 16, 64), jnp.bfloat16) for name in "kv"}
  layer["block_table"] = jax.ShapeDtypeStruct((8, 4), jnp.int32)
  q = jax.ShapeDtypeStruct((8, 1, 6, 64), jnp.bfloat16)
  positions = jax.ShapeDtypeStruct((8, 1), jnp.int32)
  unchecked = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with jax.sharding.use_abstract_mesh(mesh):
    cuda = jax.export.export(jax.jit(paged_kv.attend), platforms=["cuda"],
                             disabled_checks=unchecked)(layer, q, positions)
  assert "__gpu$xla.gpu.triton" in cuda.mlir_module()
  cpu = jax.export.export(jax.jit(paged_kv.attend), platforms=["cpu"])(layer, q, positions)
  assert "triton" not in cpu.mlir_module()


def test_a_pool_past_the_devices_free_memory_is_refused_naming_the_flags():
  pool = kv_pages.capacity(block_bytes=2**20, block_size=16, kv_cache_memory_gib=2.0, slots=8,
                           context_length=1024)
  kv_pages.check_fits(pool, free_bytes=3 * 2**30)
  kv_pages.check_fits(pool, free_bytes=None)
  with pytest.raises(ValueError, match="would take 2.0 GiB but the device has 1.0 GiB free; "
                     "lower --kv_cache_memory or --slots"):
    kv_pages.check_fits(pool, free_bytes=2**30)
