"""Continuous batching: many requests share the engine's decode slots.

One thread owns the engine. Each turn of its loop admits waiting requests into free slots
(prefill, then insert), queues one `generate` step for every occupied slot, and only then
hands each request its token from the step before as a `Delta` holding the text that token
made stable: the device computes step N+1 while this thread turns step N into text, so on two
or more cores the Python work per token hides behind the model's. A request that ends (eos, a
stop string, max_tokens) or is cancelled (its client left) frees its slot at once; the token
the step already in flight made for it is dropped, and a waiting request takes the slot at the
next turn while the others keep decoding.

A request's prompt is prefilled straight into its blocks, after the part the prefix cache
already holds, in chunks: each turn prefills at most the engine's `max_prefill_chunk` prompt
tokens before the decode step, so while a long prompt arrives each running request waits one
chunk's time per token, not the whole prefill's (see `serving.paged_prefill`). An image prompt is
prefilled whole in the turn it is admitted, in one call with the other image prompts admitted
then (see `serving.vision_prefill.ImagePrefills`).

A request is admitted only when the paged KV cache has free blocks for it. When a decode step
finds no block for some request's next token, the tokens made so far are delivered (which may
end requests and free blocks) and, if that is not enough, the youngest request is preempted:
its blocks are freed and it waits at the head of the line, to be prefilled again over its
prompt and the tokens it already has. It is never failed for lack of memory.

What one request brings (its prompt and settings at admission, its tokens' text at delivery)
can fail that request alone: it gets a `RequestFailed` and the loop goes on. Only a failure of
the shared decode step ends the loop, and with it every request (`Unavailable`).
"""

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Literal

import jax
import numpy as np

from maxlm.sampling import PromptScores, TokenChoice
from serving.detokenize import TextStream
from serving.engine import Engine, SamplingSettings, Step
from serving.kv_pages import PoolExhausted
from serving.metrics import ServerMetrics

log = logging.getLogger("serving")
FinishReason = Literal["stop", "length"]


class QueueFull(Exception):
  """Every slot is busy and the waiting line is at its limit (HTTP 429)."""


class Unavailable(Exception):
  """The engine loop has died or the server is shutting down (HTTP 503)."""


class RequestFailed(Exception):
  """Admitting or delivering one request failed; the others go on (HTTP 500)."""


@dataclasses.dataclass(frozen=True)
class Delta:
  """One generated token and the text it made stable (often "", e.g. mid-character)."""
  text: str
  token_id: int
  finish_reason: FinishReason | None  # set on the last delta only
  logprob: float = 0.0                # log p(token) under the model (untempered)
  top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
  """`echo`: how likely the model found each prompt token after the first, from the prefill.
  The alternatives stay arrays: an lm-eval request echoes thousands of tokens, and pairs made
  one by one were most of the scoring thread's own time."""
  logprobs: list[float]       # token t + 1's, for t in [0, len - 1)
  top_tokens: np.ndarray      # int [len - 1, top]: the likeliest after token t, most likely first
  top_logprobs: np.ndarray    # float32 [len - 1, top]: their log-probabilities

  @classmethod
  def of(cls, scores: PromptScores, length: int, top: int) -> "PromptLogprobs":
    logprobs, top_tokens, top_logprobs = jax.device_get(
        (scores.logprobs[0, 1:length], scores.top_tokens[0, 1:length, :top],
         scores.top_logprobs[0, 1:length, :top]))
    return cls(logprobs.tolist(), np.asarray(top_tokens), np.asarray(top_logprobs))

  def alternatives(self) -> list[tuple[tuple[int, float], ...]]:
    """(token id, logprob) pairs after each token, most likely first."""
    return [tuple(zip(tokens, values)) for tokens, values in
            zip(self.top_tokens.tolist(), self.top_logprobs.tolist())]


# What `Request.emit` receives after its last Delta: None when it finished, else the error.
Emit = Callable[[Delta | BaseException | None], None]


