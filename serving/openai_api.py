"""OpenAI request shapes, error bodies and response/chunk bodies (as vLLM also speaks them)."""

import json
import time
import uuid
from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.chat import ROLES

# OpenAI parameters we accept only at their no-op value; anything else is refused, not ignored.
UNSUPPORTED_UNLESS = {"logprobs": None, "echo": False, "best_of": 1, "suffix": None,
                      "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
                      "top_logprobs": None, "tools": None, "tool_choice": None,
                      "response_format": None}


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="allow")
  include_usage: bool = False


class SamplingRequest(BaseModel):
  model_config = ConfigDict(strict=True, extra="allow")

  model: str
  max_tokens: int | None = Field(16, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  seed: int | None = None
  stop: str | list[str] | None = None
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None

  def stops(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
  prompt: str | list[str]


class TextPart(BaseModel):
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")
  role: Literal[ROLES]
  content: str | list[TextPart]

  def text(self) -> str:
    if isinstance(self.content, str):
      return self.content
    return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)


class OpenAIError(Exception):
  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, type_: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.type = type_

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


def error_response(error: OpenAIError) -> JSONResponse:
  return JSONResponse(error.body(), status_code=error.status)


def validation_error(exc: RequestValidationError) -> OpenAIError:
  first = exc.errors()[0]
  fields = [str(part) for part in first.get("loc", ()) if part != "body"]
  param = fields[0] if fields and first.get("type") != "json_invalid" else None
  where = f"{'.'.join(fields)}: " if param else ""
  return OpenAIError(400, f"{where}{first.get('msg', 'invalid request')}", param=param)


def check_supported(request: SamplingRequest):
  if request.n != 1:
    raise OpenAIError(400, f"n={request.n} is not supported; send n=1", param="n")
  if request.stream_options is not None and not request.stream:
    raise OpenAIError(400, "stream_options is only allowed with stream=true; set stream or "
                      "drop stream_options", param="stream_options")
  for name, value in (request.model_extra or {}).items():
    if name in UNSUPPORTED_UNLESS and value not in (UNSUPPORTED_UNLESS[name], None, {}, []):
      raise OpenAIError(400, f"{name}={value!r} is not supported yet; leave it unset",
                        param=name)


def single_prompt(request: CompletionRequest) -> str:
  if isinstance(request.prompt, str):
    return request.prompt
  if len(request.prompt) != 1:
    raise OpenAIError(400, f"prompt is a list of {len(request.prompt)} strings; send one prompt "
                      "per request", param="prompt")
  return request.prompt[0]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
  """Bodies of one response: the whole one, or its stream chunks (all sharing one id)."""

  def __init__(self, model: str, chat: bool):
    self.model, self.chat = model, chat
    self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    self.created = int(time.time())

  def _envelope(self, object_: str, choices: list[dict], **extra) -> dict:
    return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
            "choices": choices, **extra}

  def whole(self, text: str, finish_reason: str, prompt_tokens: int,
            completion_tokens: int) -> dict:
    if self.chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}
    else:
      choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                          usage=usage(prompt_tokens, completion_tokens))

  def chunk(self, text: str | None, finish_reason: str | None, *, first: bool = False,
            with_usage_field: bool = False) -> dict:
    """text=None: the chat chunk carrying only the finish reason (an empty delta)."""
    if self.chat:
      delta = {} if text is None else {"content": text}
      if first:
        delta = {"role": "assistant", **delta}
      choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
      choice = {"index": 0, "text": text or "", "logprobs": None,
                "finish_reason": finish_reason}
    extra = {"usage": None} if with_usage_field else {}
    return self._envelope(self.object_chunk, [choice], **extra)

  def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
    return self._envelope(self.object_chunk, [], usage=usage(prompt_tokens, completion_tokens))

  @property
  def object_chunk(self) -> str:
    return "chat.completion.chunk" if self.chat else "text_completion"


def sse(body: dict | str) -> str:
  """One server-sent event: `data: {json}` and a blank line."""
  return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
