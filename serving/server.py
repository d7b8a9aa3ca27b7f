"""An OpenAI-compatible REST server (the /v1/completions subset vLLM also speaks).

  python -m serving.server --checkpoint_dir=WORKDIR [--port=8000] [--host=127.0.0.1]

Generation runs in a worker thread, one request at a time, so the event loop stays free to
answer /health and to queue requests.
"""

import argparse
import asyncio
import logging
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from serving.engine import Completion, ContextLengthError, Engine

log = logging.getLogger("serving")

# OpenAI parameters we accept only at their no-op value; anything else is refused, not ignored.
UNSUPPORTED_UNLESS = {"stream": False, "logprobs": None, "echo": False, "best_of": 1,
                      "suffix": None, "presence_penalty": 0, "frequency_penalty": 0,
                      "logit_bias": None}


class CompletionRequest(BaseModel):
  model_config = ConfigDict(strict=True, extra="allow")

  model: str
  prompt: str | list[str]
  max_tokens: int | None = Field(16, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  seed: int | None = None
  stop: str | list[str] | None = None
  n: int = 1


class OpenAIError(Exception):
  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, type_: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.type = type_


def error_response(error: OpenAIError) -> JSONResponse:
  body = {"message": error.message, "type": error.type, "param": error.param, "code": error.code}
  return JSONResponse({"error": body}, status_code=error.status)


def validation_error(exc: RequestValidationError) -> OpenAIError:
  first = exc.errors()[0]
  fields = [str(part) for part in first.get("loc", ()) if part != "body"]
  param = fields[0] if fields and first.get("type") != "json_invalid" else None
  where = f"{'.'.join(fields)}: " if param else ""
  return OpenAIError(400, f"{where}{first.get('msg', 'invalid request')}", param=param)


def single_prompt(request: CompletionRequest) -> str:
  if isinstance(request.prompt, str):
    return request.prompt
  if len(request.prompt) != 1:
    raise OpenAIError(400, f"prompt is a list of {len(request.prompt)} strings; send one prompt "
                      "per request", param="prompt")
  return request.prompt[0]


def check_supported(request: CompletionRequest):
  if request.n != 1:
    raise OpenAIError(400, f"n={request.n} is not supported; send n=1", param="n")
  for name, value in (request.model_extra or {}).items():
    if name in UNSUPPORTED_UNLESS and value not in (UNSUPPORTED_UNLESS[name], None, {}):
      raise OpenAIError(400, f"{name}={value!r} is not supported yet; leave it unset",
                        param=name)


def completion_body(completion: Completion, model: str) -> dict:
  completion_tokens = len(completion.token_ids)
  return {
      "id": f"cmpl-{uuid.uuid4().hex}",
      "object": "text_completion",
      "created": int(time.time()),
      "model": model,
      "choices": [{"index": 0, "text": completion.text, "logprobs": None,
                   "finish_reason": completion.finish_reason}],
      "usage": {"prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": completion.prompt_tokens + completion_tokens},
  }


def create_app(engine: Engine, model_name: str | None = None) -> FastAPI:
  model_name = model_name or engine.model_name
  started = int(time.time())
  generation_lock = threading.Lock()  # one generation at a time until the orchestrator lands
  app = FastAPI(title="maxlm")

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

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": model_name, "object": "model", "created": started, "owned_by": "maxlm",
        "max_model_len": engine.context_length}]}

  def complete_serially(request: CompletionRequest, prompt: str) -> Completion:
    with generation_lock:
      return engine.complete(
          prompt, max_tokens=request.max_tokens, temperature=request.temperature,
          top_p=request.top_p, seed=request.seed,
          stop=[request.stop] if isinstance(request.stop, str) else request.stop)

  @app.post("/v1/completions")
  async def completions(request: CompletionRequest):
    if request.model != model_name:
      raise OpenAIError(404, f"the model `{request.model}` does not exist; this server serves "
                        f"`{model_name}`", param="model", code="model_not_found")
    check_supported(request)
    prompt = single_prompt(request)
    start = time.perf_counter()
    try:
      completion = await asyncio.to_thread(complete_serially, request, prompt)
    except ContextLengthError as e:
      raise OpenAIError(400, str(e), param="prompt", code="context_length_exceeded") from e
    log.info("completion: %d prompt + %d generated tokens in %.2fs (%s)",
             completion.prompt_tokens, len(completion.token_ids),
             time.perf_counter() - start, completion.finish_reason)
    return completion_body(completion, model_name)

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
    engine = Engine.from_checkpoint(args.checkpoint_dir, model_name=args.model_name,
                                    max_len=args.max_len)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"serving.server: {e}") from None
  start = time.perf_counter()
  engine.warmup()
  log.info("compiled in %.1fs; serving %s (context %d) on http://%s:%d",
           time.perf_counter() - start, engine.model_name, engine.context_length, args.host,
           args.port)
  uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
  main()