class Request:
  """One generation request and its progress through the slots."""

  def __init__(self, prompt_ids: list[int], *, max_tokens: int, emit: Emit,
               settings: SamplingSettings = SamplingSettings(), stops: list[str] | None = None,
               ignore_eos: bool = False, top_logprobs: int = 0, echo: bool = False,
               images: list | None = None):
    self.prompt_ids, self.max_tokens, self.emit = prompt_ids, max_tokens, emit
    self.images = images  # uint8 pixels for the prompt's placeholders
    self.settings, self.stops, self.ignore_eos = settings, stops or [], ignore_eos
    self.top_logprobs = top_logprobs
    # echo: the prompt's own logprobs, set before the first Delta (max_tokens=0: before None)
    self.echo, self.prompt_logprobs = echo, None
    self.generated = 0
    self.token_ids: list[int] = []  # generated so far: a preempted request resumes after them
    self.admitted = -1  # admission order; the largest is the youngest
    self.cancelled = False
    self.prefilling = False  # holds a slot whose prompt is still being prefilled, in chunks
    self.finished = False  # set once it has ended, left or failed: its slot is free
    self.submitted = self.last_token_at = 0.0
    self.text: TextStream | None = None

  def cancel(self):
    """Thread-safe: the loop frees the request's slot before its next decode step."""
    self.cancelled = True

  def next_delta(self, step: Step, row: int, stop_ids: frozenset[int]) -> Delta:
    token_id = int(step.tokens[row])
    self.generated += 1
    self.token_ids.append(token_id)
    top = tuple(zip(step.top_tokens[row, :self.top_logprobs].tolist(),
                    step.top_logprobs[row, :self.top_logprobs].tolist()))
    finish_reason = None
    if token_id in stop_ids and not self.ignore_eos:
      text, finish_reason = self.text.flush(), "stop"
    else:
      text, stopped = self.text.push(token_id)
      if stopped:
        finish_reason = "stop"
      elif self.generated >= self.max_tokens:
        text, finish_reason = text + self.text.flush(), "length"
    return Delta(text, token_id, finish_reason, float(step.logprobs[row]), top)


@dataclasses.dataclass(frozen=True)
class Pending:
  """A queued step's choice, still on the device, and the request each of its rows is for."""
  choice: TokenChoice
  rows: list[Request | None]
  prompt_scores: PromptScores | None = None  # a prefill's, for an `echo` request
  first: bool = False  # a prefill's token (one row), not a decode step's


_STARTING = threading.Lock()  # one Orchestrator.start at a time: the engine check and claim


