"""serving.scoring_cache: prompts scored in earlier requests lend their keys, values and scores
to later ones that begin alike; each prompt's results against its own scored prefill
(`Engine.prefill_scored`, the single-prompt path with no cache of scored prompts)."""

import threading

import numpy as np
import pytest
from test_scoring import app_client, scored
from test_serving import CONTEXT, random_run

from maxlm.model import kv_cache
from serving import scoring, scoring_cache
from serving.engine import Engine, SamplingSettings
from serving.scoring import Scorer

GREEDY = SamplingSettings(temperature=0.0)
# The reference attends with `layers.causal_attention`, these prompts with the KV cache's
# packed-context attention; each is as near a float64 attention as the other
# (test_packed_context_attention_equals_a_float64_reference), and float32 rounds them apart
# by about 4e-6 of this random model's logits (up to 20; hidden states up to 62), which every
# log-probability carries through its normalizer: up to 4e-5 here. A reused position or an
# offset off by one moves them by whole nats.
ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
  return Engine.from_checkpoint(random_run(tmp_path_factory), slots=2)


def assert_as_own_prefill(engine, prompt, setting, request, items, top):
  _, choice, scores = engine.prefill_scored(prompt, setting)
  np.testing.assert_allclose(request.prompt_logprobs.logprobs,
                             np.asarray(scores.logprobs)[0, 1:len(prompt)], atol=ATOL)
  np.testing.assert_array_equal(request.prompt_logprobs.top_tokens,
                                np.asarray(scores.top_tokens)[0, 1:len(prompt), :top])
  np.testing.assert_allclose(request.prompt_logprobs.top_logprobs,
                             np.asarray(scores.top_logprobs)[0, 1:len(prompt), :top],
                             atol=ATOL)
  [delta, end] = items
  assert end is None and delta.token_id == int(choice.token[0])
  np.testing.assert_allclose(delta.logprob, float(choice.logprob[0]), atol=ATOL)


def reused_tokens(scorer: Scorer) -> int:
  return int(scorer.metrics.prefix_cache_hits._value.get())


def test_choices_sent_apart_reuse_their_context_and_score_as_each_prompt_own_prefill(engine):
  """lm-eval's longest-first order sends an item's choices in different requests: the later
  ones compute only what follows the beginning they share with the first. Reused positions
  are min(shared, length) - 1 a prompt: 29 + 29 for two choices after a 30-token context, 0
  for an unrelated prompt, 37 for the first prompt sent again, 9 for the context's first 10
  tokens alone; greedy and sampled first tokens."""
  rng = np.random.default_rng(0)
  bos = engine.tokenizer.bos_id()
  context = [bos, *map(int, rng.integers(4, 300, 29))]
  first = context + [11, 12, 13, 14, 15, 16, 17, 18]
  later = [context + [21, 22, 23], context + [31 + i for i in range(12)],
           [bos, *map(int, rng.integers(4, 300, 14))]]
  again = [first, context[:10]]
  settings = [GREEDY, SamplingSettings(temperature=0.9, seed=7),
              SamplingSettings(temperature=1.3, top_p=0.8, seed=3)]
  scorer = Scorer(engine).start()
  try:
    batches = [(prompts, settings[:len(prompts)], scored(scorer, prompts, settings[:len(prompts)],
                                                         top=5))
               for prompts in ([first], later, again)]
  finally:
    scorer.stop()
  assert reused_tokens(scorer) == 29 + 29 + 0 + 37 + 9
  for prompts, prompt_settings, (requests, emitted) in batches:
    for prompt, setting, request, items in zip(prompts, prompt_settings, requests, emitted,
                                               strict=True):
      assert_as_own_prefill(engine, prompt, setting, request, items, top=5)


