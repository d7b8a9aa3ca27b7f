"""An OpenAI-compatible REST server (the subset of /v1 that vLLM also speaks).

  python -m serving.server --checkpoint_dir=WORKDIR [--step=N] [--port=8000] [--host=127.0.0.1]
      [--slots=8] [--kv_cache_memory=GiB] [--no-enable_prefix_caching] [--max_prefill_chunk=512]
      [--scoring_cache_mb=256]
      [--max_queue=64] [--quantize=int8] [--kv_cache_dtype=int8] [--dtype=bfloat16]
      [--engine_cpus=auto] [--compilation_cache_dir=~/.cache/maxlm/xla]
      [--api_keys_file=KEYS] [--max_request_bytes=8388608] [--max_connections=1024]
      [--header_timeout_s=10] [--body_timeout_s=60]

/v1/completions and /v1/chat/completions, whole or streamed as server-sent events; /v1/models;
/health; /metrics (Prometheus). Requests are batched continuously over the engine's decode
slots by `serving.orchestrator`, in its own thread, so the event loop stays free to answer
/health, to stream, and to notice a client that left (its slot is freed within one step).
A full waiting line answers 429, a dead engine loop 503. SIGTERM stops accepting, lets the
requests in flight finish for --shutdown_grace_s, then ends what is left with an error event.
A request is refused from its headers when it lacks an API key (401) or declares a body over
--max_request_bytes (413); clients that send too slowly are disconnected (`serving.connections`).
"""

import argparse
import asyncio
import logging
import os
import resource
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jinja2
import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from maxlm import checkpoint, compilation_cache
from maxlm.errors import UserError
from maxlm.model import count_params
from serving import scoring_cache
from serving.chat import (CHAT_STOPS, chat_prompt, compiled_template, hf_chat_prompt,
                          missing_pieces)
from serving.chat_images import DEFAULT_MEDIA, MediaPolicy, request_images
from serving.connections import ConnectionLimits, guarded_protocol
from serving.engine import ContextLengthError, Engine, SamplingSettings
from serving.guards import DEFAULT_MAX_REQUEST_BYTES, LimitBody, RequireApiKey
from serving.metrics import CountResponses, ServerMetrics
from serving.openai_api import (
  ChatCompletionRequest,
  CompletionRequest,
  DetokenizeRequest,
  Logprobs,
  OpenAIError,
  ResponseShape,
  SamplingRequest,
  TokenizeRequest,
  TokenTexts,
  check_completion,
  check_supported,
  error_response,
  sse,
  validation_error,
)
from serving.openapi import errors, generation_responses, install_spec, text
from serving.orchestrator import (
  Delta,
  Orchestrator,
  QueueFull,
  RequestFailed,
  Unavailable,
)
from serving.orchestrator import Request as Generation
from serving.paged_prefill import DEFAULT_PREFILL_CHUNK
from serving.scoring import Scorer

log = logging.getLogger("serving")


def read_api_keys(path: str | Path) -> list[str]:
  try:
    text = Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else e
    raise ValueError(f"--api_keys_file {path} cannot be read ({reason}); name a text file "
                     "of keys, one per line") from None
  keys = [line.strip() for line in text.splitlines() if line.strip()]
  if not keys:
    raise ValueError(f"--api_keys_file {path} holds no keys; write one key per line")
  return keys


