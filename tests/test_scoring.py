"""serving.scoring: lm-eval's scoring requests packed into one forward, against each prompt's
own scored prefill (`Engine.prefill_scored`, the single-prompt path) as the reference."""

import contextlib
import functools
import queue
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_serving import random_run

from serving.engine import Engine, SamplingSettings
from serving.orchestrator import Request
from serving.scoring import (
  Scorer,
  fits_one_pack,
  laid_tokens,
  pack,
  pack_width,
  pack_widths,
  shared_prefix_groups,
)
from serving.server import create_app

PROMPTS = [[1, 17, 40, 3, 99, 5, 6], [1], [1, 250], [1, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 200],
           [1, 300, 2, 45]]
SETTINGS = [SamplingSettings(temperature=0.0), SamplingSettings(temperature=0.9, seed=7),
            SamplingSettings(temperature=1.3, top_p=0.8, seed=2**40 + 3),
            SamplingSettings(temperature=0.7, top_k=5, seed=11), SamplingSettings(temperature=0)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
  return Engine.from_checkpoint(random_run(tmp_path_factory), slots=2)


@contextlib.contextmanager
def app_client(engine):
  """A client of an app on `engine`, whose scorer and orchestrator stop after: the module's
  engine serves the next app, and one engine serves one running orchestrator."""
  with TestClient(create_app(engine, model_name="tiny")) as client:
    try:
      yield client
    finally:
      client.app.state.scorer.stop()
      client.app.state.orchestrator.shutdown()


def scored(scorer: Scorer, prompts, settings, *, top: int, max_tokens: int = 1):
  """Each prompt through `scorer` at once: (its Request, the items it emitted)."""
  outputs = [queue.Queue() for _ in prompts]
  requests = [Request(list(prompt), max_tokens=max_tokens, emit=out.put, settings=setting,
                      top_logprobs=top, echo=True)
              for prompt, setting, out in zip(prompts, settings, outputs)]
  scorer.submit(requests)
  emitted = []
  for out in outputs:
    items = [out.get(timeout=60)]
    while items[-1] is not None and not isinstance(items[-1], BaseException):
      items.append(out.get(timeout=60))
    emitted.append(items)
  return requests, emitted


def test_pack_lays_each_prompt_in_its_own_segment_with_positions_from_zero():
  laid = pack([[5, 6, 7], [8], [9, 10]], budget=64)
  assert laid.tokens.shape == (1, 16)
  np.testing.assert_array_equal(laid.tokens[0, :7], [5, 6, 7, 8, 9, 10, 0])
  np.testing.assert_array_equal(laid.positions[0, :6], [0, 1, 2, 0, 0, 1])
  np.testing.assert_array_equal(laid.segment_ids[0, :7], [1, 1, 1, 2, 3, 3, 0])
  np.testing.assert_array_equal(laid.branch_ids[0], 0)
  assert [span.tolist() for span in laid.spans] == [[0, 1, 2], [3], [4, 5]]
  assert list(laid.last[:3]) == [2, 3, 5]


def test_prompts_sharing_a_prefix_lay_it_once_and_each_remainder_as_its_own_branch():
  prompts = [[1, 4, 9], [2, 3], [1, 4, 5, 6], [1, 4, 5, 7, 8]]
  laid = pack(prompts, budget=64)
  # [1, 4] once (3 branches save 4 tokens; [1, 4, 5] for two would save 3), then [2, 3]
  np.testing.assert_array_equal(laid.tokens[0, :10], [1, 4, 5, 6, 5, 7, 8, 9, 2, 3])
  np.testing.assert_array_equal(laid.branch_ids[0, :10], [0, 0, 1, 1, 2, 2, 2, 3, 0, 0])
  np.testing.assert_array_equal(laid.segment_ids[0, :11], [1] * 8 + [2, 2, 0])
  for prompt, span in zip(prompts, laid.spans):
    np.testing.assert_array_equal(laid.tokens[0, span], prompt)
    np.testing.assert_array_equal(laid.positions[0, span], np.arange(len(prompt)))
    np.testing.assert_array_equal(laid.predecessor[0, span[1:]], span[:-1])
  assert list(laid.last[:4]) == [7, 9, 3, 6]


def brute_force_saving(prompts) -> int:
  """The most tokens any grouping of `prompts` saves, over every set partition."""
  def partitions(items):
    if not items:
      yield []
      return
    first, rest = items[0], items[1:]
    for partition in partitions(rest):
      yield [[first], *partition]
      for i in range(len(partition)):
        yield [*partition[:i], [first, *partition[i]], *partition[i + 1:]]

  def saving(group):
    members = [prompts[i] for i in group]
    shared = min(len(p) - 1 for p in members)
    while shared and len({tuple(p[:shared]) for p in members}) > 1:
      shared -= 1
    return (len(group) - 1) * shared

  return max(sum(map(saving, partition)) for partition in partitions(list(range(len(prompts)))))


@pytest.mark.parametrize("seed", range(6))
def test_shared_prefix_groups_save_as_many_tokens_as_the_best_set_partition(seed):
  rng = np.random.default_rng(seed)
  prompts = [[1, *rng.integers(2, 4, rng.integers(0, 5))] for _ in range(6)]
  groups = shared_prefix_groups(prompts)
  assert sorted(i for _, members in groups for i in members) == list(range(6))
  for shared, members in groups:
    assert len({tuple(prompts[i][:shared]) for i in members}) == 1
    assert all(len(prompts[i]) > shared for i in members)
  assert sum((len(m) - 1) * shared for shared, m in groups) == brute_force_saving(prompts)


@pytest.mark.parametrize("budget", [16, 64, 100, 1024, 4096])
def test_pack_widths_rise_to_the_budget_and_fit_every_total(budget):
  widths = pack_widths(budget)
  assert widths == sorted(set(widths)) and widths[-1] == budget
  for tokens in range(1, budget + 1):
    width = pack_width(tokens, budget)
    assert tokens <= width and width - tokens < max(32, width // 8 + 64)  # the padding
  with pytest.raises(ValueError, match=f"{budget + 1} laid tokens do not fit one pack"):
    pack_width(budget + 1, budget)


# The prefill attends by an online softmax over chunks of the paged pool
# (`paged_kv.chunked_attend`), the pack by one softmax per query block: the same function in
# another order of float32 operations, whose rounding grows with the value (on an AMD EPYC
# host: 1.05e-5 at a log-probability of -4.63, 2.3e-6 of it). So 1e-5 plus 2e-6 of the value.
PREFILL_RTOL = 2e-6


def wrap_forward(scorer: Scorer, wrapper):
  """`wrapper(original, *arguments, **windows)` in place of the scorer's logprobs=1 forward
  (the one that keeps what it scores, or without a cache the plain one); arguments[1] is the
  packed row."""
  programs = scorer._score_context if scorer.context_cache is not None else scorer._score
  programs[1] = functools.partial(wrapper, programs[1])


def assert_scored_as_each_prompt_own_prefill(engine, prompts, settings):
  """Each prompt's logprobs, its 5 alternatives per token and its new token, packed, equal
  those of its own `Engine.prefill_scored` within 1e-5 (plus `PREFILL_RTOL`)."""
  scorer = Scorer(engine).start()
  try:
    requests, emitted = scored(scorer, prompts, settings, top=5)
  finally:
    scorer.stop()
  for prompt, setting, request, items in zip(prompts, settings, requests, emitted, strict=True):
    _, choice, scores = engine.prefill_scored(prompt, setting)
    logprobs = np.asarray(scores.logprobs)[0, 1:len(prompt)]
    np.testing.assert_allclose(request.prompt_logprobs.logprobs, logprobs, atol=1e-5,
                               rtol=PREFILL_RTOL)
    for t, top in enumerate(request.prompt_logprobs.alternatives(), start=1):
      assert [token for token, _ in top] == np.asarray(scores.top_tokens)[0, t, :5].tolist()
      np.testing.assert_allclose([value for _, value in top],
                                 np.asarray(scores.top_logprobs)[0, t, :5], atol=1e-5,
                                 rtol=PREFILL_RTOL)
    [delta, end] = items
    assert end is None and delta.finish_reason == "length"
    assert delta.token_id == int(choice.token[0])
    np.testing.assert_allclose(delta.logprob, float(choice.logprob[0]), atol=1e-5,
                               rtol=PREFILL_RTOL)
    assert [token for token, _ in delta.top_logprobs] == np.asarray(
        choice.top_tokens)[0, :5].tolist()


def test_packed_prompts_score_as_each_prompt_own_prefill_within_1e_5(engine):
  """Greedy and sampled settings, prompts of 1 to 14 tokens, 5 alternatives per token."""
  assert_scored_as_each_prompt_own_prefill(engine, PROMPTS, SETTINGS)


def test_choices_sharing_their_context_score_as_each_prompt_own_prefill_within_1e_5(engine):
  """lm-eval's multiple-choice prompts: one context, a prompt per choice, and a prompt of
  another item between them: the context is computed once, for 4 branches."""
  prompts = [[1, 17, 40, 3, 99, 5, 6], [1, 17, 40, 3, 99, 7], [1, 250],
             [1, 17, 40, 3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [1, 17, 40, 3, 5]]
  assert pack(prompts, 64).branch_ids.max() == 4
  assert_scored_as_each_prompt_own_prefill(engine, prompts, SETTINGS)


def test_an_all_greedy_pack_takes_its_first_tokens_from_its_scores_not_the_sampling_program(
    engine):
  """lm-eval's requests are all temperature 0: their pack runs the forward alone, and each
  prompt's new token is still the one its own prefill picks."""
  scorer = Scorer(engine)

  def refuse(*_):
    raise AssertionError("an all-greedy pack ran the sampling program")

  scorer._sample = {top: refuse for top in scorer._sample}
  scorer.start()
  try:
    _, emitted = scored(scorer, PROMPTS, [SamplingSettings(temperature=0)] * len(PROMPTS), top=5)
  finally:
    scorer.stop()
  for prompt, [delta, end] in zip(PROMPTS, emitted, strict=True):
    _, choice, _ = engine.prefill_scored(prompt, SamplingSettings(temperature=0))
    assert end is None and delta.token_id == int(choice.token[0])
    np.testing.assert_allclose(delta.logprob, float(choice.logprob[0]), atol=1e-5,
                               rtol=PREFILL_RTOL)
    assert [token for token, _ in delta.top_logprobs] == np.asarray(
        choice.top_tokens)[0, :5].tolist()


def test_a_greedy_prompt_tokens_logprob_equals_its_top_logprob_exactly(engine):
  """lm-eval's is_greedy compares them with `!=`; top-1 comes from the max, not a top-k."""
  prompt = [1]
  for _ in range(8):
    prompt.append(int(np.argmax(engine.logits_without_cache(prompt)[-1])))
  scorer = Scorer(engine).start()
  try:
    [request], _ = scored(scorer, [prompt], [SamplingSettings(temperature=0)], top=1)
  finally:
    scorer.stop()
  for logprob, [(token, top_logprob)] in zip(request.prompt_logprobs.logprobs,
                                             request.prompt_logprobs.alternatives()):
    assert logprob == top_logprob


def test_max_tokens_0_scores_the_prompt_and_emits_no_token(engine):
  scorer = Scorer(engine).start()
  try:
    [request], [items] = scored(scorer, [PROMPTS[0]], [SETTINGS[0]], top=1, max_tokens=0)
  finally:
    scorer.stop()
  assert items == [None] and len(request.prompt_logprobs.logprobs) == len(PROMPTS[0]) - 1


def test_prompts_waiting_together_share_one_forward_pass(engine):
  scorer = Scorer(engine)
  forwards, entered, gate = [], threading.Event(), threading.Event()

  def counted(original, *args, **windows):
    entered.set()
    gate.wait(60)  # holds the first pack until the rest are queued behind it
    forwards.append(args[1].shape)
    return original(*args, **windows)

  wrap_forward(scorer, counted)
  scorer.start()
  try:
    first = threading.Thread(target=scored, args=(scorer, [PROMPTS[0]], [SETTINGS[0]]),
                             kwargs={"top": 1})
    first.start()
    assert entered.wait(60)  # the scorer took the first one
    rest = threading.Thread(target=scored, args=(scorer, PROMPTS, [SETTINGS[0]] * 5),
                            kwargs={"top": 1})
    rest.start()
    while scorer.waiting_prompts < len(PROMPTS):
      time.sleep(0.001)
    gate.set()
    first.join(300), rest.join(300)  # two compiles, on a busy machine
  finally:
    scorer.stop()
  assert len(forwards) == 2  # the lone one, then the five of a concurrent request in one


def test_a_small_request_waits_for_one_pack_per_request_ahead_not_for_all_their_prompts(
    engine):
  """Two requests of four 40-token prompts (one pack each in a budget of 64), then one of a
  5-token prompt: FIFO scored it last, in the eighth pack; taken in turn, it is in the fourth,
  before either long request has finished, and every prompt is scored once."""
  scorer = Scorer(engine)
  assert scorer.budget == 64
  packs, entered, gate = [], threading.Event(), threading.Event()

  def recorded(batch):
    entered.set()
    gate.wait(60)  # the first pack holds until every request is queued
    packs.append([request.prompt_ids for request in batch])
    for request in batch:
      scorer._finish(request, None)

  scorer._score_batch = recorded
  rng = np.random.default_rng(4)
  bos = engine.tokenizer.bos_id()
  long_ones = [[[bos, *map(int, rng.integers(4, 300, 39))] for _ in range(4)] for _ in range(2)]
  short = [bos, 5, 6, 7, 8]
  request = lambda prompt: Request(prompt, max_tokens=0, emit=lambda item: None,
                                   settings=SETTINGS[0], top_logprobs=1, echo=True)
  scorer.start()
  try:
    scorer.submit([request(prompt) for prompt in long_ones[0]])
    assert entered.wait(60)
    scorer.submit([request(prompt) for prompt in long_ones[1]])
    scorer.submit([request(short)])
    gate.set()
    deadline = time.monotonic() + 60
    while sum(map(len, packs)) < 9 and time.monotonic() < deadline:
      time.sleep(0.01)
  finally:
    scorer.stop()
  scored_prompts = [prompt for pack_ in packs for prompt in pack_]
  assert sorted(scored_prompts) == sorted([*long_ones[0], *long_ones[1], short])
  pack_of = lambda prompt: next(i for i, pack_ in enumerate(packs) if prompt in pack_)
  assert pack_of(short) == 3
  assert pack_of(short) < min(max(map(pack_of, line)) for line in long_ones)


def test_choices_sharing_a_context_fill_one_pack_whose_raw_lengths_exceed_its_budget(engine):
  """An lm-eval request of one-token choices: four prompts of a 40-token context whose own
  lengths add up past the budget (164 > 64, the context) take one forward, laid in 44
  tokens; a fifth prompt that sharing cannot fit waits for the next pack."""
  rng = np.random.default_rng(3)
  context = [engine.tokenizer.bos_id(), *map(int, rng.integers(4, 300, 39))]
  choices = [context + [token] for token in (10, 11, 12, 13)]
  other = [engine.tokenizer.bos_id(), *map(int, rng.integers(4, 300, 29))]
  assert laid_tokens(choices) == 44 and fits_one_pack(choices, 64)
  assert not fits_one_pack([*choices, other], 64)
  scorer = Scorer(engine)
  assert scorer.budget == 64
  forwards = []

  def counted(original, *args, **windows):
    forwards.append(int(np.count_nonzero(args[3])))  # the tokens laid: nonzero segment ids
    return original(*args, **windows)

  wrap_forward(scorer, counted)
  scorer.start()
  try:
    requests, emitted = scored(scorer, [*choices, other], [SETTINGS[0]] * 5, top=1)
  finally:
    scorer.stop()
  assert forwards == [44, 30]
  assert all(items[-1] is None for items in emitted)
  assert [len(request.prompt_logprobs.logprobs) for request in requests] == [40] * 4 + [29]


def test_the_server_scores_lm_eval_requests_without_a_decode_slot(engine, monkeypatch):
  """A scoring request (echo, logprobs, max_tokens 1) never reaches the engine's prefill or
  its decode slots: it is answered with both made to fail."""
  expected = [engine.prefill_scored(prompt, SETTINGS[0])[2] for prompt in PROMPTS]

  def refuse(*_, **__):
    raise AssertionError("a scoring request reached the decode slots")

  with app_client(engine) as client:
    monkeypatch.setattr(engine, "prefill_scored", refuse)
    monkeypatch.setattr(engine, "insert", refuse)
    response = client.post("/v1/completions", json={
        "model": "tiny", "prompt": PROMPTS, "max_tokens": 1, "logprobs": 1, "echo": True,
        "temperature": 0})
  assert response.status_code == 200, response.text
  for prompt, choice, scores in zip(PROMPTS, response.json()["choices"], expected):
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert token_logprobs[0] is None and len(token_logprobs) == len(prompt) + 1
    np.testing.assert_allclose(token_logprobs[1:len(prompt)],
                               np.asarray(scores.logprobs)[0, 1:len(prompt)], atol=1e-5)


def test_a_sampled_request_of_several_prompts_compiles_nothing_after_warmup(engine):
  """The sampling program's rows are a pack width's `max_seqs`, not the count of prompts, so
  the programs warmup compiled serve a sampled request of 3 prompts as they are."""
  scorer = Scorer(engine)
  scorer.warmup()
  programs = [*scorer._score_context.values(), *scorer._sample.values()]
  compiled = [program._cache_size() for program in programs]
  scorer.start()
  try:
    _, emitted = scored(scorer, PROMPTS[:3], SETTINGS[1:4], top=1)
  finally:
    scorer.stop()
  assert all(items[-1] is None for items in emitted)
  assert [program._cache_size() for program in programs] == compiled


def test_a_scoring_request_may_fill_the_whole_context_and_a_generation_may_not(engine):
  """lm-eval's full-length windows: a prompt of exactly the context, echo, logprobs and
  max_tokens 1, is scored (its token logprobs a float64 log-softmax of the engine's cache-less
  logits); the same prompt asking for a generation is a 400."""
  prompt = [1, *np.random.default_rng(4).integers(3, 200, engine.context_length - 1).tolist()]
  logits = np.asarray(engine.logits_without_cache(prompt), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  expected = logits[np.arange(len(prompt) - 1), prompt[1:]] - log_z[:-1]
  with app_client(engine) as client:
    scored_response = client.post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": 1, "logprobs": 1, "echo": True,
        "temperature": 0})
    generated = client.post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0})
  assert scored_response.status_code == 200, scored_response.text
  token_logprobs = scored_response.json()["choices"][0]["logprobs"]["token_logprobs"]
  np.testing.assert_allclose(token_logprobs[1:len(prompt)], expected, atol=1e-4)
  assert generated.status_code == 400
  assert generated.json()["error"]["code"] == "context_length_exceeded"
