"""serving.paged_prefill through the engine and orchestrator: prompts prefilled into the pool
after their cached prefix, in chunks between decode steps, against decoding without a cache."""

import math
import queue

from test_paged_kv import (  # noqa: F401 - the fixtures
  BLOCK_SIZE,
  GREEDY,
  model,
  prompts,
  reference,
  staggered,
  tokenizer,
)

from maxlm.model import paged_kv
from serving.engine import Engine
from serving.orchestrator import Orchestrator, Request


def make_engine(model, tokenizer, **options) -> Engine:  # noqa: F811
  graphdef, params, config = model
  return Engine(graphdef, params, config, tokenizer, model_name="prefill", slots=4,
                block_size=BLOCK_SIZE, **options)


def run(engine: Engine, requests, gap_s: float = 0.02) -> tuple[list[list[int]], Orchestrator]:
  orchestrator = Orchestrator(engine).start()
  try:
    return staggered(orchestrator, requests, gap_s), orchestrator
  finally:
    orchestrator.shutdown(grace_s=10)


def prefill_alone(engine: Engine, state, slot: int, prompt_ids: list[int]):
  """(state, tokens served from the cache, tokens computed, first new token)."""
  computed = engine.prefills.computed_tokens
  cached = engine.begin_prefill(slot, prompt_ids, GREEDY)
  choice = None
  while engine.prefills.pending:
    [(chunk_slot, tokens)] = engine.prefill_plan()
    state, choice = engine.prefill_chunk(state, chunk_slot, tokens)
  return state, cached, engine.prefills.computed_tokens - computed, int(choice.token[0])


def sharing_a_prefix(tokenizer, prefix_len: int, tail_lens: list[int]) -> list[list[int]]:  # noqa: F811
  shared = prompts(tokenizer, [prefix_len])[0]
  tails = prompts(tokenizer, [1] * 3 + [n + 1 for n in tail_lens])[3:]
  return [shared + tail[1:] for tail in tails]


def test_greedy_output_with_prefix_caching_equals_decoding_without_cache_for_interleaved_arrivals(
    model, tokenizer):  # noqa: F811
  engine = make_engine(model, tokenizer)
  shared_prompts = sharing_a_prefix(tokenizer, 13, [0, 5, 2, 9, 3, 0])
  requests = list(zip(shared_prompts, [10, 8, 12, 6, 9, 7]))
  results, orchestrator = run(engine, requests)
  assert results == reference(engine, requests)
  hits = orchestrator.metrics.prefix_cache_hits._value.get()
  assert hits == 12 * 5  # every later arrival: the 12 tokens of the prefix's 3 full blocks
  assert b"maxlm_prefix_cache_hit_rate" in orchestrator.metrics.exposition()
  assert engine.pages.allocator.referenced == 0
  assert engine.pages.allocator.free == engine.capacity.blocks


def test_a_shared_prefix_request_prefills_only_its_uncached_tail(model, tokenizer):  # noqa: F811
  engine = make_engine(model, tokenizer)
  first, second = sharing_a_prefix(tokenizer, 18, [0, 5])
  state = engine.init_decode_state()
  state, cached, computed, _ = prefill_alone(engine, state, 0, first)
  assert (cached, computed) == (0, 18)
  engine.release(0)
  state, cached, computed, token = prefill_alone(engine, state, 1, second)
  assert (cached, computed) == (16, len(second) - 16)  # blocks 0-3 of the shared 18 tokens
  assert token == engine.greedy_decode_without_cache(second, 1)[0]
  engine.release(1)
  assert engine.pages.allocator.referenced == 0


def test_without_prefix_caching_every_prompt_token_is_prefilled(model, tokenizer):  # noqa: F811
  engine = make_engine(model, tokenizer, prefix_caching=False)
  first, second = sharing_a_prefix(tokenizer, 18, [0, 5])
  state = engine.init_decode_state()
  state, _, _, _ = prefill_alone(engine, state, 0, first)
  engine.release(0)
  state, cached, computed, _ = prefill_alone(engine, state, 1, second)
  assert (cached, computed) == (0, len(second))


