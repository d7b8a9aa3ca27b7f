"""Scoring requests (lm-eval's log-likelihood path) in batches, beside the decode slots.

A completion with `echo`, `logprobs` and `max_tokens` 0 or 1 wants its prompt's own token
log-probabilities and at most one new token: one forward pass and no KV cache to keep. The
`Scorer`'s thread takes every such request waiting (the prompts of one request and those of
concurrent ones), packs their prompts one after another into a single row, each its own
segment with positions from 0, and runs one compiled forward over it, padded to the next of a
few widths. Causal attention within segments makes each prompt's results those of its own
prefill (`Engine.prefill_scored`) to float32 rounding; the new token is chosen from each
prompt's last position with that request's settings and seed, as a prefill chooses it.
With a cache of scored prompts (the default, `serving.scoring_cache`), a prompt that begins
as a kept one computes only what follows their shared beginning, on top of its keys and
values.
"""

import collections
import dataclasses
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm import sampling, steps
from maxlm.evals.scoring import SCORE_BLOCK, score_block
from maxlm.evals.shared_prefixes import (  # noqa: F401  (importable from here too)
    common_prefix, empty_rows, group_tokens, laid_tokens, lay_group, shared_prefix_groups)
from maxlm.model import kv_cache
from serving import scoring_cache
from serving.detokenize import TextStream
from serving.engine import Engine, SamplingSettings, Step, device_settings
from serving.metrics import ServerMetrics
from serving.openai_api import MAX_COMPLETION_LOGPROBS
from serving.orchestrator import PromptLogprobs, QueueFull, Request, Unavailable

log = logging.getLogger("serving")
MIN_WIDTH = 16
WIDE_WIDTHS = (128, 256, 512)  # `Scorer._warm_wide_programs`, with the budget
COMPILE_AFTER = 3  # packs of a program not compiled yet that ask for it (`Scorer._runnable`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedScores:
  """Per position t of a packed row: how likely token t was after its predecessor (unread at
  a prompt's first token), and the likeliest tokens to follow t."""
  logprobs: jax.Array      # float32 [width]
  top_tokens: jax.Array    # int32 [width, top], most likely first
  top_logprobs: jax.Array  # float32 [width, top]


