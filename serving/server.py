"""An OpenAI-compatible REST server (the subset of /v1 that vLLM also speaks).

  python -m serving.server --checkpoint_dir=WORKDIR [--port=8000] [--host=127.0.0.1]
      [--api_keys_file=KEYS]

/v1/completions and /v1/chat/completions, whole or streamed as server-sent events; /v1/models;
/health; /metrics (Prometheus). Generation runs in a worker thread, one request at a time, so
the event loop stays free to answer /health, to stream, and to notice a client that left.
"""

import argparse
import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from serving.chat import CHAT_STOPS, chat_prompt
from serving.engine import ContextLengthError, Delta, Engine
from serving.metrics import CountResponses, ServerMetrics
from serving.openai_api import (ChatCompletionRequest, CompletionRequest, OpenAIError,
                                ResponseShape, SamplingRequest, check_supported, error_response,
                                single_prompt, sse, validation_error)

log = logging.getLogger("serving")
_DONE = object()


def read_api_keys(path: str | Path) -> list[str]:
  keys = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
  if not keys:
    raise ValueError(f"--api_keys_file {path} holds no keys; write one key per line")
  return keys


class SerialGenerator:
  """Runs engine streams one at a time in a worker thread, handing deltas to the event loop.

  A consumer that stops reading (a client that disconnected cancels it) stops its generation
  before the next decode step.
  """

  def __init__(self, metrics: ServerMetrics):
    self.lock = asyncio.Lock()
    self.metrics = metrics

  async def run(self, deltas: Iterator[Delta], prompt_tokens: int) -> AsyncIterator[Delta]:
    accepted = time.perf_counter()
    self.metrics.queue_depth.inc()
    try:
      await self.lock.acquire()
    finally:
      self.metrics.queue_depth.dec()
    self.metrics.running.inc()
    self.metrics.prompt_tokens.inc(prompt_tokens)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def work():
      try:
        for delta in deltas:
          loop.call_soon_threadsafe(queue.put_nowait, delta)
          if stop.is_set():
            break
      except Exception as e:  # handed to the consumer, which re-raises it
        loop.call_soon_threadsafe(queue.put_nowait, e)
      finally:
        deltas.close()
        loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = loop.run_in_executor(None, work)
    last = None
    try:
      while (item := await queue.get()) is not _DONE:
        if isinstance(item, Exception):
          raise item
        now = time.perf_counter()
        if last is None:
          self.metrics.time_to_first_token.observe(now - accepted)
        else:
          self.metrics.time_per_output_token.observe(now - last)
        last = now
        self.metrics.generated_tokens.inc()
        yield item
    finally:
      stop.set()
      # The engine is free only once its thread is done. No await here: a cancelled stream
      # (anyio cancels every await in its scope) would skip the release.
      worker.add_done_callback(self._release)

  def _release(self, _):
    self.metrics.running.dec()
    self.lock.release()


