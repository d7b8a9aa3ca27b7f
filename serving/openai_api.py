"""OpenAI request shapes, error bodies and response/chunk bodies (as vLLM also speaks them)."""

import functools
import itertools
import json
import re
import time
import typing
import uuid
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.chat import IMAGE_TOKEN, RESERVED_TOKENS, ROLES

# OpenAI parameters we accept only at their no-op value; anything else is refused, not ignored.
# (null, {} and [] are no-ops too.)
UNSUPPORTED_UNLESS = {"echo": False, "best_of": 1, "suffix": "", "presence_penalty": 0,
                      "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": None,
                      "tools": None, "tool_choice": None, "response_format": {"type": "text"}}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits on alternatives per token
MAX_CHAT_TOP_LOGPROBS = 20
MAX_PROMPTS = 64         # prompts in one completions request (a batch, as lm-eval sends them)
MAX_STOPS = 4            # OpenAI's limit
MAX_STOP_CHARS = 256     # ours (OpenAI documents none): bounds the stop search per token
INT32_MAX = 2**31 - 1    # top_k and token counts reach the device as int32
SEED_RANGE = {"ge": -2**63, "le": 2**63 - 1}  # a signed 64-bit seed, as vLLM and OpenAI take
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def whole_unicode(text: str) -> str:
  """`text`, unless it holds a lone UTF-16 surrogate (valid JSON, but no UTF-8 text)."""
  if found := LONE_SURROGATE.search(text):
    raise ValueError(f"holds a lone UTF-16 surrogate ({found.group()!r} at character "
                     f"{found.start()}); send valid Unicode text")
  return text


def checked_stops(stop: str | list[str] | None) -> str | list[str] | None:
  stops = [stop] if isinstance(stop, str) else stop or []
  if len(stops) > MAX_STOPS:
    raise ValueError(f"{len(stops)} stop sequences; send at most {MAX_STOPS}")
  for text in stops:
    if len(text) > MAX_STOP_CHARS:
      raise ValueError(f"a stop sequence of {len(text)} characters; each may have at most "
                       f"{MAX_STOP_CHARS}")
    whole_unicode(text)
  return stop


class StreamOptions(BaseModel):
  model_config = ConfigDict(strict=True, extra="allow")  # "yes" is not a bool, as elsewhere
  include_usage: bool = False