def test_a_pack_whose_program_has_not_compiled_runs_on_a_wider_one_meanwhile(engine):
  """After warmup, choices continuing a kept context make a pack whose program (its width,
  context width and windows) has not compiled: it runs on the widest warmed one, scoring as
  each prompt's own prefill, while its own compiles on the compiler's thread once asked for
  COMPILE_AFTER times; the next such pack runs on its own, narrower program."""
  rng = np.random.default_rng(3)
  bos = engine.tokenizer.bos_id()
  context = [bos, *map(int, rng.integers(4, 300, 21))]
  first, later = context + [5, 6, 7], [context + [8, 9], context + [10, 11, 12, 13]]
  scorer = Scorer(engine)
  scorer.warmup()
  calls, forward = [], scorer._score_context[1]

  def recorded(*arguments, **windows):
    calls.append((threading.current_thread().name, arguments[1].shape[1],
                  arguments[8].shape[2]))
    return forward(*arguments, **windows)

  scorer._score_context[1] = recorded
  scorer.start()
  try:
    for _ in range(scoring.COMPILE_AFTER):
      scorer.reset_cache()
      scored(scorer, [first], [GREEDY], top=1)
      calls.clear()
      requests, emitted = scored(scorer, later, [GREEDY] * 2, top=1)
      on_scorer = [call for call in calls if call[0] == "maxlm-scorer"]
      assert on_scorer == [("maxlm-scorer", CONTEXT, CONTEXT)]  # the warmed wide program
      for prompt, request, items in zip(later, requests, emitted):
        assert_as_own_prefill(engine, prompt, GREEDY, request, items, top=1)
    scorer._compiler.submit(lambda: None).result()  # its one thread: what was queued is done
    [(name, *own)] = [call for call in calls if call[0] != "maxlm-scorer"]
    assert name == "maxlm-scoring-compile_0"
    assert own[0] < CONTEXT and own[1] < CONTEXT
    scorer.reset_cache()
    scored(scorer, [first], [GREEDY], top=1)
    calls.clear()
    requests, emitted = scored(scorer, later, [GREEDY] * 2, top=1)
    assert calls == [("maxlm-scorer", *own)]
    for prompt, request, items in zip(later, requests, emitted):
      assert_as_own_prefill(engine, prompt, GREEDY, request, items, top=1)
  finally:
    scorer.stop()


def test_windows_narrower_than_a_row_needs_are_refused():
  segments, context_ids = np.array([1] * 40 + [0] * 8), np.array([1] * 40 + [0] * 8)
  owner = np.array([1] * 20 + [-1] * 12)
  lookback, window, _ = scoring_cache.attention_windows(segments, context_ids, owner)
  assert scoring_cache.attention_windows(segments, context_ids, owner, (48, 32))[:2] == (48, 32)
  with pytest.raises(ValueError, match="lookback of 32"):
    scoring_cache.attention_windows(segments, context_ids, owner, (16, 32))
  with pytest.raises(ValueError, match="context span of 20"):
    scoring_cache.attention_windows(segments, context_ids, owner, (48, 16))


def test_prompts_reusing_one_kept_prompt_start_together_and_count_what_they_reuse(engine):
  """Two prompts of one request that continue the same kept prompt, one after 20 shared
  tokens and one after 12, take its keys once and both start after 11: 22 positions reused,
  not 19 + 11; each scores as its own prefill."""
  rng = np.random.default_rng(4)
  kept_prompt = [engine.tokenizer.bos_id(), *map(int, rng.integers(4, 300, 23))]
  prompts = [kept_prompt[:20] + [7, 8], kept_prompt[:12] + [9, 10, 11]]
  scorer = Scorer(engine).start()
  try:
    scored(scorer, [kept_prompt], [GREEDY], top=1)
    requests, emitted = scored(scorer, prompts, [GREEDY] * 2, top=1)
  finally:
    scorer.stop()
  assert reused_tokens(scorer) == 11 + 11
  for prompt, request, items in zip(prompts, requests, emitted, strict=True):
    assert_as_own_prefill(engine, prompt, GREEDY, request, items, top=1)