def pack_widths(budget: int) -> list[int]:
  """The row widths a pack is padded to: 16, then every 32 up to 256 (lm-eval's batches of
  short prompts land there: padding under 1/8 of a row beyond 128), then each the multiple of
  64 at or above 9/8 of the one before (padding under 1/8 of a row plus 64), and `budget`
  last. A pack's forward costs about the same per width token from 256 to 1024 (runs/tiny:
  41-46 us), so padding is time: steps of a half and a third instead cost lm-eval's
  HellaSwag-shaped requests 16% of their forward, these 6%, for 5 more programs to warm."""
  widths = [MIN_WIDTH, *range(32, 257, 32)]
  while widths[-1] < budget:
    widths.append(-(-widths[-1] * 9 // (8 * 64)) * 64)
  return [width for width in widths if width < budget] + [budget]


def pack_width(tokens: int, budget: int) -> int:
  """The narrowest pack width that holds `tokens`; ValueError past `budget` (a caller splits
  its prompts first, as `Scorer._next_batch` does with `pack_takes`)."""
  if tokens > budget:
    raise ValueError(f"{tokens} laid tokens do not fit one pack of at most {budget}")
  return next(width for width in pack_widths(budget) if width >= tokens)


@dataclasses.dataclass(frozen=True)
class Pack:
  """Prompts laid one after another in one row: what the compiled forward takes. A group of
  prompts sharing a prefix is one segment: the prefix once (branch 0), then each prompt's own
  remainder as its own branch, which sees the prefix and itself only."""
  tokens: np.ndarray        # int32 [1, width]
  positions: np.ndarray     # int32 [1, width]: from 0 in each prompt
  segment_ids: np.ndarray   # int32 [1, width]: 1, 2, ... per group; 0 is the padding
  branch_ids: np.ndarray    # int32 [1, width]: 0 the shared prefix, 1, 2, ... its members
  predecessor: np.ndarray   # int32 [1, width]: where the token before each one is (itself
                            # for a prompt's first token and the padding)
  spans: list[np.ndarray]   # per prompt, where its tokens are, in order
  last: np.ndarray          # int32 [seqs]: each prompt's last position (0 past the prompts)


def pack(prompts: list[list[int]], budget: int) -> Pack:
  """`prompts` (at most `budget` tokens in all) in one row of the next width, each group
  sharing a prefix (`shared_prefix_groups`) laid as one segment."""
  groups = shared_prefix_groups(prompts)
  width = pack_width(laid_tokens(prompts, groups), budget)
  rows = empty_rows(1, width)
  row = {name: array[0] for name, array in rows.items()}
  spans, start = [None] * len(prompts), 0
  for segment, (shared, members) in enumerate(groups, start=1):
    for index, span in zip(members, lay_group(row, start, prompts, shared, members, segment)):
      spans[index] = span
    start += group_tokens(prompts, shared, members)
  last = np.zeros(max_seqs(width), np.int32)
  last[:len(prompts)] = [span[-1] for span in spans]
  return Pack(rows["tokens"], rows["positions"], rows["segment_ids"], rows["branch_ids"],
              rows["predecessor"], spans, last)


def fits_one_pack(prompts: list[list[int]], budget: int) -> bool:
  """Whether `pack` lays `prompts` in at most `budget` tokens (the grouping runs only when
  their own lengths add up to more)."""
  return sum(map(len, prompts)) <= budget or laid_tokens(prompts) <= budget


def max_seqs(width: int) -> int:
  """Prompts one pack of `width` holds at most (each has a token; a request sends <= 64)."""
  return min(width, 64)


def pack_takes(prompts: list[list[int]], prompt: list[int], budget: int) -> bool:
  """Whether a pack already holding `prompts` takes `prompt` too: a pack takes its first
  prompt always, then others while it holds fewer than `max_seqs` and they fit its budget."""
  return not prompts or (len(prompts) < max_seqs(budget)
                         and fits_one_pack([*prompts, prompt], budget))


def score_pack_fn(graphdef, params, tokens, positions, segment_ids, branch_ids, predecessor,
                  last, *, top: int) -> tuple[PackedScores, jax.Array]:
  """One forward over a packed row: every position's next-token scores, and the final hidden
  state at each prompt's last position (rows of `last`), [rows, embed], for
  `sampled_first_tokens`. A greedy prompt's first new token is its last position's top-1."""
  model = nnx.merge(graphdef, params)
  x, _ = model.decode(model.embed(tokens), positions, segment_ids, branch_ids=branch_ids)
  return row_scores(model, x, tokens, predecessor, last, top)


def score_context_pack_fn(graphdef, params, tokens, positions, segment_ids, branch_ids,
                          context_ids, predecessor, last, context, context_owner, context_start,
                          *, top: int, lookback: int, context_window: int
                          ) -> tuple[PackedScores, jax.Array, jax.Array]:
  """`score_pack_fn` over a `scoring_cache.ContextPack`: the row attends within its segments
  and to its context, each block of queries to its window of keys only. Also returns the
  row's own keys and values, [layers, 2, width, kv, d], to keep."""
  model = nnx.merge(graphdef, params)
  windows = kv_cache.PackedWindows(scoring_cache.QUERY_BLOCK, lookback, context_window,
                                   context_start)
  caches = [{"context_k": layer[0][None], "context_v": layer[1][None],
             "context_owner": context_owner, "context_ids": context_ids,
             "segment_ids": segment_ids, "branch_ids": branch_ids, "windows": windows}
            for layer in context]
  x, caches = model.decode(model.embed(tokens), positions, segment_ids, caches)
  return (*row_scores(model, x, tokens, predecessor, last, top),
          jnp.stack([jnp.stack([cache["k"][0], cache["v"][0]]) for cache in caches]))


def row_scores(model, x, tokens, predecessor, last, top: int) -> tuple[PackedScores, jax.Array]:
  """A packed row's final hidden states x [1, width, embed] -> every position's next-token
  scores, and the hidden state at each prompt's last position."""
  block = score_block(x.shape[1])
  rows = -(-x.shape[1] // block) * block
  logits = model.logits(jnp.pad(x[0], ((0, rows - x.shape[1]), (0, 0))))
  return position_scores(logits, tokens[0], predecessor[0], top, block), x[0, last]


def sampled_first_tokens(graphdef, params, x_last, positions_last, seeds, temperature, top_p,
                         top_k, *, top: int) -> sampling.TokenChoice:
  """Each prompt's first new token as `sampling.scored_prefill_fn` chooses it, from its last
  hidden state x_last [rows, embed]. A program of its own: inside the scoring forward, the
  sampling branch cost an all-greedy pack (lm-eval's) as much again, though never taken."""
  model = nnx.merge(graphdef, params)
  logits = model.logits(x_last)
  keys = jax.vmap(lambda seed, at: jax.random.fold_in(sampling.seed_key(seed), at))(
      seeds, positions_last)
  return first_tokens(logits, keys, temperature, top_p, top_k, top)


def greedy_step(scores: PackedScores, last: np.ndarray) -> Step:
  """The first new tokens of an all-greedy pack, from its host-side `scores`: each prompt's
  top-1 after its last position (the first index of the largest logit, as argmax picks)."""
  return Step(scores.top_tokens[last, 0], scores.top_logprobs[last, 0], scores.top_tokens[last],
              scores.top_logprobs[last])


def position_scores(logits: jax.Array, tokens: jax.Array, predecessor: jax.Array,
                    top: int, block: int = SCORE_BLOCK) -> PackedScores:
  """logits: [rows, vocab], rows a multiple of `block`; tokens, predecessor: [seq <= rows].
  Each token's log-probability after the one at its predecessor, and the `top` likeliest
  tokens after each position. The reductions go `block` rows at a time, which stay in
  cache: 1.6x faster on CPU than over all rows at once for a pack of 768."""
  def block_scores(block_logits):
    largest, log_z = sampling.log_normalizer(block_logits)
    return log_z, *likeliest(block_logits, largest, log_z, top)

  log_z, top_tokens, top_logprobs = jax.lax.map(
      block_scores, logits.reshape(-1, block, logits.shape[-1]))
  log_z = log_z.reshape(-1)
  seq = tokens.shape[0]
  target = logits[predecessor, tokens] - log_z[predecessor]
  return PackedScores(target, top_tokens.reshape(-1, top_tokens.shape[-1])[:seq],
                      top_logprobs.reshape(-1, top_logprobs.shape[-1])[:seq])


def next_token_scores(logits: jax.Array, targets: jax.Array, top: int) -> PackedScores:
  """logits: [seq, vocab] -> the log-probability of `targets` [seq] and the `top` likeliest
  tokens at each position."""
  largest, log_z = sampling.log_normalizer(logits)
  target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - log_z
  return PackedScores(target, *likeliest(logits, largest, log_z, top))


def likeliest(logits: jax.Array, largest: jax.Array, log_z: jax.Array,
              top: int) -> tuple[jax.Array, jax.Array]:
  """The `top` likeliest tokens of each row of logits [seq, vocab] and their log-probabilities.
  XLA's CPU argmax and top-k take ~6x a max over the same logits, so the likeliest token comes
  from the max (`sampling.first_largest`) and top-k runs only when more than one alternative
  is asked for."""
  if top == 1:
    return sampling.first_largest(logits, largest)[:, None], (largest - log_z)[:, None]
  top_logits, top_tokens = jax.lax.top_k(logits, min(top, logits.shape[-1]))
  return top_tokens.astype(jnp.int32), top_logits - log_z[:, None]


def first_tokens(logits, keys, temperature, top_p, top_k, top: int) -> sampling.TokenChoice:
  """`sampling.choose` over logits [rows, vocab] with `top` alternatives (not TOP_LOGPROBS):
  the same token and log-probabilities, without choose's top-k over 20 (slow on CPU)."""
  largest, log_z = sampling.log_normalizer(logits)
  top_tokens, top_logprobs = likeliest(logits, largest, log_z, top)
  token = sampling.sample_next(logits, keys, temperature, top_p, top_k, greedy=top_tokens[:, 0])
  logprob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - log_z
  return sampling.TokenChoice(token, logprob, top_tokens, top_logprobs)


def scoring_graphdef(engine: Engine):
  """The engine's model with XLA's attention: segments in one row need the segment mask, which
  every backend has, and a CPU or GPU serving a TPU-trained config runs it too."""
  graphdef, _ = steps.abstract_model(dataclasses.replace(engine.config, attention="xla"))
  return graphdef


class Scorer:
  """Runs scoring requests in packed batches on its own thread; start() before submit().

  Each submit() (one HTTP request's prompts) waits in a line of its own, and the packs take
  the lines in turn: a request of many packs lets the ones behind it through between its
  packs, so a small request waits for one pack per line ahead of it, not for all of their
  prompts (FIFO made a one-prompt request wait 52 s behind twelve of 64 long prompts)."""

  def __init__(self, engine: Engine, *, budget: int | None = None, max_queue: int = 4096,
               metrics: ServerMetrics | None = None,
               cache_bytes: int = scoring_cache.DEFAULT_MEGABYTES << 20):
    self.engine, self.metrics = engine, metrics or ServerMetrics()
    # Scored prompts are kept, up to `cache_bytes` (0: none), and a later prompt reuses the
    # longest beginning it shares with a kept one (`serving.scoring_cache`).
    self.context_cache = scoring_cache.ContextCache(cache_bytes) if cache_bytes else None
    self.budget = max(budget or 0, engine.context_length)  # one whole prompt always fits
    self.max_queue = max_queue
    self.error: BaseException | None = None
    graphdef = scoring_graphdef(engine)
    self._score = {top: jax.jit(functools.partial(score_pack_fn, graphdef, top=top))
                   for top in (1, MAX_COMPLETION_LOGPROBS)}
    self._sample = {top: jax.jit(functools.partial(sampled_first_tokens, graphdef, top=top))
                    for top in (1, MAX_COMPLETION_LOGPROBS)}
    self._score_context = {
        top: jax.jit(functools.partial(score_context_pack_fn, graphdef, top=top),
                     static_argnames=("lookback", "context_window"))
        for top in (1, MAX_COMPLETION_LOGPROBS)}
    # Programs of the context path by (top, width, context width, lookback, context window):
    # those compiled, and those compiling on `_compiler`'s thread (`_runnable`).
    self._ready: set[tuple[int, ...]] = set()
    self._compiling: set[tuple[int, ...]] = set()
    self._failed: set[tuple[int, ...]] = set()  # compiling failed: packs stay on a wider one
    self._wanted: collections.Counter[tuple[int, ...]] = collections.Counter()
    self._programs = threading.Lock()
    self._compiler = ThreadPoolExecutor(1, thread_name_prefix="maxlm-scoring-compile")
    self._lines: collections.deque[collections.deque[Request]] = collections.deque()
    self._waiting_prompts = 0
    self._stopping = False
    self._changed = threading.Condition()  # guards the lines, the count, _stopping and error
    self._thread = threading.Thread(target=self._run, name="maxlm-scorer", daemon=True)

  @staticmethod
  def wants(echo: bool, logprobs: int | None, max_tokens: int | None) -> bool:
    """Whether a completion is a scoring request: its prompt's logprobs and <= 1 token."""
    return echo and logprobs is not None and max_tokens is not None and max_tokens <= 1

  @property
  def started(self) -> bool:
    return self._thread.ident is not None

  def start(self, metrics: ServerMetrics | None = None) -> "Scorer":
    """Starts the thread; its counts go to `metrics` (the app's) when given."""
    self.metrics = metrics or self.metrics
    self._thread.start()
    return self

  @property
  def waiting_prompts(self) -> int:
    return self._waiting_prompts

  def stop(self):
    """The loop ends once the prompts already waiting are scored."""
    with self._changed:
      self._stopping = True
      self._changed.notify()
    self._compiler.shutdown(wait=False, cancel_futures=True)

  def submit(self, requests: list[Request]):
    """Queues `requests` as one line (so they share packs); QueueFull past `max_queue`."""
    with self._changed:
      if self.error is not None or not self._thread.is_alive():
        raise Unavailable(f"the scoring loop has stopped: {self.error!r}")
      if self._waiting_prompts + len(requests) > self.max_queue:
        raise QueueFull(f"{self._waiting_prompts} prompts are already waiting to be scored; "
                        "retry later")
      for request in requests:
        request.text = TextStream(self.engine.decode, request.stops, request.prompt_ids)
      if requests:
        self._lines.append(collections.deque(requests))
        self._waiting_prompts += len(requests)
        self._changed.notify()

  def warmup(self):
    """Compiles the forward for every pack width, and the sampled first tokens for every row
    count a pack has (`max_seqs` of its width, whatever the count of prompts in it), for
    lm-eval's logprobs=1. The programs for 2 to 20 alternatives compile on first use: warming
    them too took runs/tiny's scorer 40.3 s instead of 18.9."""
    settings, sampled_rows = [device_settings(SamplingSettings(temperature=1.0))], set()
    params = self.engine.params
    for width in pack_widths(self.budget):
      prompts = [[self.engine.tokenizer.bos_id()] * width]
      if self.context_cache is None:
        laid = pack(prompts, self.budget)
        outputs = self._score[1](params, *self._arguments(laid))
      else:  # with nothing reused; longer contexts compile on first use
        laid = self._pack_with_context(prompts, [0], [None])
        outputs = self._forward_context(1, laid)
        self._ready.add(program_key(1, laid))
      x_last = jax.block_until_ready(outputs)[1]
      if len(laid.last) not in sampled_rows:
        sampled_rows.add(len(laid.last))
        jax.block_until_ready(self._first_tokens(1, laid.positions[0, laid.last], x_last,
                                                 settings))
    if self.context_cache is not None:
      self._warm_wide_programs()

  def _warm_wide_programs(self):
    """A few programs that hold most packs with kept contexts (a context as wide as the
    budget, the widest context window), at widths 128, 256, 512 and the budget, each with the
    widest lookback window and the whole row: a pack whose own program has not compiled yet
    runs on the narrowest of them (`_runnable`) instead of waiting for its compile."""
    context_width = scoring_cache.context_width(self.budget)
    widest = max(scoring_cache.WINDOWS)
    widths = {width for width in pack_widths(self.budget) if width in WIDE_WIDTHS}
    for width in sorted(widths | {self.budget}):
      for lookback in sorted({min(widest, width), width}):
        shape = (width, context_width, lookback, min(widest, context_width))
        laid = self._pack_with_context([[self.engine.tokenizer.bos_id()]], [0], [None], shape)
        jax.block_until_ready(self._forward_context(1, laid))
        self._ready.add(program_key(1, laid))

  def _arguments(self, laid: Pack) -> tuple:
    return (laid.tokens, laid.positions, laid.segment_ids, laid.branch_ids, laid.predecessor,
            laid.last)

  def _first_tokens(self, top: int, positions_last: np.ndarray, x_last: jax.Array,
                    settings: list[tuple]) -> sampling.TokenChoice:
    rows = len(positions_last)
    seeds, temperature, top_p, top_k = (np.zeros((rows, 2), np.uint32),
                                        np.zeros(rows, np.float32), np.ones(rows, np.float32),
                                        np.zeros(rows, np.int32))
    for row, (seed, temperature_, top_p_, top_k_) in enumerate(settings):
      seeds[row], temperature[row], top_p[row], top_k[row] = seed, temperature_, top_p_, top_k_
    return self._sample[top](self.engine.params, x_last, positions_last, seeds, temperature,
                             top_p, top_k)

  # --- the loop (its own thread) ---------------------------------------------------------------

  def _run(self):
    try:
      while (batch := self._next_batch()) is not None:
        live = [request for request in batch if not request.cancelled]
        for request in batch:
          if request.cancelled:
            self._finish(request, None)
        if live:
          self._score_batch(live)
    except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it
      log.exception("the scoring loop died")
      with self._changed:
        self.error = e
        lines, self._lines, self._waiting_prompts = self._lines, collections.deque(), 0
      for line in lines:
        for request in line:
          self._finish(request, Unavailable(f"the scoring loop died: {e!r}"))

  def _next_batch(self) -> list[Request] | None:
    """Waits for prompts, then fills one pack from the lines in order while it has room (a
    shared prefix counted once: an lm-eval request of 8 one-token choices of 2 items is one
    pack). A line the pack took some of and left unfinished goes to the back. None once
    stopped and empty."""
    with self._changed:
      while not self._lines and not self._stopping:
        self._changed.wait()
      if not self._lines:
        return None
      batch, prompts, taken_from = [], [], None
      while self._lines and pack_takes(prompts, self._lines[0][0].prompt_ids, self.budget):
        line = self._lines[0]
        batch.append(line.popleft())
        prompts.append(batch[-1].prompt_ids)
        taken_from = line
        if not line:
          self._lines.popleft()
      if self._lines and self._lines[0] is taken_from:
        self._lines.rotate(-1)  # taken from and unfinished: the next line goes first
      self._waiting_prompts -= len(batch)
      return batch

  def _score_batch(self, batch: list[Request]):
    top = 1 if max(request.top_logprobs for request in batch) <= 1 else MAX_COMPLETION_LOGPROBS
    if self.context_cache is not None:
      self._score_batch_cached(batch, top)
      return
    laid = pack([request.prompt_ids for request in batch], self.budget)
    try:
      scores, x_last = self._score[top](self.engine.params, *self._arguments(laid))
      sampled = any(request.settings.temperature > 0 for request in batch)
      choice = sampled and self._first_tokens(
          top, laid.positions[0, laid.last], x_last,
          [device_settings(request.settings) for request in batch])
      scores = jax.device_get(scores)
      step = Step.from_choice(choice) if sampled else greedy_step(scores, laid.last)
    except Exception as e:  # noqa: BLE001 - e.g. out of device memory: these requests fail
      self._fail(batch, e)
      return
    self.metrics.prompt_tokens.inc(sum(len(request.prompt_ids) for request in batch))
    for row, (request, span) in enumerate(zip(batch, laid.spans)):
      request.prompt_logprobs = prompt_logprobs(scores, span, request.top_logprobs)
      self._deliver(request, step, row)

  def _fail(self, batch: list[Request], error: Exception):
    log.exception("a scoring batch failed; the requests after it go on")
    for request in batch:
      self._finish(request, RuntimeError(f"scoring failed: {error!r}"))

  def reset_cache(self):
    """Forgets every kept prompt (a batch being scored keeps its own in the new cache)."""
    if self.context_cache is not None:
      self.context_cache = scoring_cache.ContextCache(self.context_cache.max_bytes)

  def _score_batch_cached(self, batch: list[Request], top: int):
    """`_score_batch` through the context cache: every prompt on top of the longest beginning
    it shares with a kept one, and kept in turn (`serving.scoring_cache`)."""
    try:
      scored, step = self.score_with_cache(
          [request.prompt_ids for request in batch], top,
          [device_settings(request.settings) for request in batch])
    except Exception as e:  # noqa: BLE001 - e.g. out of device memory: these requests fail
      self._fail(batch, e)
      return
    for row, (request, entry) in enumerate(zip(batch, scored)):
      count = request.top_logprobs
      request.prompt_logprobs = PromptLogprobs(entry.logprobs[1:].tolist(),
                                               entry.top_tokens[:-1, :count],
                                               entry.top_logprobs[:-1, :count])
      self._deliver(request, step, row)

  def score_with_cache(self, prompts: list[list[int]], top: int, settings: list[tuple]
                       ) -> tuple[list[scoring_cache.ScoredPrompt], Step]:
    """One forward over `prompts`, each on top of the longest beginning it shares with a kept
    prompt, each kept in turn: their scores at every position, and the step of first new
    tokens (`settings`: `device_settings` per prompt)."""
    hashes = [scoring_cache.beginnings(prompt) for prompt in prompts]
    matches = [self.context_cache.longest_match(prompt, top, prompt_hashes)
               for prompt, prompt_hashes in zip(prompts, hashes)]
    reused = [scoring_cache.reused_positions(shared, len(prompt))
              for prompt, (_, shared) in zip(prompts, matches)]
    entries = [entry if start else None for (entry, _), start in zip(matches, reused)]
    laid = self._runnable(top, self._pack_with_context(prompts, reused, entries), prompts,
                          reused, entries)
    scores, x_last, keys_values = self._forward_context(top, laid)
    sampled = any(temperature > 0 for _, temperature, *_ in settings)
    choice = sampled and self._first_tokens(top, laid.positions[0, laid.last], x_last, settings)
    scores, keys_values = jax.device_get((scores, keys_values))
    step = Step.from_choice(choice) if sampled else greedy_step(scores, laid.last)
    self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
    self.metrics.observe_prefix_cache(sum(map(len, prompts)), sum(laid.reused))
    scored = [scoring_cache.scored_prompt(prompt, index, laid, scores, keys_values)
              for index, prompt in enumerate(prompts)]
    for entry, entry_hashes in zip(scored, hashes):
      if entry.keys_values is not None:
        self.context_cache.insert(entry, entry_hashes)
    return scored, step

  def _runnable(self, top: int, laid: scoring_cache.ContextPack, prompts, reused, entries
                ) -> scoring_cache.ContextPack:
    """`laid`, or the same prompts laid as a compiled wider program takes them while `laid`'s
    own program compiles on another thread: each program (a width, context width and two
    windows) compiles on first use, about a second each for runs/tiny, and lm-eval's first
    1,000 HellaSwag-shaped items met 51 of them (47 s compiling, 3 s scoring). With nothing
    compiled that holds `laid`, it runs as it is and compiles now."""
    key = program_key(top, laid)
    with self._programs:
      if key in self._ready:
        return laid
      wider = min((other for other in self._ready if holds(other, key)), default=None)
      if wider is None:
        self._ready.add(key)  # compiled by the call this returns to
        return laid
      self._wanted[key] += 1
      later = (key not in self._compiling and key not in self._failed
               and self._wanted[key] >= COMPILE_AFTER)
      if later:
        self._compiling.add(key)
        self.metrics.scoring_programs_compiling.set(len(self._compiling))
    if later:
      log.info("scoring: a pack of width %d, context %d, windows %d/%d compiles on another "
               "thread; until then such packs run as width %d, context %d, windows %d/%d",
               *key[1:], *wider[1:])
      self._compiler.submit(self._compile, top, key, laid)
    return self._pack_with_context(prompts, reused, entries, wider[1:])

  def _compile(self, top: int, key: tuple[int, ...], laid: scoring_cache.ContextPack):
    """Compiles `laid`'s program (by running it once) on the compiler's thread. Packs of
    one that fails stay on the wider program."""
    try:
      jax.block_until_ready(self._forward_context(top, laid))
      compiled = True
    except Exception:  # noqa: BLE001 - the wider program still serves these packs
      log.exception("scoring: compiling the program of width %d, context %d, windows %d/%d "
                    "failed; such packs stay on a wider one", *key[1:])
      compiled = False
    with self._programs:
      (self._ready if compiled else self._failed).add(key)
      self._compiling.discard(key)
      self.metrics.scoring_programs_compiling.set(len(self._compiling))

  def programs_compiling(self) -> int:
    """Programs compiling on the compiler's thread now (`_runnable`)."""
    with self._programs:
      return len(self._compiling)

  def _pack_with_context(self, prompts, reused, entries, shape: tuple[int, ...] | None = None
                         ) -> scoring_cache.ContextPack:
    """`prompts` laid for the narrowest program that holds them, or for `shape`'s (width,
    context width, lookback, context window) when given."""
    c = self.engine.config
    width_of, context_width_of, windows = (
        (lambda tokens: pack_width(tokens, self.budget), scoring_cache.context_width, None)
        if shape is None else (lambda _: shape[0], lambda _: shape[1], shape[2:]))
    return scoring_cache.pack_with_context(
        prompts, reused, entries, self.budget, width_of, context_width_of,
        max_seqs, c.num_layers, c.num_kv_heads, c.head_dim, jnp.dtype(c.dtype), windows)

  def _forward_context(self, top: int, laid: scoring_cache.ContextPack):
    """The context path's forward over `laid`, on the program `program_key` names:
    (scores, the last positions' hidden states, the keys and values)."""
    return self._score_context[top](
        self.engine.params, laid.tokens, laid.positions, laid.segment_ids, laid.branch_ids,
        laid.context_ids, laid.predecessor, laid.last, laid.context, laid.context_owner,
        laid.context_start, lookback=laid.lookback, context_window=laid.context_window)

  def _deliver(self, request: Request, step: Step, row: int):
    if request.max_tokens == 0:
      self._finish(request, None)
      return
    try:
      delta = request.next_delta(step, row, self.engine.stop_ids)
      request.emit(delta)
    except Exception as e:  # noqa: BLE001 - its text (detokenizing, stop strings)
      self._finish(request, e)
      return
    self.metrics.generated_tokens.inc()
    self._finish(request, None)

  @staticmethod
  def _finish(request: Request, outcome: BaseException | None):
    request.finished = True
    try:
      request.emit(outcome)
    except RuntimeError:  # the consumer's event loop is gone: nobody is listening
      pass


def program_key(top: int, laid: scoring_cache.ContextPack) -> tuple[int, ...]:
  """What sets a context pack's compiled program: (top, width, context width, lookback,
  context window)."""
  return top, laid.tokens.shape[1], laid.context.shape[2], laid.lookback, laid.context_window


def holds(wider: tuple[int, ...], key: tuple[int, ...]) -> bool:
  """Whether the program `wider` can score a pack of program `key`, laid at its widths."""
  return wider[0] == key[0] and all(a >= b for a, b in zip(wider[1:], key[1:]))


def prompt_logprobs(scores: PackedScores, span: np.ndarray, top: int) -> PromptLogprobs:
  """One prompt's share of a pack's scores (`span`: where its tokens are), as
  `PromptLogprobs.of` takes it from a prefill."""
  return PromptLogprobs(scores.logprobs[span[1:]].tolist(), scores.top_tokens[span[:-1], :top],
                        scores.top_logprobs[span[:-1], :top])