def create_app(engine: Engine, model_name: str | None = None,
               api_keys: list[str] | None = None, *, max_queue: int = 64,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               media: MediaPolicy = DEFAULT_MEDIA, scorer: Scorer | None = None) -> FastAPI:
  """The app, with its orchestrator already running (`app.state.orchestrator`), and the
  scorer of lm-eval's requests (`app.state.scorer`; made here unless given, None for a
  stand-in engine without a model). A request's omitted temperature, top_p and top_k are
  the engine's `sampling_defaults` (its run dir's generation_config.json)."""
  model_name = model_name or engine.model_name
  sampling_defaults = getattr(engine, "sampling_defaults", {})  # a stand-in engine has none
  # The engine hook for images: an engine with a vision tower says its image side here.
  image_size = getattr(engine, "image_size", None)
  # An imported model's own tokenizer has no chat tokens: rendered as plain text, maxlm's
  # template would be a prompt the model never saw. Its own Hugging Face template (if it
  # brought one) renders its chats instead; without one, chat is refused.
  tokenizer = getattr(engine, "tokenizer", None)  # a stand-in engine has none
  missing_chat_tokens = missing_pieces(tokenizer, CHAT_STOPS) if tokenizer is not None else []
  model_template = usable_template(tokenizer) if missing_chat_tokens else None
  if model_template:  # the template's bos is the one engine.prompt_ids puts in front
    template_bos, template_eos = (tokenizer.id_to_piece(tokenizer.bos_id()),
                                  tokenizer.id_to_piece(tokenizer.eos_id()))
  started = int(time.time())
  token_texts = TokenTexts(lambda token_id: engine.token_bytes(token_id))
  metrics = ServerMetrics()
  orchestrator = Orchestrator(engine, max_queue=max_queue, metrics=metrics).start()
  if scorer is None and isinstance(engine, Engine):
    scorer = Scorer(engine, metrics=metrics)
  if scorer is not None and not scorer.started:
    scorer.start(metrics)
  # Tokenizing a long prompt takes a while (SentencePiece releases the GIL meanwhile): off the
  # event loop, on a few threads, since more than the HTTP cores would only queue there.
  prompt_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maxlm-prompt")
  app = FastAPI(title="maxlm")
  app.state.orchestrator, app.state.scorer = orchestrator, scorer
  install_spec(app, keyed=bool(api_keys))
  # The last added runs first: count every answer, then the key, then the body's size.
  app.add_middleware(LimitBody, max_bytes=max_request_bytes)
  if api_keys:
    app.add_middleware(RequireApiKey, api_keys=api_keys)
  app.add_middleware(CountResponses, metrics=metrics)

  @app.exception_handler(OpenAIError)
  async def _openai_error(_: Request, exc: OpenAIError):
    return error_response(exc)

  @app.exception_handler(RequestValidationError)
  async def _invalid_request(_: Request, exc: RequestValidationError):
    return error_response(validation_error(exc))

  @app.exception_handler(HTTPException)
  async def _http_error(_: Request, exc: HTTPException):
    response = error_response(OpenAIError(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})  # e.g. a 405's Allow
    return response

  @app.exception_handler(Unavailable)  # an expected 503: not left to the traceback-logging 500
  @app.exception_handler(RequestFailed)  # logged by the orchestrator: a plain 500
  async def _unavailable(_: Request, exc: Unavailable | RequestFailed):
    return error_response(server_error(exc))

  @app.exception_handler(Exception)
  async def _server_error(_: Request, exc: Exception):  # uvicorn logs the traceback
    return error_response(server_error(exc))

  @app.get("/health", responses=errors(503))
  async def health():
    if not orchestrator.alive:
      return error_response(unavailable(Unavailable(
          f"the engine loop has stopped: {orchestrator.error!r}")))
    return {"status": "ok"}

  @app.get("/metrics", response_class=Response,
           responses=text(metrics.content_type, "Prometheus' text exposition format"))
  async def prometheus_metrics():
    return Response(metrics.exposition(), media_type=metrics.content_type)

  v1 = APIRouter(prefix="/v1")
  keyed = (401,) * bool(api_keys)  # RequireApiKey's answer, on every route but guards.OPEN_PATHS

  served_model = {
      "id": model_name, "object": "model", "created": started, "owned_by": "maxlm",
      "max_model_len": engine.context_length,
      **({"input_modalities": ["text", "image"], "capabilities": {"vision": True}}
         if image_size else {})}

  @v1.get("/models", responses=errors(*keyed))
  async def models():
    return {"object": "list", "data": [served_model]}

  @v1.get("/models/{model:path}", responses=errors(*keyed, 404))
  async def model(model: str):
    """OpenAI's retrieve (`client.models.retrieve(id)`); ids may hold slashes, as HF ids do."""
    check_model(model)
    return served_model

  def check_model(name: str):
    if name != model_name:
      named = name if len(name) <= 100 else name[:100] + "..."
      raise OpenAIError(404, f"the model `{named}` does not exist; this server serves "
                        f"`{model_name}`", param="model", code="model_not_found")

  def check_request(request: SamplingRequest):
    check_model(request.model)
    check_supported(request)
    prompts = len(request.prompts()) if isinstance(request, CompletionRequest) else 1
    if prompts * request.n > max_queue:  # a 429 would say "retry", which never helps
      raise OpenAIError(400, f"n={request.n} for {prompts} prompt(s) is {prompts * request.n} "
                        f"generations, more than the waiting line holds (--max_queue "
                        f"{max_queue}); ask for fewer", param="n")

  async def submit(request: SamplingRequest, prompt_ids: Callable[[], tuple[list[int], int]],
                   stops: list[str], echo: bool = False, images: list | None = None
                   ) -> list[tuple[Generation, AsyncIterator[list[Delta]]]]:
    """(each of the request's n generations, its deltas), queued together, refusing what
    cannot run before anything is sent."""
    submitted = await prepare(request, prompt_ids, stops, echo, images)
    queue_on(orchestrator.submit_all, [generation for generation, _ in submitted])
    return submitted

  def queue_on(submit_to: Callable, work):
    try:
      submit_to(work)
    except QueueFull as e:
      raise OpenAIError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded") from e

  async def prepare(request: SamplingRequest, prompt_ids: Callable[[], tuple[list[int], int]],
                    stops: list[str], echo: bool = False, images: list | None = None
                    ) -> list[tuple[Generation, AsyncIterator[list[Delta]]]]:
    """(each of the request's n generations of one prompt, its deltas), not yet queued.
    `prompt_ids` gives (token ids, max_tokens); it runs on `prompt_pool`, with the
    tokenizer."""
    param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    prompt_ids, max_tokens = await checked_prompt(prompt_ids, param)
    return [generation_for(request, prompt_ids, max_tokens, stops, echo, images, choice)
            for choice in range(request.n)]

  async def checked_prompt(prompt_ids: Callable, param: str, *, inline: bool = False):
    """`prompt_ids()`, run on `prompt_pool` (here when `inline`: token ids, no tokenizer to
    wait for); its errors as the 400s they are."""
    try:
      if inline:
        return prompt_ids()
      return await asyncio.get_running_loop().run_in_executor(prompt_pool, prompt_ids)
    except ContextLengthError as e:
      raise OpenAIError(400, str(e), param=param, code="context_length_exceeded") from e
    except ValueError as e:  # a token id the model has no row for
      raise OpenAIError(400, f"{param}: {e}", param=param) from e

  def generation_for(request: SamplingRequest, prompt_ids: list[int], max_tokens: int,
                     stops: list[str], echo: bool = False, images: list | None = None,
                     choice: int = 0) -> tuple[Generation, AsyncIterator[list[Delta]]]:
    """`choice`: which of the prompt's n; a seeded request's choices take seed + choice (as
    vLLM's do), so each is reproducible and they differ."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    sampled = {name: getattr(request, name) if name in request.model_fields_set
               else sampling_defaults.get(name, getattr(request, name))
               for name in ("temperature", "top_p", "top_k")}
    settings = SamplingSettings(
        temperature=sampled["temperature"], top_p=sampled["top_p"],
        top_k=max(sampled["top_k"], 0),
        seed=secrets.randbits(63) if request.seed is None else request.seed + choice)
    generation = Generation(
        prompt_ids, max_tokens=max_tokens, settings=settings, stops=stops,
        ignore_eos=request.ignore_eos, top_logprobs=request.alternatives() or 0, echo=echo,
        images=images, emit=lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item))
    return generation, drain(deltas, generation)

  async def respond(request: SamplingRequest, shape: ResponseShape, prompt_tokens: int,
                    streams: list[AsyncIterator[list[Delta]]], http_request: Request,
                    echoes: list[Callable | None] | None = None):
    """The response (whole or streamed) to the generations whose deltas `streams` are, one
    choice each; `echoes` as `stream_events` takes them."""
    logprobs = [Logprobs(shape.chat, engine.token_bytes, token_texts)
                if request.alternatives() is not None else None for _ in streams]
    echoes = echoes or [None] * len(streams)
    if request.stream:
      return StreamingResponse(
          stream_events(request, shape, prompt_tokens, streams, logprobs, echoes),
          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    begun = time.perf_counter()
    received = await unless_disconnected(asyncio.gather(*map(collect, streams)), http_request)
    if received is None:
      log.info("%s: the client left; its %d generations are cancelled", shape.id, len(streams))
      return Response(status_code=CLIENT_LEFT)
    generated = sum(map(len, received))
    choices = []
    for index, (deltas, shaping, echo) in enumerate(zip(received, logprobs, echoes)):
      text, shown = choice_body(deltas, shaping, echo)
      finish_reason = deltas[-1].finish_reason if deltas else "length"
      choices.append(shape.choice(index, text, finish_reason, shown))
    log.info("%s: %d prompt + %d generated tokens in %.2fs (%s)", shape.id, prompt_tokens,
             generated, time.perf_counter() - begun, finish_reason)
    # Bytes made here skip FastAPI's jsonable_encoder, which walks every value of the echoed
    # logprobs, and orjson writes them ~10x faster than json (an lm-eval request's echoed
    # logprobs were most of its time in the event loop).
    return Response(orjson.dumps(shape.whole(choices, prompt_tokens, generated)),
                    media_type="application/json")

  async def stream_events(request: SamplingRequest, shape: ResponseShape, prompt_tokens: int,
                          streams: list[AsyncIterator[list[Delta]]],
                          logprobs: list[Logprobs | None],
                          echoes: list[Callable | None]) -> AsyncIterator[str]:
    """`echoes`: each choice's `prompt_echo`, or None; the prompt goes in the choice's first
    chunk, before its first tokens (as vLLM sends it), or alone, finished, at the end for a
    choice that generates nothing (max_tokens=0)."""
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    echoes = list(echoes)  # each is taken once, by its choice's first chunk

    def chunk(index, text, finish_reason=None, first=False, of=()):
      shaping, echo = logprobs[index], echoes[index]
      if echo:
        echoes[index] = None
        text, shown = choice_body(list(of), shaping, echo)
      else:
        shown = shaping.of(list(of)) if shaping and of else None
      return sse(shape.chunk(text, finish_reason, index=index, first=first,
                             with_usage_field=include_usage, logprobs=shown))

    generated = 0
    try:
      if shape.chat:
        for index in range(len(streams)):
          yield chunk(index, "", first=True)
      async for index, batch in merged(streams):
        generated += len(batch)
        text, finish_reason = "".join(d.text for d in batch), batch[-1].finish_reason
        if shape.chat and finish_reason:
          if text or logprobs[index]:
            yield chunk(index, text, of=batch)
          yield chunk(index, None, finish_reason)
        elif text or finish_reason or logprobs[index] or echoes[index]:
          yield chunk(index, text, finish_reason, of=batch)
      for index, echo in enumerate(echoes):
        if echo:
          yield chunk(index, "", "length")
    except Exception as e:  # the status line is sent; report in the stream, as vLLM does
      error = server_error(e)
      log.warning("%s ended early: %s", shape.id, error.message)
      yield sse(error.body())
    if include_usage:
      yield sse(shape.usage_chunk(prompt_tokens, generated))
    yield sse("[DONE]")

  def completion_ids(prompt: str | list[int], max_tokens: int | None, **fits):
    """`fits`: `Engine.check_fits`'s keywords (scored=True on the Scorer's path)."""
    if isinstance(prompt, str):
      return lambda: engine.prompt_ids(prompt, max_tokens, **fits)
    return lambda: engine.token_prompt(prompt, max_tokens, **fits)

  @v1.post("/completions", responses=generation_responses(keyed=bool(api_keys)))
  async def completions(request: CompletionRequest, http_request: Request):
    """n choices per prompt, the prompt echoed before each completion when asked; whole or
    streamed (a streamed scoring request is scored as a whole one is, and sends each choice in
    one chunk)."""
    check_request(request)
    check_completion(request)
    prompts = request.prompts()
    submitted = await submit_each(request, prompts)
    prompt_tokens = sum(len(generation.prompt_ids) for generation, _ in submitted[::request.n])
    each_choice = [prompt for prompt in prompts for _ in range(request.n)]
    echoes = [prompt_echo(request, prompt, generation) if request.echo else None
              for prompt, (generation, _) in zip(each_choice, submitted)]
    return await respond(request, ResponseShape(model_name, chat=False), prompt_tokens,
                         [d for _, d in submitted], http_request, echoes)

  async def submit_each(request: CompletionRequest, prompts: list[str | list[int]]
                        ) -> list[tuple[Generation, AsyncIterator[list[Delta]]]]:
    """(each of each prompt's n generations, its deltas), all queued together or none: on the
    scorer for lm-eval's scoring requests, else on the orchestrator."""
    echo_scores = request.echo and request.logprobs is not None
    # lm-eval's log-likelihood requests: every prompt in packed forward passes, no decode slot
    scored = scorer is not None and Scorer.wants(request.echo, request.logprobs,
                                                 request.max_tokens)
    submitted = []
    try:
      if scored:  # every prompt checked at once: lm-eval sends many small ones, as token ids,
        # which need no tokenizer and are checked here (the hop to the pool and back had
        # been a tenth of a scoring request's time in the event loop)
        checked = await checked_prompt(
            lambda: [completion_ids(prompt, request.max_tokens, scored=True)()
                     for prompt in prompts],
            "prompt", inline=all(isinstance(prompt, list) for prompt in prompts))
        submitted = [generation_for(request, prompt_ids, max_tokens, request.stops(),
                                    echo=echo_scores, choice=choice)
                     for prompt_ids, max_tokens in checked for choice in range(request.n)]
        queue_on(scorer.submit, [generation for generation, _ in submitted])
      else:  # all prompts go in the line together, or none does
        for prompt in prompts:
          submitted.extend(await prepare(request, completion_ids(prompt, request.max_tokens),
                                         request.stops(), echo=echo_scores))
        queue_on(orchestrator.submit_all, [generation for generation, _ in submitted])
    except OpenAIError:
      for generation, _ in submitted:
        generation.cancel()
      raise
    return submitted

  def prompt_echo(request: CompletionRequest, prompt: str | list[int], generation: Generation
                  ) -> Callable[[Logprobs | None], tuple[str, dict | None]]:
    """f(shaping) = (the prompt's text, its logprobs object when `shaping`), for `choice_body`:
    to be called once `generation` has its prompt's logprobs (by its first delta, or its end),
    with the choice's own `shaping`, whose text offsets then follow the prompt's."""
    text = prompt if isinstance(prompt, str) else engine.decode(prompt)
    return lambda shaping: (text, shaping and shaping.of_prompt(
        generation.prompt_ids, generation.prompt_logprobs, request.logprobs,
        text_length=len(text)))

  @v1.post("/chat/completions", responses=generation_responses(keyed=bool(api_keys)))
  async def chat_completions(request: ChatCompletionRequest, http_request: Request):
    check_request(request)
    if missing_chat_tokens and not model_template:
      raise OpenAIError(400, f"this model's tokenizer has no {' '.join(missing_chat_tokens)} "
                        "tokens (not prepared by beam_pipelines.prepare_text: an imported "
                        "model?) and its tokenizer_config.json no chat_template, so it has no "
                        "chat template; send the prompt in the model's own format to "
                        "/v1/completions", param="messages")
    images = await asyncio.get_running_loop().run_in_executor(
        prompt_pool, request_images, request.messages, media, image_size)
    max_tokens = request.max_completion_tokens or request.max_tokens

    def prompt_ids():
      turns = [(message.role, message.text()) for message in request.messages]
      if model_template:
        prompt = hf_chat_prompt(model_template, turns, template_bos,
                                template_eos).removeprefix(template_bos)
      else:
        prompt = chat_prompt(turns)
      if images:
        return engine.image_prompt_ids(prompt, len(images), max_tokens)
      return engine.prompt_ids(prompt, max_tokens)

    stops = request.stops() + ([] if model_template else CHAT_STOPS)  # theirs end at the eos
    submitted = await submit(request, prompt_ids, stops, images=images)
    return await respond(request, ResponseShape(model_name, chat=True),
                         len(submitted[0][0].prompt_ids), [d for _, d in submitted], http_request)

  @app.post("/reset_prefix_cache", responses=errors(*keyed, 503))
  async def reset_prefix_cache():
    """vLLM's: later prompts find nothing cached before now (the generation blocks no running
    request holds, and the scored prompts kept for scoring requests); for benchmarks that send
    the same prompts again, and after the weights change."""
    if scorer is not None:
      scorer.reset_cache()
    await asyncio.get_running_loop().run_in_executor(None, orchestrator.reset_prefix_cache)
    return {}

  @app.get("/tokenizer_info", responses=errors(*keyed))
  async def tokenizer_info():
    """The special tokens' texts, as vLLM's /tokenizer_info gives them (lm-eval's remote
    tokenizer reads eos_token and bos_token here)."""
    return engine.tokenizer_info()

  @app.post("/tokenize", responses=errors(400, *keyed, 413))
  async def tokenize(request: TokenizeRequest):
    """vLLM's /tokenize: a special token's text (`</s>`) is its id; `add_special_tokens` puts
    bos first."""
    def body():  # built on the pool with orjson: a 6 MB prompt's 2M ids stall no stream
      tokens = engine.tokenize(request.prompt, request.add_special_tokens)
      return orjson.dumps({"tokens": tokens, "count": len(tokens),
                           "max_model_len": engine.context_length})
    return Response(await asyncio.get_running_loop().run_in_executor(prompt_pool, body),
                    media_type="application/json")

  @app.post("/detokenize", responses=errors(400, *keyed, 413))
  async def detokenize(request: DetokenizeRequest):
    """vLLM's /detokenize: the text of token ids (eos and ids past the tokenizer have none)."""
    text = await asyncio.get_running_loop().run_in_executor(
        prompt_pool, lambda: engine.decode(request.tokens))
    return {"prompt": text}

  app.include_router(v1)
  return app


CLIENT_LEFT = 499  # as nginx logs it; nobody reads this response


def usable_template(tokenizer) -> str | None:
  """The Hugging Face chat template the tokenizer brought, if it compiles (else a warning)."""
  template = getattr(tokenizer, "chat_template", None)
  if template is None:
    return None
  try:
    compiled_template(template)
  except jinja2.TemplateError as e:
    log.warning("the model's chat_template does not compile (%s); chat is refused", e)
    return None
  return template


def choice_body(deltas: list[Delta], shaping: Logprobs | None,
                echo: Callable[[Logprobs | None], tuple[str, dict | None]] | None = None
                ) -> tuple[str, dict | None]:
  """(the text, the logprobs object) of a choice's `deltas` (all, or a chunk's), after its
  prompt's when `echo` (`prompt_echo`'s) is given: that is read first, since the deltas'
  text offsets follow the prompt's."""
  prompt_text, prompt_logprobs = echo(shaping) if echo else ("", None)
  text = prompt_text + "".join(delta.text for delta in deltas)
  shown = shaping.of(deltas) if shaping else None
  return text, Logprobs.joined(prompt_logprobs, shown) if prompt_logprobs else shown


async def collect(deltas: AsyncIterator[list[Delta]]) -> list[Delta]:
  return [delta async for batch in deltas for delta in batch]


async def unless_disconnected(work, http_request: Request):
  """`work`'s result, or None as soon as the client disconnects (then `work` is cancelled).

  A stream notices a client that left when a write fails; a whole response writes only at the
  end, so it listens for the ASGI `http.disconnect` instead (the body is read by now, so the
  next message is that one)."""
  async def disconnected():
    while (await http_request.receive())["type"] != "http.disconnect":
      pass

  working, leaving = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
  try:
    await asyncio.wait((working, leaving), return_when=asyncio.FIRST_COMPLETED)
  finally:
    leaving.cancel()
    if not working.done():
      working.cancel()
      # A cancelled gather ends with CancelledError as its exception, which asyncio logs as
      # "never retrieved" unless somebody reads it: a client that leaves is not an error.
      working.add_done_callback(lambda done: done.cancelled() or done.exception())
  return working.result() if working.done() else None


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


async def merged(streams: list[AsyncIterator[list[Delta]]]
                 ) -> AsyncIterator[tuple[int, list[Delta]]]:
  """(which stream, its batch) as each of `streams` delivers, until all have ended; one that
  fails ends them all (leaving cancels every generation). One stream is read directly."""
  if len(streams) == 1:
    async for batch in streams[0]:
      yield 0, batch
    return
  arrived: asyncio.Queue = asyncio.Queue()

  async def forward(index: int, stream: AsyncIterator[list[Delta]]):
    try:
      async for batch in stream:
        arrived.put_nowait((index, batch))
      arrived.put_nowait((index, None))
    except Exception as e:  # raised below, in the reader
      arrived.put_nowait((index, e))

  forwarding = [asyncio.ensure_future(forward(*item)) for item in enumerate(streams)]
  try:
    running = len(streams)
    while running:
      index, item = await arrived.get()
      if isinstance(item, Exception):
        raise item
      if item is None:
        running -= 1
      else:
        yield index, item
  finally:
    for task in forwarding:
      task.cancel()


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
  parser.add_argument("--slots", type=int, default=None,
                      help="most requests generating at once (continuous batching); default 8, "
                      "or 256 with --kv_cache_memory")
  parser.add_argument("--kv_cache_memory", type=float, default=None,
                      help="GiB for the paged KV cache, which decides how many tokens can be in "
                      "flight; default: room for --slots full contexts")
  parser.add_argument("--enable_prefix_caching", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="requests sharing a prefix (a system prompt, few-shot examples) reuse "
                      "its KV blocks, found by a hash of their tokens; on by default, as in "
                      "vLLM V1 (--no-enable_prefix_caching turns it off)")
  parser.add_argument("--scoring_cache_mb", type=int, default=scoring_cache.DEFAULT_MEGABYTES,
                      help="host memory (MiB) for scored prompts' keys, values and scores: a "
                      "scoring request (lm-eval's loglikelihood) continuing one scored before "
                      "computes only its new tokens, as an item's choices after its context do "
                      "when lm-eval's longest-first order sends them apart; 0, or "
                      "--no-enable_prefix_caching, keeps none")
  parser.add_argument("--max_prefill_chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                      help="prompt tokens prefilled between two decode steps (vLLM's "
                      "--max-num-batched-tokens, less the decode tokens): a longer prompt is "
                      "prefilled in chunks so running streams keep their token rate; 0 prefills "
                      "every prompt whole")
  parser.add_argument("--max_queue", type=int, default=64,
                      help="generations (prompts x n) that may wait for a slot; one more "
                           "gets 429, a request for more than that at once 400")
  parser.add_argument("--generation_config", choices=("auto", "vllm"), default="auto",
                      help="auto: a request's omitted temperature, top_p and top_k take the "
                      "values of the run dir's generation_config.json (an imported model's), "
                      "as vLLM's --generation-config auto; vllm: the API's defaults (1, 1, off)")
  parser.add_argument("--quantize", choices=("none", "int8"), default="none",
                      help="int8: int8 weights, also in the compiled program (4x smaller)")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                      help="weights, activations and KV cache: auto keeps the checkpoint's "
                      "(float32); bfloat16 halves the weights' and the cache's bytes")
  parser.add_argument("--compilation_cache_dir", default=compilation_cache.default_dir(),
                      help="where compiled programs are kept, so that a restart skips most of "
                      "the warmup; empty: no cache")
  parser.add_argument("--kv_cache_dtype", choices=("auto", "int8"), default="auto",
                      help="the paged KV cache's dtype; auto: the model's compute dtype; int8: "
                      "a float32 scale per token and head (3.8x the tokens of float32 at "
                      "head_dim 64)")
  parser.add_argument("--shutdown_grace_s", type=float, default=30.0,
                      help="on SIGTERM/SIGINT, how long requests in flight may still run")
  parser.add_argument("--engine_cpus", default="auto",
                      help="how many CPU cores the model (XLA's threads) may use: a number, "
                      "`all`, or `auto` (every core but one when there are two or more); the "
                      "HTTP event loop and the decode loop's Python run on the cores left over, "
                      "or on all if none are")
  parser.add_argument("--api_keys_file", default=None,
                      help="one API key per line; when set, every route but /health, /metrics "
                      "and the API docs requires `Authorization: Bearer KEY`")
  parser.add_argument("--max_images_per_request", type=int, default=4,
                      help="image_url parts a chat request may hold (400 above)")
  parser.add_argument("--allowed_media_domains", default="",
                      help="comma-separated hosts whose image URLs are fetched; none by default")
  parser.add_argument("--max_image_pixels", type=int, default=None,
                      help="width*height above which an image is refused (default Pillow's)")
  parser.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                      help="a longer request body is refused (413) before it is read whole; "
                      "the default holds a 32k-token prompt even with every character escaped")
  limits = ConnectionLimits()
  parser.add_argument("--max_connections", type=int, default=limits.max_connections,
                      help="open connections at most; past it, the oldest connection still "
                      "sending its headers is dropped, or the new one answered 503")
  parser.add_argument("--header_timeout_s", type=float, default=limits.header_timeout_s,
                      help="a client must send its request headers within this time")
  parser.add_argument("--body_timeout_s", type=float, default=limits.body_timeout_s,
                      help="a client must send its request body within this time after the "
                      "headers")
  args = parser.parse_args(argv)
  for name in ("max_request_bytes", "max_connections", "header_timeout_s", "body_timeout_s",
               "max_queue", "max_len", "kv_cache_memory", "max_image_pixels"):
    value = getattr(args, name)
    # NaN passes every comparison: `not value > 0` refuses it too
    if value is not None and not value > 0:
      parser.error(f"--{name}={value}; give a positive number")
  for name in ("shutdown_grace_s", "scoring_cache_mb", "max_images_per_request",
               "max_prefill_chunk"):
    if not getattr(args, name) >= 0:
      parser.error(f"--{name}={getattr(args, name)}; give 0 or more")
  if args.kv_cache_memory is not None and args.kv_cache_memory == float("inf"):
    parser.error("--kv_cache_memory=inf; give the GiB the paged KV cache may take")
  if not 0 <= args.port <= 65535:
    parser.error(f"--port={args.port}; give a port from 1 to 65535 (0: any free one)")
  for domain in args.allowed_media_domains.split(","):
    if any(mark in domain.strip() for mark in ("/", ":", "*", " ")):
      parser.error(f"--allowed_media_domains entry {domain.strip()!r} is not a host name; write "
                   "hosts such as example.com,cdn.org (their subdomains are included)")
  if args.api_keys_file == "":
    parser.error("--api_keys_file is empty (an unset variable?); name a file of keys, or leave "
                 "the flag out to serve without keys")
  return args