class SamplingRequest(BaseModel):
  model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
  supported: ClassVar[tuple[str, ...]] = ()  # of UNSUPPORTED_UNLESS, what this kind serves

  model: str
  max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  seed: int | None = Field(None, **SEED_RANGE)
  stop: str | list[str] | None = None
  n: int = Field(1, ge=1, le=128)
  stream: bool = False
  stream_options: StreamOptions | None = None
  # Declared for their ranges; check_supported refuses any but their no-op value.
  presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
  frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
  # vLLM's extensions, which its users send through `extra_body`:
  top_k: int = Field(0, ge=-1, le=INT32_MAX)  # 0 or -1: every token
  repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
  ignore_eos: bool = False

  _model_is_text = field_validator("model")(whole_unicode)
  _stops_are_few_and_short = field_validator("stop")(checked_stops)

  @model_validator(mode="before")
  @classmethod
  def _null_is_the_default(cls, body):
    """null for a field that takes no null is that field left out, as OpenAI's API and vLLM
    read it (the official client sends null for each None it is given: `temperature=None`)."""
    if not isinstance(body, dict):
      return body
    defaulted = _fields_defaulted_not_null(cls)
    return {key: value for key, value in body.items()
            if value is not None or key not in defaulted}

  def stops(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

  def alternatives(self) -> int | None:
    """How many top alternatives to report per token; None: no logprobs at all."""
    raise NotImplementedError


@functools.cache
def _fields_defaulted_not_null(request_class: type[BaseModel]) -> frozenset[str]:
  """The fields of `request_class` that have a default and do not take None."""
  takes_none = lambda annotation: (annotation is type(None)  # noqa: E731
                                   or type(None) in typing.get_args(annotation))
  return frozenset(name for name, field in request_class.model_fields.items()
                   if not field.is_required() and not takes_none(field.annotation))


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
  supported: ClassVar[tuple[str, ...]] = ("echo",)
  # Text, token ids, or a batch of either (one choice each, `index` in the order given).
  prompt: Prompt
  max_tokens: int | None = Field(16, ge=0, le=INT32_MAX)  # 0: only with echo
  logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
  # The prompt comes back before the completion, with its tokens' logprobs when `logprobs` is
  # set (the first token's is null: nothing predicts it), scored in the prefill pass.
  echo: bool = False

  @field_validator("prompt")
  @classmethod
  def _prompt_is_text_or_ids(cls, prompt: Prompt) -> Prompt:
    if not isinstance(prompt, str) and not prompt:
      raise ValueError("is an empty list; send a prompt")
    batch = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    if len(batch) > MAX_PROMPTS:
      raise ValueError(f"holds {len(batch)} prompts; send at most {MAX_PROMPTS} per request")
    for one in batch:
      if isinstance(one, str):
        whole_unicode(one)
      elif not one:
        raise ValueError("holds an empty list of token ids; send at least one token id")
    return prompt

  def prompts(self) -> list[str | list[int]]:
    """Each prompt of the request: text, or token ids."""
    single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
    return [self.prompt] if single else list(self.prompt)

  def alternatives(self) -> int | None:
    return self.logprobs


class TokenizeRequest(BaseModel):
  """vLLM's /tokenize body (lm-eval's remote tokenizer sends add_special_tokens=false)."""
  model_config = ConfigDict(strict=True, extra="allow")
  prompt: str
  add_special_tokens: bool = True
  model: str | None = None

  _prompt_is_text = field_validator("prompt")(whole_unicode)


class DetokenizeRequest(BaseModel):
  model_config = ConfigDict(strict=True, extra="allow")
  tokens: list[Annotated[int, Field(ge=0, le=INT32_MAX)]]
  model: str | None = None


class TextPart(BaseModel):
  type: Literal["text"]
  text: str


class ImageURL(BaseModel):
  model_config = ConfigDict(extra="allow")  # `detail` and the like: accepted, not used
  url: str


class ImagePart(BaseModel):
  type: Literal["image_url"]
  image_url: ImageURL


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")
  role: Literal[ROLES]
  content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

  @field_validator("role", mode="before")
  @classmethod
  def _developer_is_system(cls, role):
    """OpenAI's newer name for the system turn (its clients send it to newer models)."""
    return "system" if role == "developer" else role

  @field_validator("content")
  @classmethod
  def _content_is_text(cls, content: str | list) -> str | list:
    parts = [content] if isinstance(content, str) else [
        part.text for part in content if isinstance(part, TextPart)]
    for text in parts:
      whole_unicode(text)
      if IMAGE_TOKEN in text:
        raise ValueError(f"the text holds the literal {IMAGE_TOKEN}; send images as image_url "
                         "parts and remove it from the text")
      if marker := next((token for token in RESERVED_TOKENS if token in text), None):
        raise ValueError(f"the text holds the chat template's reserved {marker}, which would "
                         "end this turn or open another's (training refuses it in content "
                         "too); remove it")
    return content

  def text(self) -> str:
    """The text, with the image placeholder where each image part sits."""
    if isinstance(self.content, str):
      return self.content
    return "".join(IMAGE_TOKEN if isinstance(part, ImagePart) else part.text
                   for part in self.content)


class ChatCompletionRequest(SamplingRequest):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
  max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

  def alternatives(self) -> int | None:
    if self.top_logprobs is not None and not self.logprobs:
      raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    return (self.top_logprobs or 0) if self.logprobs else None


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
  errors = [{**error, "loc": [part for part in error.get("loc", ()) if part != "body"]}
            for error in exc.errors()]
  first = errors[0]
  fields = [str(part) for part in first["loc"]]
  param = fields[0] if fields and first.get("type") != "json_invalid" else None
  if param and (union := _failed_union(errors)):
    path, forms = union
    return OpenAIError(400, f"{path}: matches none of its forms: {forms}", param=param)
  where = f"{'.'.join(fields)}: " if param else ""
  return OpenAIError(400, f"{where}{_message(first)}", param=param)


def _message(error: dict) -> str:
  return error.get("msg", "invalid request").removeprefix("Value error, ")


def _failed_union(errors: list[dict]) -> tuple[str, str] | None:
  """(the field's path, each form and why it failed) when the first error is one of a union
  field's forms (pydantic names each form in the error's loc: `prompt.str`,
  `prompt.list[int].0`, ...), else None. Only the first form's error would say "should be a
  valid string" of `[1.5]`, whose trouble is the list of token ids' 1.5."""
  loc = errors[0]["loc"]
  for depth in range(1, len(loc)):  # loc[0] is the field, never a form
    if not isinstance(loc[depth], str):
      continue
    forms = {}
    for error in errors:
      if error["loc"][:depth] == loc[:depth] and len(error["loc"]) > depth:
        form = error["loc"][depth]
        if isinstance(form, str) and form not in forms:
          where = ".".join(map(str, error["loc"][depth + 1:]))
          named = form.replace("tagged-union[TextPart,ImagePart]", "content part")
          forms[form] = f"{named} ({f'at {where}: ' if where else ''}{_message(error)})"
    if len(forms) > 1:
      return ".".join(map(str, loc[:depth])), "; ".join(forms.values())
  return None


def check_supported(request: SamplingRequest):
  if request.stream_options is not None and not request.stream:
    raise OpenAIError(400, "stream_options is only allowed with stream=true; set stream or "
                      "drop stream_options", param="stream_options")
  extra = request.model_extra or {}
  for name, no_op in UNSUPPORTED_UNLESS.items():
    if name in request.supported:
      continue
    value = extra[name] if name in extra else getattr(request, name, None)
    if value not in (no_op, None, {}, []):
      shown = repr(value) if len(repr(value)) <= 100 else repr(value)[:100] + "..."
      raise OpenAIError(400, f"{name}={shown} is not supported yet; leave it unset",
                        param=name)


def check_completion(request: CompletionRequest):
  """What the completions route refuses beyond the request's shape."""
  if request.max_tokens == 0 and not request.echo:
    raise OpenAIError(400, "max_tokens=0 generates nothing; set echo=true to score the prompt, "
                      "or ask for at least one token", param="max_tokens")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
  """Bodies of one response: the whole one, or its stream chunks (all sharing one id). A
  request for n choices of each of its prompts gets them as indexes prompt * n + 0..n-1."""

  def __init__(self, model: str, chat: bool):
    self.model, self.chat = model, chat
    self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    self.created = int(time.time())

  def _envelope(self, object_: str, choices: list[dict], **extra) -> dict:
    return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
            "choices": choices, **extra}

  def choice(self, index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    if self.chat:
      return {"index": index, "message": {"role": "assistant", "content": text},
              "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

  def whole(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """`prompt_tokens` counts each prompt once, however many choices it has (as OpenAI and
    vLLM do); `completion_tokens`, every choice's."""
    return self._envelope("chat.completion" if self.chat else "text_completion", choices,
                          usage=usage(prompt_tokens, completion_tokens))

  def chunk(self, text: str | None, finish_reason: str | None, *, index: int = 0,
            first: bool = False, with_usage_field: bool = False,
            logprobs: dict | None = None) -> dict:
    """text=None: the chat chunk carrying only the finish reason (an empty delta)."""
    if self.chat:
      delta = {} if text is None else {"content": text}
      if first:
        delta = {"role": "assistant", **delta}
      choice = {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason}
    else:
      choice = {"index": index, "text": text or "", "logprobs": logprobs,
                "finish_reason": finish_reason}
    extra = {"usage": None} if with_usage_field else {}
    return self._envelope(self.object_chunk, [choice], **extra)

  def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
    return self._envelope(self.object_chunk, [], usage=usage(prompt_tokens, completion_tokens))

  @property
  def object_chunk(self) -> str:
    return "chat.completion.chunk" if self.chat else "text_completion"


class TokenTexts:
  """Each token's text in a logprobs object, kept once made (an lm-eval request echoes
  thousands of tokens). A piece that is not whole UTF-8 (one byte of a character) is written
  `bytes:\\xNN`, as OpenAI does, so distinct bytes stay distinct keys."""

  def __init__(self, token_bytes: Callable[[int], bytes]):
    self.token_bytes = token_bytes
    self._texts: dict[int, str] = {}
    self._starts: dict[int, int] = {}  # characters whose first byte is in the token
    self._inside: dict[int, int] = {}  # 1 when the token's first byte continues a character

  def __call__(self, token_id: int) -> str:
    text = self._texts.get(token_id)
    if text is None:
      raw = self.token_bytes(token_id)
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
      self._texts[token_id] = text
      self._starts[token_id] = sum(not _continues(byte) for byte in raw)
      self._inside[token_id] = int(bool(raw) and _continues(raw[0]))
    return text

  def many(self, token_ids: list[int]) -> list[str]:
    """The texts of `token_ids`."""
    return self._looked_up(self._texts, token_ids)

  def offsets(self, token_ids: list[int], start: int) -> tuple[list[int], int]:
    """(each token's character offset in the text the tokens decode to, counted from
    `start`; the offset after the last). A token that begins inside a character (a byte-
    fallback piece after the first) has that character's offset: the `bytes:` labels'
    lengths count for nothing."""
    offsets = list(itertools.accumulate(self._looked_up(self._starts, token_ids),
                                        initial=start))
    end = offsets.pop()
    return [max(start, offset - inside) for offset, inside in
            zip(offsets, self._looked_up(self._inside, token_ids))], end

  def _looked_up(self, table: dict[int, int | str], token_ids: list[int]) -> list:
    """`table`'s entries for `token_ids`, at C speed once each token is known (a new one is
    made, with all its entries, on the way)."""
    try:
      return list(map(table.__getitem__, token_ids))
    except KeyError:
      for token_id in set(token_ids).difference(self._texts):
        self(token_id)
      return list(map(table.__getitem__, token_ids))


def _continues(byte: int) -> bool:
  """Whether a UTF-8 byte continues a character (10xxxxxx) rather than starting one."""
  return byte & 0xC0 == 0x80


class Logprobs:
  """OpenAI's `logprobs` object of a choice, from (text, token id, logprob, alternatives).

  Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; chat:
  {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}. Log-probabilities are
  the model's own, before temperature, top-k and top-p.
  """

  def __init__(self, chat: bool, token_bytes: Callable[[int], bytes],
               texts: "TokenTexts | None" = None):
    self.chat, self.token_bytes = chat, token_bytes
    self.token = texts or TokenTexts(token_bytes)
    self.text_offset = 0

  def of_prompt(self, tokens: list[int], logprobs, alternatives: int,
                text_length: int | None = None) -> dict:
    """Completions' object for an echoed prompt (`logprobs`: its PromptLogprobs); the first
    token's entries are null, as OpenAI's are. `text_length`: the echoed text's, when the
    pieces spell more at its start (SentencePiece's dummy-prefix space, which decoding
    drops): offsets then count in the text."""
    texts = self.token.many(tokens)
    start = self.text_offset
    offsets, self.text_offset = self.token.offsets(tokens, start)
    if text_length is not None and (dropped := self.text_offset - start - text_length) > 0:
      offsets = [max(start, offset - dropped) for offset in offsets]
      self.text_offset -= dropped
    return {"tokens": texts,
            "token_logprobs": [None, *logprobs.logprobs],
            "top_logprobs": [None, *self._alternatives(logprobs, alternatives)],
            "text_offset": offsets}

  def _alternatives(self, logprobs, alternatives: int) -> list[dict[str, float]]:
    """{text: logprob} of the `alternatives` likeliest tokens after each prompt token."""
    count = min(alternatives, logprobs.top_tokens.shape[-1])
    positions = len(logprobs.logprobs)
    if count == 0:
      return [{} for _ in range(positions)]
    texts = self.token.many(logprobs.top_tokens[:, :count].ravel().tolist())
    values = logprobs.top_logprobs[:, :count].ravel().tolist()
    if count == 1:
      return [{text: value} for text, value in zip(texts, values)]
    return [dict(zip(texts[start:start + count], values[start:start + count]))
            for start in range(0, positions * count, count)]

  @staticmethod
  def joined(first: dict, second: dict) -> dict:
    """Two completions' logprobs objects, one after the other."""
    return {key: first[key] + second[key] for key in first}

  def of(self, deltas: list) -> dict:
    """The object for these deltas (a whole response, or one stream chunk's share)."""
    if self.chat:
      return {"content": [self._chat_entry(d.token_id, d.logprob, [
          self._chat_entry(t, lp) for t, lp in d.top_logprobs]) for d in deltas]}
    offsets = []
    for delta in deltas:
      offsets.append(self.text_offset)
      self.text_offset += len(delta.text)
    return {"tokens": [self.token(d.token_id) for d in deltas],
            "token_logprobs": [d.logprob for d in deltas],
            "top_logprobs": [{self.token(t): lp for t, lp in d.top_logprobs} for d in deltas],
            "text_offset": offsets}

  def _chat_entry(self, token_id: int, logprob: float, top: list | None = None) -> dict:
    entry = {"token": self.token(token_id), "logprob": logprob,
             "bytes": list(self.token_bytes(token_id))}
    return entry if top is None else {**entry, "top_logprobs": top}


def sse(body: dict | str) -> str:
  """One server-sent event: `data: {json}` and a blank line."""
  return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
