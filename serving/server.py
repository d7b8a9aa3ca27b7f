"""An OpenAI-compatible REST server (the subset of /v1 that vLLM also speaks).

  python -m serving.server --checkpoint_dir=WORKDIR [--step=N] [--port=8000] [--host=127.0.0.1]
      [--slots=8] [--max_queue=64] [--quantize=int8] [--engine_cpus=auto]
      [--api_keys_file=KEYS]

/v1/completions and /v1/chat/completions, whole or streamed as server-sent events; /v1/models;
/health; /metrics (Prometheus). Requests are batched continuously over the engine's decode
slots by `serving.orchestrator`, in its own thread, so the event loop stays free to answer
/health, to stream, and to notice a client that left (its slot is freed within one step).
A full waiting line answers 429, a dead engine loop 503. SIGTERM stops accepting, lets the
requests in flight finish for --shutdown_grace_s, then ends what is left with an error event.
"""

import argparse
import asyncio
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from serving.chat import CHAT_STOPS, chat_prompt
from serving.engine import ContextLengthError, Engine, SamplingSettings
from serving.metrics import CountResponses, ServerMetrics
from serving.openai_api import (ChatCompletionRequest, CompletionRequest, Logprobs, OpenAIError,
                                ResponseShape, SamplingRequest, check_supported, error_response,
                                single_prompt, sse, validation_error)
from serving.orchestrator import Delta, Orchestrator, QueueFull, Unavailable
from serving.orchestrator import Request as Generation

log = logging.getLogger("serving")


def read_api_keys(path: str | Path) -> list[str]:
  keys = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
  if not keys:
    raise ValueError(f"--api_keys_file {path} holds no keys; write one key per line")
  return keys