def listening_socket(host: str, port: int) -> socket.socket:
  """The server's socket, bound before the compile (uvicorn listens on it once serving): a
  port in use or a host this machine does not have is one line within seconds, not after
  minutes of compiling."""
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
  except OSError as e:
    raise OSError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}; "
                  "pick a free port or an address of this machine") from None
  sock.set_inheritable(True)
  return sock


def allow_open_files(connections: int):
  """Raises this process's open-file limit to hold `connections` sockets and the files and
  threads the engine needs beside them (up to the hard limit; past it, one line to fix it)."""
  needed = connections + 256
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft != resource.RLIM_INFINITY and soft < needed:
    if hard != resource.RLIM_INFINITY and hard < needed:
      raise ValueError(f"--max_connections={connections} needs {needed} open files but `ulimit "
                       f"-Hn` is {hard}; lower --max_connections or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


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


# Below this many multiplied weights a decode step is short enough (~2 ms at 3M on 2 cores)
# that the HTTP and decode-loop Python share of each token is worth a core of its own; above
# it the step is compute-bound and every core shortens it (88M: 102 -> 70 ms for 16 rows).
AUTO_ALL_CORES_PARAMS = 20_000_000


def engine_cpus(cpus: str, available: list[int], model_params: int = 0) -> list[int]:
  """The cores --engine_cpus names, out of those this process may run on. `auto`: every
  core for a model of AUTO_ALL_CORES_PARAMS or more, else every core but one."""
  if cpus == "all" or (cpus == "auto" and model_params >= AUTO_ALL_CORES_PARAMS):
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


def served_params(checkpoint_dir: str, step: int | None) -> int:
  """The served model's active parameter count, from its metadata alone (XLA not started);
  0 when the metadata cannot be read (the engine's load reports why)."""
  try:
    _, meta = checkpoint.read_meta(checkpoint_dir, step)
    return count_params(checkpoint.config_from_meta(meta), active=True)
  except (OSError, ValueError, KeyError, TypeError):  # the engine's load names the problem
    return 0


def main(argv=None):
  args = parse_args(argv)
  log_to_stderr()
  try:
    # Before JAX starts: XLA sizes its CPU thread pool by the cores the process may use, and
    # a parallel op whose threads share a core with HTTP work waits for the slowest of them.
    # XLA's threads, started from here on, inherit these cores; the orchestrator's thread is
    # started after the repinning below.
    available = sorted(os.sched_getaffinity(0)) if PINNING else list(range(os.cpu_count() or 1))
    engine_cores = engine_cpus(args.engine_cpus, available, served_params(args.checkpoint_dir,
                                                                          args.step))
    pin_this_thread(engine_cores)
    api_keys = read_api_keys(args.api_keys_file) if args.api_keys_file else None
    allow_open_files(args.max_connections)
    compilation_cache.enable(args.compilation_cache_dir)
    engine = Engine.from_checkpoint(args.checkpoint_dir, step=args.step,
                                    model_name=args.model_name,
                                    max_len=args.max_len, slots=args.slots,
                                    quantize=args.quantize,
                                    kv_cache_memory=args.kv_cache_memory,
                                    prefix_caching=args.enable_prefix_caching,
                                    max_prefill_chunk=args.max_prefill_chunk or None,
                                    kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype,
                                    generation_defaults=args.generation_config == "auto")
    sock = listening_socket(args.host, args.port)  # before the compile, which takes minutes
    log.info("step %d of %s; %s; %s", engine.step, args.checkpoint_dir,
             engine.describe_weights(), engine.describe_cache())
    start = time.perf_counter()
    log.info("compiling the prefill, decode and scoring programs (a minute or two the first "
             "time; --compilation_cache_dir keeps them for the next start)")
    engine.warmup()
  except (OSError, ValueError, UserError) as e:
    print(f"serving.server: {e}", file=sys.stderr)
    sys.exit(2)
  scorer = Scorer(engine, cache_bytes=(args.scoring_cache_mb << 20
                                       if args.enable_prefix_caching else 0))
  # create_app starts it, counting into the app's metrics
  scorer.warmup()
  log.info("compiled in %.1fs; serving %s (context %d, %d slots, weights %s) on http://%s:%d",
           time.perf_counter() - start, engine.model_name, engine.context_length, engine.slots,
           engine.quantize, args.host, sock.getsockname()[1])  # --port=0: the one given
  # XLA's threads exist now, pinned to the engine's cores. This thread, which runs the event
  # loop, and the orchestrator's, which create_app starts, take the other cores: both are
  # Python and take turns on the GIL, and while they turn one step's tokens into text, XLA
  # computes the next step undisturbed (see serving.orchestrator).
  http_cores = [cpu for cpu in available if cpu not in engine_cores] or available
  pin_this_thread(http_cores)
  media = MediaPolicy(args.max_images_per_request, tuple(
      d.strip() for d in args.allowed_media_domains.split(",") if d.strip()),
                      args.max_image_pixels)
  if defaults := engine.sampling_defaults:  # none under --generation_config=vllm
    log.info("a request that leaves out %s samples with the model's generation_config.json: "
             "%s (--generation_config=vllm: the API's defaults instead)", ", ".join(defaults),
             ", ".join(f"{name}={value}" for name, value in defaults.items()))
  app = create_app(engine, api_keys=api_keys, max_queue=args.max_queue,
                   max_request_bytes=args.max_request_bytes, media=media, scorer=scorer)
  log.info("model on CPU cores %s; HTTP and the decode loop on %s", engine_cores, http_cores)
  limits = ConnectionLimits(args.max_connections, args.header_timeout_s, args.body_timeout_s)
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                          http=guarded_protocol(limits),
                          timeout_graceful_shutdown=args.shutdown_grace_s + 5)
  DrainingServer(config, app.state.orchestrator, args.shutdown_grace_s).run(sockets=[sock])


def run(argv=None):
  """Console entry: Ctrl-C while loading or compiling, or a second one while shutting down,
  ends with one line instead of a traceback."""
  try:
    main(argv)
  except KeyboardInterrupt:
    print("\nserving.server: interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  run()
