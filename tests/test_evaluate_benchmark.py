"""benchmarks/evaluate.py's replays of the server's scoring: a request of more prompts than
one pack holds goes in several packs, as the server's Scorer takes it, and every prompt's
log-likelihood equals `maxlm.evals.scoring`'s in process."""

import numpy as np
import pytest
from test_serving import CONTEXT, random_run

from benchmarks import evaluate
from serving.engine import Engine
from serving.scoring import fits_one_pack


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
  return Engine.from_checkpoint(random_run(tmp_path_factory), slots=1)


def test_a_request_larger_than_one_pack_is_scored_in_several_as_the_server_does(engine):
  rng = np.random.default_rng(0)
  bos = engine.tokenizer.bos_id()
  pairs = []
  for _ in range(6):  # 6 items of 4 choices, each item 14-20 context tokens: over 64 a request
    context = [bos, *map(int, rng.integers(4, 300, int(rng.integers(14, 20))))]
    pairs += [(context + [int(t) for t in rng.integers(4, 300, int(rng.integers(2, 9)))],
               len(context)) for _ in range(4)]
  prompts = [ids for ids, _ in pairs]
  batches = evaluate.server_batches(prompts, CONTEXT)
  assert len(batches) > 1 and [p for batch in batches for p in batch] == prompts
  assert all(fits_one_pack(batch, CONTEXT) for batch in batches)
  assert not any(fits_one_pack([*batch, following[0]], CONTEXT)
                 for batch, following in zip(batches, batches[1:]))

  expected = evaluate.in_process(engine, pairs, batch=8)()
  assert len(evaluate.server_packs(pairs, 24, engine.context_length)) > 1
  replay, widths, _ = evaluate.cached_scoring_alone(engine, pairs, 24, 1 << 20)
  scored = replay()
  assert len(widths) > 1 and max(widths) <= CONTEXT
  order = [i for chunk in evaluate.request_chunks(pairs, 24) for i in chunk]
  got = {}
  for i, entry in zip(order, (entry for entries, _ in scored for entry in entries)):
    got[i] = float(np.sum(entry.logprobs[pairs[i][1]:]))  # the continuation's tokens
  np.testing.assert_allclose([got[i] for i in range(len(pairs))], expected, atol=1e-4)


def test_transformers_rows_are_lm_evals_and_score_every_choice(engine):
  """transformers' side forwards the rows lm-eval's `hf` model forwards (its Collator grouping
  by context + continuation[:-1]: an item's one-token choices share a row) and still gives each
  choice the in-process scorer's log-likelihood."""
  collator = pytest.importorskip("lm_eval.models.utils").Collator
  pytest.importorskip("transformers")
  rng = np.random.default_rng(1)
  bos = engine.tokenizer.bos_id()
  pairs = []
  for choice_tokens in (1, 1, 3):  # two items of one-token choices, one of longer ones
    context = [bos, *map(int, rng.integers(4, 300, 12))]
    pairs += [(context + [int(t) for t in rng.integers(4, 300, choice_tokens)], len(context))
              for _ in range(4)]
  requests = [(("", ""), ids[:length], ids[length:]) for ids, length in pairs]
  lm_eval_rows = sum(len(batch) for batch in collator(
      requests, sort_fn=lambda request: -len(request[1] + request[2]), group_by="contexts",
      group_fn=lambda request: request[-2] + request[-1][:-1]).get_batched(n=64))
  assert len(evaluate.hf_rows(pairs)) == lm_eval_rows == 2 + 4
  assert sorted(i for row in evaluate.hf_rows(pairs) for i in row) == list(range(len(pairs)))
  expected = evaluate.in_process(engine, pairs, batch=8)()
  np.testing.assert_allclose(evaluate.with_transformers(engine, pairs)(4)(), expected, atol=1e-4)