def test_kept_prompts_with_fewer_alternatives_than_asked_are_not_reused(engine):
  """A prompt kept with one alternative a position (logprobs=1) lends nothing to a request
  asking for 5; one kept with 20 lends to a request asking for 1."""
  rng = np.random.default_rng(1)
  context = [engine.tokenizer.bos_id(), *map(int, rng.integers(4, 300, 19))]
  scorer = Scorer(engine).start()
  try:
    scored(scorer, [context + [5]], [GREEDY], top=1)
    [request], [items] = scored(scorer, [context + [6, 7]], [GREEDY], top=5)
    assert reused_tokens(scorer) == 0
    assert_as_own_prefill(engine, context + [6, 7], GREEDY, request, items, top=5)
    [request], [items] = scored(scorer, [context + [8]], [GREEDY], top=1)
  finally:
    scorer.stop()
  assert reused_tokens(scorer) == 19
  assert_as_own_prefill(engine, context + [8], GREEDY, request, items, top=1)


def test_one_token_choices_after_one_passage_keep_the_passage_once(engine):
  """MMLU's shape: four prompts that differ in their last token only keep one of them (the
  others would hold the same keys again); a later choice reuses the passage from it."""
  rng = np.random.default_rng(3)
  context = [engine.tokenizer.bos_id(), *map(int, rng.integers(4, 300, 29))]
  scorer = Scorer(engine).start()
  try:
    scored(scorer, [context + [token] for token in (5, 6, 7, 8)], [GREEDY] * 4, top=1)
    assert len(scorer.context_cache) == 1
    [request], [items] = scored(scorer, [context + [9]], [GREEDY], top=1)
  finally:
    scorer.stop()
  assert reused_tokens(scorer) == 29
  assert_as_own_prefill(engine, context + [9], GREEDY, request, items, top=1)


def kept(tokens, nbytes_each=1000):
  """A ScoredPrompt of `tokens` whose keys and values take `nbytes_each` bytes."""
  n = len(tokens)
  return scoring_cache.ScoredPrompt(np.asarray(tokens, np.int32),
                                    np.zeros(nbytes_each // 4, np.float32),
                                    np.zeros(n, np.float32), np.zeros((n, 1), np.int32),
                                    np.zeros((n, 1), np.float32))


def test_the_cache_evicts_the_least_recently_used_past_its_bytes():
  a, b, c = kept(list(range(1, 9))), kept(list(range(11, 19))), kept(list(range(21, 29)))
  cache = scoring_cache.ContextCache(max_bytes=a.nbytes * 2)
  cache.insert(a)
  cache.insert(b)
  assert cache.longest_match(list(range(1, 7)) + [99], top=1) == (a, 6)  # a is now the newer
  cache.insert(c)
  assert len(cache) == 2 and cache.nbytes == a.nbytes + c.nbytes
  assert cache.longest_match(list(range(11, 19)), top=1) == (None, 0)
  assert cache.longest_match(list(range(21, 29)), top=1) == (c, 8)
  assert cache.longest_match(list(range(1, 9)), top=2) == (None, 0)  # 1 alternative kept
  cache.insert(kept(list(range(31, 39)), nbytes_each=a.nbytes * 3))  # larger than the budget
  assert len(cache) == 2


def test_a_hash_that_names_other_tokens_finds_nothing(monkeypatch):
  """Beginnings are found by hash; the tokens are compared before anything is reused."""
  cache = scoring_cache.ContextCache(max_bytes=1 << 20)
  monkeypatch.setattr(scoring_cache, "beginnings", lambda tokens: [7, 8])
  entry = kept([1, 2, 3, 4, 5, 6, 7, 8])
  cache.insert(entry)
  assert cache.longest_match([1, 2, 3, 4, 9, 9, 9, 9], top=1) == (entry, 4)
  assert cache.longest_match([9, 2, 3, 4, 5, 6, 7, 8], top=1) == (None, 0)


def test_reusing_prompts_that_no_longer_fit_the_row_are_scored_whole():
  """Reuse splits prompts that shared a beginning in the row into context groups; where
  that takes more than the row's budget, the pack reuses nothing and lays them as before."""
  shared = list(range(1, 31))
  prompts = [shared + [40 + i] for i in range(4)]
  entries = [kept(list(range(1, 5)) + [99]), kept(list(range(1, 5)) + [98])]
  entries = [entry.__class__(entry.tokens, np.zeros((1, 2, 5, 1, 2), np.float32),
                             entry.logprobs, entry.top_tokens, entry.top_logprobs)
             for entry in entries]
  laid = scoring_cache.pack_with_context(
      prompts, [3, 3, 3, 3], [entries[0], entries[1], entries[0], entries[1]], 40,
      lambda tokens: max(16, tokens), lambda tokens: max(16, tokens), lambda width: 8, 1, 1, 2,
      np.float32)
  assert laid.reused == [0, 0, 0, 0] and laid.tokens.shape[1] == 34
  assert (laid.context_ids == 0).all() and (laid.context_owner == -1).all()


def test_packed_context_attention_equals_a_float64_reference():
  """A packed row of three segments: the first continues a kept prompt of 5 positions, the
  second nothing, the third (two branches after a shared token) another kept prompt of 3.
  Each query sees its own context's keys and its segment's earlier keys (its branch's or the
  shared ones); GQA, two query heads a key head."""
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 0, 0]])
  branches = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 0, 0]])
  context_ids = np.array([[1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 2, 0, 0]])
  owner = np.array([[1, 1, 1, 1, 1, 2, 2, 2, -1, -1]])
  assert_packed_attention_as_float64(np.random.default_rng(5), segments, branches,
                                     context_ids, owner)