def test_chunked_prefill_greedy_output_equals_decoding_without_cache(model, tokenizer):  # noqa: F811
  engine = make_engine(model, tokenizer, max_prefill_chunk=5)  # chunks end mid-block
  some = prompts(tokenizer, [1, 6, 13, 17, 23])
  requests = list(zip(some + [some[3]], [12, 9, 14, 11, 6, 8]))
  results, _ = run(engine, requests)
  assert results == reference(engine, requests)
  assert engine.pages.allocator.free == engine.capacity.blocks


def test_under_a_tiny_pool_shared_and_chunked_prompts_still_match_and_free_every_block(
    model, tokenizer):  # noqa: F811
  _, _, config = model
  block_bytes = paged_kv.block_bytes(config.num_layers, BLOCK_SIZE, config.num_kv_heads,
                                     config.head_dim, config.dtype)
  engine = make_engine(model, tokenizer, max_prefill_chunk=6,  # 10 blocks: 1 or 2 at a time
                       kv_cache_memory=11 * block_bytes / 2**30)
  requests = list(zip(sharing_a_prefix(tokenizer, 9, [0, 6, 3, 8]), [14, 10, 16, 9]))
  results, orchestrator = run(engine, requests, gap_s=0.0)
  assert results == reference(engine, requests)
  assert orchestrator.metrics.preemptions._value.get() > 0
  assert engine.pages.allocator.referenced == 0
  assert engine.pages.allocator.free == engine.capacity.blocks


class RecordingEngine:
  """The engine, recording its prompt chunks and decode steps in order."""

  def __init__(self, engine: Engine):
    self.engine, self.calls = engine, []

  def prefill_chunk(self, state, slot, tokens):
    self.calls.append(("chunk", slot))
    return self.engine.prefill_chunk(state, slot, tokens)

  def generate(self, state):
    self.calls.append(("decode", None))
    return self.engine.generate(state)

  def __getattr__(self, name):
    return getattr(self.engine, name)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_requests_decode_steps(
    model, tokenizer):  # noqa: F811
  recording = RecordingEngine(make_engine(model, tokenizer, max_prefill_chunk=4))
  short, long = prompts(tokenizer, [3, 25])
  orchestrator = Orchestrator(recording).start()
  try:
    running = queue.Queue()
    orchestrator.submit(Request(short, max_tokens=25, emit=running.put, settings=GREEDY,
                                ignore_eos=True))
    running.get(timeout=60)  # it decodes now
    arriving = orchestrator.generate(long, max_tokens=5, settings=GREEDY, ignore_eos=True)
  finally:
    orchestrator.shutdown(grace_s=10)
  [long_slot] = {slot for kind, slot in recording.calls[1:] if kind == "chunk"}
  chunks = [i for i, (kind, slot) in enumerate(recording.calls) if slot == long_slot and i]
  assert len(chunks) == math.ceil(25 / 4)
  decode_steps = [kind for kind, _ in recording.calls[chunks[0]:chunks[-1]]].count("decode")
  assert decode_steps >= len(chunks) - 1
  assert [d.token_id for d in arriving] == engine_reference(recording.engine, long, 5)


def engine_reference(engine: Engine, prompt_ids: list[int], tokens: int) -> list[int]:
  return engine.greedy_decode_without_cache(prompt_ids, tokens, stop_at_eos=False)


def test_the_server_turns_prefix_caching_on_by_default_as_vllm_v1_does():
  from serving.server import parse_args
  assert parse_args(["--checkpoint_dir=x"]).enable_prefix_caching
  assert not parse_args(["--checkpoint_dir=x", "--no-enable_prefix_caching"]
                        ).enable_prefix_caching
  assert parse_args(["--checkpoint_dir=x", "--max_prefill_chunk=64"]).max_prefill_chunk == 64
