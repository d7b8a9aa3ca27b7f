"""serving.guards: API keys and the body limit are enforced before the body is read, over a tiny
ASGI app that reads its whole body and answers with its length."""

import asyncio
import json

from conftest import body_length_app
from serving.guards import LimitBody, RequireApiKey

CHUNK = 64 << 10


def call(app, body_bytes: int, headers: dict[str, str], path: str = "/v1/completions"):
  """(status, response headers, response body, body bytes the app side read) of one request
  whose body arrives in 64 KiB chunks."""
  read, sent = 0, []

  async def receive():
    nonlocal read
    chunk = min(CHUNK, body_bytes - read)
    read += chunk
    return {"type": "http.request", "body": b"x" * chunk, "more_body": read < body_bytes}

  async def send(message):
    sent.append(message)

  scope = {"type": "http", "method": "POST", "path": path,
           "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
  asyncio.run(app(scope, receive, send))
  starts = [m for m in sent if m["type"] == "http.response.start"]
  assert len(starts) == 1, sent
  body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
  return starts[0]["status"], dict(starts[0]["headers"]), body, read


def test_a_body_declared_over_the_limit_is_refused_before_a_byte_is_read():
  app = LimitBody(body_length_app, max_bytes=8 << 20)
  status, headers, body, read = call(app, 20 << 20, {"Content-Length": str(20 << 20)})
  assert (status, read) == (413, 0)
  assert headers[b"connection"] == b"close"
  error = json.loads(body)["error"]
  assert error["code"] == "request_too_large" and "--max_request_bytes" in error["message"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit():
  app = LimitBody(body_length_app, max_bytes=1 << 20)
  status, _, body, read = call(app, 20 << 20, {"Transfer-Encoding": "chunked"})
  assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
  assert (1 << 20) < read <= (1 << 20) + CHUNK


def test_a_body_at_the_limit_passes_whole():
  app = LimitBody(body_length_app, max_bytes=1 << 20)
  assert call(app, 1 << 20, {"Content-Length": str(1 << 20)})[::2] == (200, str(1 << 20).encode())
  assert call(app, 1 << 20, {})[::2] == (200, str(1 << 20).encode())


def test_a_request_without_a_listed_key_is_refused_before_its_body_is_read():
  app = RequireApiKey(body_length_app, api_keys=["k1", "k2"])
  for headers in ({}, {"Authorization": "Bearer k3"}, {"Authorization": "k1"},
                  {"Authorization": "Basic k1"}, {"Authorization": "Bearer k1k2"}):
    status, _, body, read = call(app, 20 << 20, headers)
    assert (status, read) == (401, 0), headers
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
  assert call(app, 10, {"Authorization": "Bearer k2"})[0] == 200
  assert call(app, 10, {"Authorization": "bearer  k1 "})[0] == 200
  assert call(app, 10, {}, path="/health")[0] == 200
