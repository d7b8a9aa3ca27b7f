"""ASGI middleware that refuses a request before its body is read: no API key, or too big.

Both are pure ASGI (no framework request object), so they run before FastAPI reads and parses
the body: an unauthenticated 20 MB upload is refused from its headers alone, and an oversized
one is cut off at the limit instead of being buffered whole.
"""

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.openai_api import OpenAIError, error_response

# A max-length context as JSON: 32k tokens of up to 16 characters each, every character sent as
# a 6-byte `\uXXXX` escape, is 3 MiB; 8 MiB leaves room for chat framing and longer contexts.
DEFAULT_MAX_REQUEST_BYTES = 8 << 20


def missing_api_key() -> OpenAIError:
  return OpenAIError(401, "missing or wrong API key; send `Authorization: Bearer KEY` with a key "
                     "from the server's --api_keys_file", code="invalid_api_key")


def too_large(max_bytes: int) -> OpenAIError:
  return OpenAIError(413, f"the request body is over the server's limit of {max_bytes} bytes; "
                     "send a shorter prompt or raise --max_request_bytes",
                     code="request_too_large")


# What a client without a key may still read: liveness, Prometheus, and the API's own docs.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/redoc"})


def guarded(path: str) -> bool:
  """Whether RequireApiKey asks `path`'s requests for a key: every route that does work
  (/v1, /tokenize, /detokenize, /tokenizer_info, /reset_prefix_cache)."""
  return path not in OPEN_PATHS


class RequireApiKey:
  """Answers 401, from the headers alone, to a request for a `guarded` path without a listed
  key."""

  def __init__(self, app: ASGIApp, api_keys: list[str]):
    self.app = app
    self.api_keys = [key.encode() for key in api_keys]

  async def __call__(self, scope: Scope, receive: Receive, send: Send):
    if scope["type"] == "http" and guarded(scope["path"]) and not self.allows(
        Headers(scope=scope).get("authorization", "")):
      return await error_response(missing_api_key())(scope, receive, send)
    await self.app(scope, receive, send)

  def allows(self, authorization: str) -> bool:
    scheme, _, key = authorization.partition(" ")
    key = key.strip().encode()
    # Every key is compared, so the time taken does not tell which one came close.
    matches = [hmac.compare_digest(key, known) for known in self.api_keys]
    return scheme.lower() == "bearer" and any(matches)


class LimitBody:
  """Answers 413 to a body over `max_bytes`: from Content-Length before reading anything, and
  for a body without one (chunked) as soon as the bytes read pass the limit; then the app is
  told the client left, and whatever it still sends is dropped. Only a body without a length
  is counted, so the usual request's stream passes through untouched."""

  def __init__(self, app: ASGIApp, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope: Scope, receive: Receive, send: Send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    declared = Headers(scope=scope).get("content-length", "")
    if declared.isdigit():  # the server's parser ends the body at the declared length
      if int(declared) > self.max_bytes:
        return await self.refuse(scope, receive, send)
      return await self.app(scope, receive, send)
    received, refused, responding = 0, False, False

    async def receive_within_limit() -> Message:
      nonlocal received, refused
      message = await receive()
      if message["type"] == "http.request" and not refused:
        received += len(message.get("body", b""))
        if received > self.max_bytes:
          refused = True
          if not responding:  # else the status line is out; all left is to stop reading
            await self.refuse(scope, receive, send)
      return {"type": "http.disconnect"} if refused else message

    async def send_unless_refused(message: Message):
      nonlocal responding
      responding = True
      if not refused:
        await send(message)

    await self.app(scope, receive_within_limit, send_unless_refused)

  async def refuse(self, scope: Scope, receive: Receive, send: Send):
    response = error_response(too_large(self.max_bytes))
    response.headers["connection"] = "close"  # the rest of the body is never read
    await response(scope, receive, send)