class Orchestrator:
  """Admits, batches and finishes requests on `engine`; start() before submit()."""

  def __init__(self, engine: Engine, *, max_queue: int = 64,
               metrics: ServerMetrics | None = None):
    self.engine, self.max_queue = engine, max_queue
    self.metrics = metrics or ServerMetrics()
    self.error: BaseException | None = None
    self._slots: list[Request | None] = [None] * engine.slots
    self._waiting: collections.deque[Request] = collections.deque()
    self._wake = threading.Condition()
    self._admissions = itertools.count()
    self._stopping = False
    self._aborting = False
    self._resets: list[threading.Event] = []  # reset_prefix_cache callers waiting
    # The real engine prefills into the pool (prefix cache, chunks); a stand-in with only
    # JetStream's prefill and insert is driven through those.
    self._prefills_in_pool = hasattr(engine, "begin_prefill")
    self._thread = threading.Thread(target=self._run, name="maxlm-orchestrator", daemon=True)

  # --- the caller's side (any thread) ----------------------------------------------------------

  def start(self) -> "Orchestrator":
    """Starts the loop. An engine serves one running Orchestrator at a time: its page tables
    and prefix cache (`Engine.init_decode_state`) index that one's KV pool, so a second one
    would hand the first blocks it never wrote."""
    with _STARTING:
      driver = getattr(self.engine, "driven_by", None)
      if driver is not None and driver is not self and driver._thread.is_alive():
        raise RuntimeError(
            "this Engine already serves a running Orchestrator, whose KV pool its page tables "
            "and prefix cache index; shut that one down first, or give each Orchestrator its "
            "own Engine (Engine.from_checkpoint)")
      self.engine.driven_by = self
      self._thread.start()
    return self

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  @property
  def active(self) -> int:
    """Requests holding a decode slot now."""
    return sum(request is not None for request in self._slots)

  def submit(self, request: Request):
    """Queues `request`; raises QueueFull or Unavailable instead of accepting what cannot run."""
    self.submit_all([request])

  def submit_all(self, requests: list[Request]):
    """Queues all of `requests` (one HTTP request's prompts) or, raising QueueFull or
    Unavailable, none: concurrent batches then cannot each get in part and all be refused.
    Requests whose clients left while they waited count for nothing."""
    with self._wake:
      if self.error is not None or not self._thread.is_alive():
        raise Unavailable(f"the engine loop has stopped: {self.error!r}")
      if self._stopping:
        raise Unavailable("the server is shutting down")
      self._drop_cancelled_waiting()
      if len(self._waiting) + len(requests) > self.max_queue:
        also = f" and this one brings {len(requests)}" if len(requests) > 1 else ""
        raise QueueFull(f"{len(self._waiting)} requests are already waiting for a slot{also} "
                        f"(--max_queue {self.max_queue}); retry later")
      for request in requests:
        request.submitted = time.perf_counter()
        request.text = TextStream(self.engine.decode, request.stops, request.prompt_ids)
        self._waiting.append(request)
      self.metrics.queue_depth.set(len(self._waiting))
      self._wake.notify()

  def _drop_cancelled_waiting(self):
    """Ends the waiting requests whose clients left (under `_wake`)."""
    if not any(request.cancelled for request in self._waiting):
      return
    left = [request for request in self._waiting if request.cancelled]
    self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
    for request in left:
      self._release(request)

  def shutdown(self, grace_s: float = 30.0, wait: bool = True):
    """Stops admitting new requests; those accepted run to the end, for at most `grace_s`
    seconds, after which each gets Unavailable."""
    with self._wake:
      self._stopping = True
      self._wake.notify()
    timer = threading.Timer(grace_s, self._abort)
    timer.daemon = True
    timer.start()
    if wait:
      self._thread.join()
      timer.cancel()

  def generate(self, prompt_ids: list[int], **request_args) -> list[Delta]:
    """Blocking convenience: every Delta of one request."""
    deltas: queue.Queue = queue.Queue()
    self.submit(Request(prompt_ids, emit=deltas.put, **request_args))
    result = []
    while (item := deltas.get()) is not None:
      if isinstance(item, BaseException):
        raise item
      result.append(item)
    return result

  # --- the loop (its own thread) ---------------------------------------------------------------

  def reset_prefix_cache(self):
    """Forgets the prefix cache's blocks that no running request holds, on the engine loop's
    thread (which owns the pool) before its next step; returns once done."""
    if not self.alive:
      raise Unavailable(f"the engine loop is not running: {self.error!r}")
    done = threading.Event()
    with self._wake:
      self._resets.append(done)
      self._wake.notify()
    if not done.wait(60):
      raise Unavailable("the engine loop did not reset its prefix cache within 60 s")

  def _forget_prefixes(self):
    """Runs the resets asked for (the loop's thread, `_wake` held)."""
    resets, self._resets = self._resets, []
    allocator = getattr(getattr(self.engine, "pages", None), "allocator", None)
    if resets and hasattr(allocator, "forget_unheld"):
      allocator.forget_unheld()
    for done in resets:
      done.set()

  def _abort(self):
    with self._wake:
      self._aborting = True
      self._wake.notify()

  def _run(self):
    try:
      state = self.engine.init_decode_state()
      in_flight: Pending | None = None
      while (admitted := self._next_admissions()) is not None:
        undelivered = [in_flight] if in_flight else []
        state = self._admit_all(admitted, state, undelivered)
        state = self._prefill_images(state, undelivered)
        state = self._prefill_chunks(state, undelivered)
        queued = None
        try:
          state, queued = self._step(state, undelivered)
        finally:  # should that step fail, the tokens made before it still reach their requests
          self._deliver_pending(undelivered)
        in_flight = queued
        self.metrics.active_slots.set(sum(r is not None for r in self._slots))
    except BaseException as e:  # noqa: BLE001 - every request must hear of it, then /health
      log.exception("the engine loop died")
      self.error = e
      self._fail_all(Unavailable(f"the engine loop died: {e!r}"))

  def _next_admissions(self) -> list[tuple[int, Request]] | None:
    """Waits for work; (free slot, request) pairs to admit now, or None once shut down."""
    with self._wake:
      while not (self._waiting or any(self._slots) or self._stopping):
        self._forget_prefixes()
        self._wake.wait()
      self._forget_prefixes()
      if self._aborting or (self._stopping and not (self._waiting or any(self._slots))):
        self._fail_all(Unavailable("the server shut down before the request finished"))
        return None
      free = [slot for slot, request in enumerate(self._slots) if request is None]
      admitted = []
      while free and self._waiting:
        admitted.append((free.pop(0), self._waiting.popleft()))
      self.metrics.queue_depth.set(len(self._waiting))
      return admitted

  def _admit_all(self, admitted: list[tuple[int, Request]], state, first_tokens: list["Pending"]):
    """Admits in order while the pool has room, and until a prompt whose prefix another one
    is still prefilling (it shares that prefix a turn later); the rest go back to the head of
    the line."""
    for index, (slot, request) in enumerate(admitted):
      ids = request.prompt_ids + request.token_ids
      if not request.cancelled and (not self.engine.fits(len(ids))
                                    or self._prefills_in_pool and self.engine.awaits_prefix(ids)):
        self._requeue([waiting for _, waiting in admitted[index:]])
        break
      state = self._admit(request, slot, state, first_tokens)
    return state

  def _requeue(self, requests: list[Request]):
    with self._wake:
      self._waiting.extendleft(reversed(requests))
      self.metrics.queue_depth.set(len(self._waiting))

  def _step(self, state, undelivered: list["Pending"]):
    """Queues one decode step for every occupied slot: (state, its Pending or None). Out of
    blocks, it first delivers `undelivered` (emptying it), then preempts the youngest."""
    while any(self._decoding()):
      try:
        state, choice = self.engine.generate(state)
        return state, Pending(choice, self._decoding())
      except PoolExhausted:
        if undelivered:
          self._deliver_pending(undelivered)
          undelivered.clear()
        else:
          self._preempt_youngest()
    return state, None

  def _decoding(self) -> list[Request | None]:
    """Each slot's request, None where it is free or still prefilling."""
    return [None if request is None or request.prefilling else request
            for request in self._slots]

  def _preempt_youngest(self):
    slot, request = max(((slot, request) for slot, request in enumerate(self._slots)
                         if request is not None), key=lambda pair: pair[1].admitted)
    self.engine.release(slot)
    self._slots[slot] = None
    self.metrics.preemptions.inc()
    log.info("the KV cache is full: preempted the youngest request after %d tokens; it "
             "resumes when blocks free up", request.generated)
    self._requeue([request])

  def _deliver_pending(self, pending: list["Pending"]):
    for each in pending:
      (self._deliver_first if each.first else self._deliver_all)(each)

  def _admit(self, request: Request, slot: int, state, first_tokens: list["Pending"]):
    """Prefills `request` into `slot`; its first token joins `first_tokens`, to deliver.

    A prefill or insert that fails leaves `state` as it was and fails this request alone."""
    if request.cancelled:
      self._release(request)
      return state
    scores = None
    try:
      ids = request.prompt_ids + request.token_ids  # a preempted request resumes after its own
      if self._prefills_in_pool and request.max_tokens and not (
          request.echo and not request.token_ids):
        return self._begin_prefill(request, slot, ids, state)
      if request.echo and not request.token_ids:
        prefix, choice, scores = self.engine.prefill_scored(ids, request.settings)
      elif request.images:
        prefix, choice = self.engine.prefill_images(ids, request.images, request.settings)
      else:
        prefix, choice = self.engine.prefill(ids, request.settings)
      if request.max_tokens:  # max_tokens=0 (echo): the prefill's scores are all it wants
        state = self.engine.insert(prefix, state, slot)
    except Exception as e:  # noqa: BLE001 - the request's own doing (its prompt, its settings)
      self.engine.release(slot)
      self._fail(request, "admitting it", e)
      return state
    if request.admitted < 0:  # not a preempted request's return
      self.metrics.prompt_tokens.inc(len(request.prompt_ids))
    request.admitted = next(self._admissions)
    if request.max_tokens:
      self._slots[slot] = request
    first_tokens.append(Pending(choice, [request], scores, first=True))
    return state

  def _begin_prefill(self, request: Request, slot: int, ids: list[int], state):
    """Gives `request` the slot and its prompt's blocks; `_prefill_chunks` runs its prompt, or
    `_prefill_images` an image prompt (whole, never from the prefix cache)."""
    if request.images:
      self.engine.begin_image_prefill(slot, ids, request.images, request.settings)
    else:
      cached = self.engine.begin_prefill(slot, ids, request.settings)
    if request.admitted < 0:  # not a preempted request's return
      self.metrics.prompt_tokens.inc(len(request.prompt_ids))
      if not request.images:
        self.metrics.observe_prefix_cache(len(ids), cached)
    request.admitted = next(self._admissions)
    request.prefilling = True
    self._slots[slot] = request
    return state

  def _prefill_images(self, state, first_tokens: list["Pending"]):
    """Queues the image prompts admitted this turn, several to a call; their first tokens
    join `first_tokens`. A call that fails fails its requests alone."""
    if not self._prefills_in_pool:
      return state
    for slots in self.engine.image_prefill_plan():
      requests = [self._slots[slot] for slot in slots]
      try:
        state, choice = self.engine.prefill_image_prompts(state, slots)
      except Exception as e:  # noqa: BLE001 - the requests' own doing (their images, settings)
        for request in requests:
          self._fail(request, "prefilling it", e)
        continue
      for request in requests:
        request.prefilling = False
      first_tokens.append(Pending(choice, requests, first=True))
    return state

  def _prefill_chunks(self, state, first_tokens: list["Pending"]):
    """Queues this turn's prompt chunks; a prompt that is done starts decoding, its first
    token joining `first_tokens`. A chunk that fails fails its request alone."""
    if not self._prefills_in_pool:
      return state
    for slot, tokens in self.engine.prefill_plan():
      request = self._slots[slot]
      if request.cancelled:
        self._release(request)
        continue
      try:
        state, choice = self.engine.prefill_chunk(state, slot, tokens)
      except Exception as e:  # noqa: BLE001 - the request's own doing (its prompt, its settings)
        self._fail(request, "prefilling it", e)
        continue
      if choice is not None:
        request.prefilling = False
        first_tokens.append(Pending(choice, [request], first=True))
    return state

  def _deliver_first(self, pending: "Pending"):
    """A prefill's tokens, a row per request it prefilled: fetching them can fail only those
    requests."""
    requests = [request for request in pending.rows if not request.finished]
    if not requests:
      return
    try:
      step = Step.from_choice(pending.choice)
      if pending.prompt_scores is not None:  # an echo request's prefill, the only row
        request = pending.rows[0]
        request.prompt_logprobs = PromptLogprobs.of(
            pending.prompt_scores, len(request.prompt_ids), request.top_logprobs)
    except Exception as e:  # noqa: BLE001
      for request in requests:
        self._fail(request, "prefilling it", e)
      return
    for row, request in enumerate(pending.rows):
      if request.finished:
        continue
      if request.max_tokens == 0:
        self._release(request)
      else:
        self._deliver(request, step, row)

  def _deliver_all(self, pending: "Pending"):
    """Each row's token to the request that held the row when the step was queued, unless
    that request has since finished or left (its slot may hold a newcomer by now)."""
    step = Step.from_choice(pending.choice)
    for row, request in enumerate(pending.rows):
      if request is not None and not request.finished:
        self._deliver(request, step, row)

  def _deliver(self, request: Request, step: Step, row: int):
    """Hands `request` its token, and frees its slot once it has finished."""
    done = request.cancelled
    if not done:
      try:
        delta = request.next_delta(step, row, self.engine.stop_ids)
      except Exception as e:  # noqa: BLE001 - its text (detokenizing, stop strings)
        self._fail(request, "turning its token into text", e)
        return
      self._observe(request)
      done = delta.finish_reason is not None
      try:
        request.emit(delta)
      except RuntimeError:  # the consumer's event loop is gone: nobody is listening
        done = True
    if done:
      self._release(request)

  def _fail(self, request: Request, doing: str, error: Exception):
    log.error("a request failed while %s; the others go on", doing, exc_info=error)
    self._release(request, RequestFailed(f"the request failed while {doing}: {error!r}"))

  def _observe(self, request: Request):
    now = time.perf_counter()
    if request.generated == 1:
      self.metrics.time_to_first_token.observe(now - request.submitted)
    else:
      self.metrics.time_per_output_token.observe(now - request.last_token_at)
    request.last_token_at = now
    self.metrics.generated_tokens.inc()

  def _release(self, request: Request, outcome: BaseException | None = None):
    request.finished = True
    for slot, occupant in enumerate(self._slots):
      if occupant is request:
        self._slots[slot] = None
        self.engine.release(slot)
    try:
      request.emit(outcome)
    except RuntimeError:
      pass

  def _fail_all(self, error: BaseException):
    with self._wake:
      waiting, self._waiting = list(self._waiting), collections.deque()
    for request in waiting + [r for r in self._slots if r is not None]:
      self._release(request, error)
    self.metrics.queue_depth.set(0)
    self.metrics.active_slots.set(0)