def test_each_query_block_attends_within_its_window_as_over_the_whole_row(monkeypatch):
  """A row of 40 segments (lengths 1-9, some in branches after a shared prefix), about 3 in
  4 continuing a kept prompt of their own (lengths 1-12), laid in order as
  `pack_with_context` lays them, then padding: `attention_windows` gives each block of 8
  queries a window of the row and of the context (8, 16 or 64 keys wide), both much
  narrower than either, and every query's output equals the float64 attention over the
  whole row and context."""
  monkeypatch.setattr(scoring_cache, "QUERY_BLOCK", 8)
  monkeypatch.setattr(scoring_cache, "WINDOWS", (8, 16, 64))
  rng = np.random.default_rng(11)
  segments, branches, context_ids, owner, context_id = [], [], [], [], 0
  for segment in range(1, 41):
    length, kept = int(rng.integers(1, 10)), rng.random() < 0.75
    if kept:
      context_id += 1
      owner += [context_id] * int(rng.integers(1, 13))
    shared = int(rng.integers(1, length)) if length > 3 and rng.random() < 0.4 else length
    branch = [0] * shared + sorted(rng.integers(1, 3, length - shared).tolist())
    segments += [segment] * length
    branches += branch
    context_ids += [context_id if kept else 0] * length
  pad, context_pad = -len(segments) % 8 + 5, -len(owner) % 16 + 3
  segments, branches = np.array([segments + [0] * pad]), np.array([branches + [0] * pad])
  context_ids = np.array([context_ids + [0] * pad])
  owner = np.array([owner + [-1] * context_pad])
  lookback, context_window, context_start = scoring_cache.attention_windows(
      segments[0], context_ids[0], owner[0])
  assert lookback <= 16 and context_window <= 64
  assert segments.shape[1] > 8 * lookback and owner.shape[1] > 3 * context_window
  windows = kv_cache.PackedWindows(8, lookback, context_window, context_start)
  assert_packed_attention_as_float64(rng, segments, branches, context_ids, owner, windows)