def create_app(engine: Engine, model_name: str | None = None,
               api_keys: list[str] | None = None, *, max_queue: int = 64) -> FastAPI:
  """The app, with its orchestrator already running (`app.state.orchestrator`)."""
  model_name = model_name or engine.model_name
  started = int(time.time())
  metrics = ServerMetrics()
  orchestrator = Orchestrator(engine, max_queue=max_queue, metrics=metrics).start()
  app = FastAPI(title="maxlm")
  app.state.orchestrator = orchestrator
  app.add_middleware(CountResponses, metrics=metrics)

  @app.exception_handler(OpenAIError)
  async def _openai_error(_: Request, exc: OpenAIError):
    return error_response(exc)

  @app.exception_handler(RequestValidationError)
  async def _invalid_request(_: Request, exc: RequestValidationError):
    return error_response(validation_error(exc))

  @app.exception_handler(HTTPException)
  async def _http_error(_: Request, exc: HTTPException):
    return error_response(OpenAIError(exc.status_code, str(exc.detail)))

  @app.exception_handler(Unavailable)  # an expected 503: not left to the traceback-logging 500
  async def _unavailable(_: Request, exc: Unavailable):
    return error_response(server_error(exc))

  @app.exception_handler(Exception)
  async def _server_error(_: Request, exc: Exception):  # uvicorn logs the traceback
    return error_response(server_error(exc))

  async def check_api_key(request: Request):
    if not api_keys:
      return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(key.strip().encode(), known.encode()) for known in api_keys):
      raise OpenAIError(401, "missing or wrong API key; send `Authorization: Bearer KEY` with "
                        "a key from the server's --api_keys_file", code="invalid_api_key")

  @app.get("/health")
  async def health():
    if not orchestrator.alive:
      return error_response(unavailable(Unavailable(
          f"the engine loop has stopped: {orchestrator.error!r}")))
    return {"status": "ok"}

  @app.get("/metrics")
  async def prometheus_metrics():
    return Response(metrics.exposition(), media_type=metrics.content_type)

  v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

  @v1.get("/models")
  async def models():
    return {"object": "list", "data": [{
        "id": model_name, "object": "model", "created": started, "owned_by": "maxlm",
        "max_model_len": engine.context_length}]}

  def submit(request: SamplingRequest, prompt: str, max_tokens: int | None,
             stops: list[str]) -> tuple[int, AsyncIterator[list[Delta]]]:
    """(prompt token count, its deltas), refusing what cannot run before anything is sent."""
    if request.model != model_name:
      raise OpenAIError(404, f"the model `{request.model}` does not exist; this server serves "
                        f"`{model_name}`", param="model", code="model_not_found")
    check_supported(request)
    try:
      prompt_ids, max_tokens = engine.prompt_ids(prompt, max_tokens)
    except ContextLengthError as e:
      raise OpenAIError(400, str(e), param="messages" if isinstance(
          request, ChatCompletionRequest) else "prompt", code="context_length_exceeded") from e
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    settings = SamplingSettings(
        temperature=request.temperature, top_p=request.top_p, top_k=max(request.top_k, 0),
        seed=secrets.randbits(63) if request.seed is None else request.seed)
    generation = Generation(
        prompt_ids, max_tokens=max_tokens, settings=settings, stops=stops,
        ignore_eos=request.ignore_eos, top_logprobs=request.alternatives() or 0,
        emit=lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item))
    try:
      orchestrator.submit(generation)
    except QueueFull as e:
      raise OpenAIError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded") from e
    return len(prompt_ids), drain(deltas, generation)

  async def respond(request: SamplingRequest, shape: ResponseShape, prompt_tokens: int,
                    deltas: AsyncIterator[list[Delta]]):
    logprobs = (Logprobs(shape.chat, engine.token_bytes)
                if request.alternatives() is not None else None)
    if request.stream:
      return StreamingResponse(
          stream_events(request, shape, prompt_tokens, deltas, logprobs),
          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    begun = time.perf_counter()
    received = [delta async for batch in deltas for delta in batch]
    log.info("%s: %d prompt + %d generated tokens in %.2fs (%s)", shape.id, prompt_tokens,
             len(received), time.perf_counter() - begun, received[-1].finish_reason)
    return shape.whole("".join(d.text for d in received), received[-1].finish_reason,
                       prompt_tokens, len(received), logprobs and logprobs.of(received))

  async def stream_events(request: SamplingRequest, shape: ResponseShape, prompt_tokens: int,
                          deltas: AsyncIterator[list[Delta]],
                          logprobs: Logprobs | None) -> AsyncIterator[str]:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def chunk(text, finish_reason=None, first=False, of=()):
      return sse(shape.chunk(text, finish_reason, first=first, with_usage_field=include_usage,
                             logprobs=logprobs.of(list(of)) if logprobs and of else None))

    generated = 0
    try:
      if shape.chat:
        yield chunk("", first=True)
      async for batch in deltas:
        generated += len(batch)
        text, finish_reason = "".join(d.text for d in batch), batch[-1].finish_reason
        if shape.chat and finish_reason:
          if text or logprobs:
            yield chunk(text, of=batch)
          yield chunk(None, finish_reason)
        elif text or finish_reason or logprobs:
          yield chunk(text, finish_reason, of=batch)
    except Exception as e:  # the status line is sent; report in the stream, as vLLM does
      error = server_error(e)
      log.warning("%s ended early: %s", shape.id, error.message)
      yield sse(error.body())
    if include_usage:
      yield sse(shape.usage_chunk(prompt_tokens, generated))
    yield sse("[DONE]")

  @v1.post("/completions")
  async def completions(request: CompletionRequest):
    prompt_tokens, deltas = submit(request, single_prompt(request), request.max_tokens,
                                   request.stops())
    return await respond(request, ResponseShape(model_name, chat=False), prompt_tokens, deltas)

  @v1.post("/chat/completions")
  async def chat_completions(request: ChatCompletionRequest):
    prompt = chat_prompt([(message.role, message.text()) for message in request.messages])
    max_tokens = request.max_completion_tokens or request.max_tokens
    prompt_tokens, deltas = submit(request, prompt, max_tokens, request.stops() + CHAT_STOPS)
    return await respond(request, ResponseShape(model_name, chat=True), prompt_tokens, deltas)

  app.include_router(v1)
  return app


async def drain(deltas: asyncio.Queue, generation: Generation) -> AsyncIterator[list[Delta]]:
  """The deltas the orchestrator puts on `deltas`, a chunk's worth at a time: one delta, or
  all that arrived while the last chunk was being sent. A stream keeps up token by token until
  the event loop falls behind the engine; then it sends fewer, longer chunks (as vLLM's stream
  interval does) rather than falling further behind. Leaving early cancels the generation."""
  try:
    while True:
      batch, item = [], await deltas.get()
      while isinstance(item, Delta):
        batch.append(item)
        item = deltas.get_nowait() if not deltas.empty() else ...  # ...: nothing more yet
      if batch:
        yield batch
      if isinstance(item, BaseException):
        raise item
      if item is None:
        return
  finally:
    generation.cancel()


def unavailable(error: Unavailable) -> OpenAIError:
  return OpenAIError(503, str(error), type_="server_error", code="service_unavailable")


def server_error(error: Exception) -> OpenAIError:
  """What a failure while generating becomes: 503 if the engine is gone, else 500."""
  if isinstance(error, Unavailable):
    return unavailable(error)
  return OpenAIError(500, f"internal error: {error}", type_="server_error")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint_dir", required=True,
                      help="a `python -m maxlm.train` --workdir, or its checkpoints/ dir")
  parser.add_argument("--step", type=int, default=None,
                      help="the checkpoint step to serve; default: the latest (a corrupt one is "
                      "refused, naming the newest intact step)")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--model_name", default=None, help="model id; default: the run dir's name")
  parser.add_argument("--max_len", type=int, default=None,
                      help="cap the context (and KV cache) below the model's max_seq_len")
  parser.add_argument("--slots", type=int, default=8,
                      help="decode slots: requests generating at once (continuous batching)")
  parser.add_argument("--max_queue", type=int, default=64,
                      help="requests that may wait for a slot; one more gets 429")
  parser.add_argument("--quantize", choices=("none", "int8"), default="none",
                      help="int8: weight-only int8 (4x smaller weights at rest)")
  parser.add_argument("--shutdown_grace_s", type=float, default=30.0,
                      help="on SIGTERM/SIGINT, how long requests in flight may still run")
  parser.add_argument("--engine_cpus", default="auto",
                      help="how many CPU cores the model (XLA's threads) may use: a number, "
                      "`all`, or `auto` (every core but one when there are two or more); the "
                      "HTTP event loop and the decode loop's Python run on the cores left over, "
                      "or on all if none are")
  parser.add_argument("--api_keys_file", default=None,
                      help="one API key per line; when set, /v1 requires `Authorization: Bearer "
                      "KEY` (/health and /metrics stay open)")
  return parser.parse_args(argv)