def create_app(engine: Engine, model_name: str | None = None,
               api_keys: list[str] | None = None) -> FastAPI:
  model_name = model_name or engine.model_name
  started = int(time.time())
  metrics = ServerMetrics()
  generator = SerialGenerator(metrics)
  app = FastAPI(title="maxlm")
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

  @app.exception_handler(Exception)
  async def _server_error(_: Request, exc: Exception):  # uvicorn logs the traceback
    return error_response(OpenAIError(500, f"internal error: {exc}", type_="server_error"))

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

  def start(request: SamplingRequest, prompt: str, max_tokens: int | None, stops: list[str]):
    """(prompt token count, lazy deltas), refusing what does not fit before anything runs."""
    if request.model != model_name:
      raise OpenAIError(404, f"the model `{request.model}` does not exist; this server serves "
                        f"`{model_name}`", param="model", code="model_not_found")
    check_supported(request)
    try:
      prompt_ids, max_tokens = engine.prompt_ids(prompt, max_tokens)
    except ContextLengthError as e:
      raise OpenAIError(400, str(e), param="messages" if isinstance(
          request, ChatCompletionRequest) else "prompt", code="context_length_exceeded") from e
    deltas = engine.stream(prompt_ids, max_tokens=max_tokens, temperature=request.temperature,
                           top_p=request.top_p, seed=request.seed, stop=stops)
    return len(prompt_ids), deltas

  async def respond(request: SamplingRequest, shape: ResponseShape, prompt_tokens: int,
                    deltas: Iterator[Delta]):
    begun = time.perf_counter()
    if request.stream:
      return StreamingResponse(
          stream_events(request, shape, prompt_tokens, deltas),
          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, finish_reason = [], None
    async for delta in generator.run(deltas, prompt_tokens):
      texts.append(delta.text)
      finish_reason = delta.finish_reason
    log.info("%s: %d prompt + %d generated tokens in %.2fs (%s)", shape.id, prompt_tokens,
             len(texts), time.perf_counter() - begun, finish_reason)
    return shape.whole("".join(texts), finish_reason, prompt_tokens, len(texts))

  async def stream_events(request: SamplingRequest, shape: ResponseShape, prompt_tokens: int,
                          deltas: Iterator[Delta]) -> AsyncIterator[str]:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    chunk = lambda text, finish_reason=None, first=False: sse(shape.chunk(
        text, finish_reason, first=first, with_usage_field=include_usage))
    generated = 0
    try:
      if shape.chat:
        yield chunk("", first=True)
      async for delta in generator.run(deltas, prompt_tokens):
        generated += 1
        if shape.chat and delta.finish_reason:
          if delta.text:
            yield chunk(delta.text)
          yield chunk(None, delta.finish_reason)
        elif delta.text or delta.finish_reason:
          yield chunk(delta.text, delta.finish_reason)
    except Exception as e:  # the status line is sent; report in the stream, as vLLM does
      log.exception("%s failed mid-stream", shape.id)
      yield sse(OpenAIError(500, f"internal error: {e}", type_="server_error").body())
    if include_usage:
      yield sse(shape.usage_chunk(prompt_tokens, generated))
    yield sse("[DONE]")

  @v1.post("/completions")
  async def completions(request: CompletionRequest):
    prompt_tokens, deltas = start(request, single_prompt(request), request.max_tokens,
                                  request.stops())
    return await respond(request, ResponseShape(model_name, chat=False), prompt_tokens, deltas)

  @v1.post("/chat/completions")
  async def chat_completions(request: ChatCompletionRequest):
    prompt = chat_prompt([(message.role, message.text()) for message in request.messages])
    max_tokens = request.max_completion_tokens or request.max_tokens
    prompt_tokens, deltas = start(request, prompt, max_tokens, request.stops() + CHAT_STOPS)
    return await respond(request, ResponseShape(model_name, chat=True), prompt_tokens, deltas)

  app.include_router(v1)
  return app


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint_dir", required=True,
                      help="a `python -m maxlm.train` --workdir, or its checkpoints/ dir")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--model_name", default=None, help="model id; default: the run dir's name")
  parser.add_argument("--max_len", type=int, default=None,
                      help="cap the context (and KV cache) below the model's max_seq_len")
  parser.add_argument("--api_keys_file", default=None,
                      help="one API key per line; when set, /v1 requires `Authorization: Bearer "
                      "KEY` (/health and /metrics stay open)")
  return parser.parse_args(argv)


def log_to_stderr():
  """Our request lines at INFO, without raising every library's logging to INFO."""
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


def main(argv=None):
  args = parse_args(argv)
  log_to_stderr()
  try:
    api_keys = read_api_keys(args.api_keys_file) if args.api_keys_file else None
    engine = Engine.from_checkpoint(args.checkpoint_dir, model_name=args.model_name,
                                    max_len=args.max_len)
  except (OSError, ValueError) as e:
    raise SystemExit(f"serving.server: {e}") from None
  start = time.perf_counter()
  engine.warmup()
  log.info("compiled in %.1fs; serving %s (context %d) on http://%s:%d",
           time.perf_counter() - start, engine.model_name, engine.context_length, args.host,
           args.port)
  uvicorn.run(create_app(engine, api_keys=api_keys), host=args.host, port=args.port,
              log_level="info")


if __name__ == "__main__":
  main()