def assert_packed_attention_as_float64(rng, segments, branches, context_ids, owner,
                                       windows=None):
  heads, kv_heads, head_dim = 4, 2, 8
  width, context_width = segments.shape[1], owner.shape[1]
  q = rng.normal(size=(1, width, heads, head_dim)).astype(np.float32) * 2
  k, v = (rng.normal(size=(1, width, kv_heads, head_dim)).astype(np.float32) for _ in "kv")
  context_k, context_v = (rng.normal(size=(1, context_width, kv_heads, head_dim))
                          .astype(np.float32) for _ in "kv")
  cache = kv_cache.write({"context_k": context_k, "context_v": context_v,
                          "context_owner": owner, "context_ids": context_ids,
                          "segment_ids": segments, "branch_ids": branches,
                          **({"windows": windows} if windows else {})}, k, v, None)
  out = np.asarray(kv_cache.attend(cache, q, None))

  keys = np.concatenate([context_k[0], k[0]]).astype(np.float64)
  values = np.concatenate([context_v[0], v[0]]).astype(np.float64)
  for i in range(width):
    if segments[0, i] == 0:
      continue  # padding: nobody reads it
    seen = [owner[0, j] == context_ids[0, i] for j in range(context_width)] + [
        j <= i and segments[0, j] == segments[0, i] and branches[0, j] in (0, branches[0, i])
        for j in range(width)]
    for head in range(heads):
      scores = keys[:, head // 2] @ q[0, i, head].astype(np.float64) / np.sqrt(head_dim)
      scores = np.where(seen, scores, -np.inf)
      probs = np.exp(scores - scores.max())
      expected = (probs / probs.sum()) @ values[:, head // 2]
      np.testing.assert_allclose(out[0, i, head], expected, atol=2e-6)


def test_reset_prefix_cache_forgets_kept_prompts_and_generation_blocks(engine):
  """vLLM's POST /reset_prefix_cache: a scoring prompt sent again reuses all but its last
  position, and after the reset nothing; so for a generation's prompt and its cached blocks."""
  rng = np.random.default_rng(2)
  bos = engine.tokenizer.bos_id()
  scoring_prompt = [bos, *map(int, rng.integers(4, 300, 24))]
  generation_prompt = [bos, *map(int, rng.integers(4, 300, 3 * engine.block_size))]
  with app_client(engine) as client:
    metrics = client.app.state.orchestrator.metrics
    hits = lambda: int(metrics.prefix_cache_hits._value.get())  # noqa: E731

    def score():
      response = client.post("/v1/completions", json={
          "model": "tiny", "prompt": scoring_prompt, "max_tokens": 1, "logprobs": 1,
          "echo": True, "temperature": 0})
      assert response.status_code == 200, response.text

    def generate():
      response = client.post("/v1/completions", json={
          "model": "tiny", "prompt": generation_prompt, "max_tokens": 2, "temperature": 0})
      assert response.status_code == 200, response.text

    score()
    before = hits()
    score()
    assert hits() - before == len(scoring_prompt) - 1
    generate()
    before = hits()
    generate()
    assert hits() - before == 3 * engine.block_size
    assert client.post("/reset_prefix_cache").status_code == 200
    before = hits()
    score()
    generate()
    assert hits() == before


def test_the_server_keeps_256_mib_of_scored_prompts_by_default_and_refuses_a_negative_size(
    capsys):
  from serving.server import parse_args  # noqa: PLC0415
  assert parse_args(["--checkpoint_dir=x"]).scoring_cache_mb == 256
  assert parse_args(["--checkpoint_dir=x", "--scoring_cache_mb=0"]).scoring_cache_mb == 0
  with pytest.raises(SystemExit):
    parse_args(["--checkpoint_dir=x", "--scoring_cache_mb=-1"])
  assert "--scoring_cache_mb=-1" in capsys.readouterr().err