class DrainingServer(uvicorn.Server):
  """uvicorn, plus: the first SIGTERM/SIGINT also tells the orchestrator to stop admitting and
  to end what still runs after the grace period, so every open stream closes cleanly."""

  def __init__(self, config: uvicorn.Config, orchestrator: Orchestrator, grace_s: float):
    super().__init__(config)
    self.orchestrator, self.grace_s = orchestrator, grace_s

  def handle_exit(self, sig, frame):
    if not self.should_exit:
      log.info("shutting down: finishing requests in flight (at most %.0fs)", self.grace_s)
      self.orchestrator.shutdown(self.grace_s, wait=False)
    super().handle_exit(sig, frame)


def log_to_stderr():
  """Our request lines at INFO, without raising every library's logging to INFO."""
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


PINNING = hasattr(os, "sched_setaffinity")  # Linux; elsewhere every thread runs anywhere


def pin_this_thread(cpus: list[int]):
  """This thread, and the threads it starts from now on, run on `cpus` only."""
  if PINNING:
    os.sched_setaffinity(0, cpus)


def engine_cpus(cpus: str, available: list[int]) -> list[int]:
  """The cores --engine_cpus names, out of those this process may run on."""
  if cpus == "all":
    return available
  if cpus == "auto":
    return available[:max(1, len(available) - 1)]
  try:
    count = int(cpus)
  except ValueError:
    count = 0
  if not 1 <= count <= len(available):
    raise ValueError(f"--engine_cpus={cpus!r}; give a number from 1 to {len(available)}, "
                     "`all` or `auto`")
  return available[:count]


def main(argv=None):
  args = parse_args(argv)
  log_to_stderr()
  try:
    # Before JAX starts: XLA sizes its CPU thread pool by the cores the process may use, and
    # a parallel op whose threads share a core with HTTP work waits for the slowest of them.
    # XLA's threads, started from here on, inherit these cores; the orchestrator's thread is
    # started after the repinning below.
    available = sorted(os.sched_getaffinity(0)) if PINNING else list(range(os.cpu_count() or 1))
    engine_cores = engine_cpus(args.engine_cpus, available)
    pin_this_thread(engine_cores)
    api_keys = read_api_keys(args.api_keys_file) if args.api_keys_file else None
    engine = Engine.from_checkpoint(args.checkpoint_dir, step=args.step,
                                    model_name=args.model_name,
                                    max_len=args.max_len, slots=args.slots,
                                    quantize=args.quantize)
  except (OSError, ValueError) as e:
    raise SystemExit(f"serving.server: {e}") from None
  start = time.perf_counter()
  engine.warmup()
  log.info("compiled in %.1fs; serving %s (context %d, %d slots, weights %s) on http://%s:%d",
           time.perf_counter() - start, engine.model_name, engine.context_length, engine.slots,
           engine.quantize, args.host, args.port)
  # XLA's threads exist now, pinned to the engine's cores. This thread, which runs the event
  # loop, and the orchestrator's, which create_app starts, take the other cores: both are
  # Python and take turns on the GIL, and while they turn one step's tokens into text, XLA
  # computes the next step undisturbed (see serving.orchestrator).
  http_cores = [cpu for cpu in available if cpu not in engine_cores] or available
  pin_this_thread(http_cores)
  app = create_app(engine, api_keys=api_keys, max_queue=args.max_queue)
  log.info("model on CPU cores %s; HTTP and the decode loop on %s", engine_cores, http_cores)
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                          timeout_graceful_shutdown=args.shutdown_grace_s + 5)
  DrainingServer(config, app.state.orchestrator, args.shutdown_grace_s).run()


if __name__ == "__main__":
  main()
