"""serving.server's HTTP behaviour (API keys, disconnects, failures) over a scripted fake engine.

The fake engine emits one character per token, slowly when asked, so these tests need no model
and can watch exactly how many decode steps a request ran.
"""

import json
import threading
import time

import httpx
import openai
import portpicker
import pytest
import uvicorn
from fastapi.testclient import TestClient

from serving.engine import Delta
from serving.server import create_app, parse_args, read_api_keys

MODEL = "fake"


class FakeEngine:
  """Continues any prompt with "abcdef…", one character per token."""
  model_name, context_length = MODEL, 1000

  def __init__(self, seconds_per_token: float = 0.0, fail_after: int | None = None):
    self.seconds_per_token, self.fail_after = seconds_per_token, fail_after
    self.decode_steps = 0
    self.closed = threading.Event()

  def prompt_ids(self, prompt: str, max_tokens: int | None):
    return [1] + [ord(c) for c in prompt], max_tokens or 16

  def stream(self, prompt_ids, *, max_tokens, stop=None, **sampling):
    try:
      for step in range(max_tokens):
        if step == self.fail_after:
          raise RuntimeError("device lost")
        time.sleep(self.seconds_per_token)
        self.decode_steps += 1
        yield Delta(chr(ord("a") + step % 26), step, "length" if step == max_tokens - 1 else None)
    finally:
      self.closed.set()


def completion(**change) -> dict:
  return {"model": MODEL, "prompt": "x", "max_tokens": 3, **change}


# --- API keys ----------------------------------------------------------------------------------

@pytest.fixture
def keyed_client():
  with TestClient(create_app(FakeEngine(), api_keys=["key-one", "key-two"])) as client:
    yield client


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "key-one"},
                                     {"Authorization": "Basic key-one"}])
def test_a_missing_or_wrong_api_key_is_a_401(keyed_client, headers):
  for method, path in (("post", "/v1/completions"), ("post", "/v1/chat/completions"),
                       ("get", "/v1/models")):
    response = keyed_client.request(method, path, json=completion(), headers=headers)
    assert response.status_code == 401, (path, response.text)
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]


def test_a_listed_api_key_is_let_in(keyed_client):
  for key in ("key-one", "key-two"):
    response = keyed_client.post("/v1/completions", json=completion(),
                                 headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "abc"
  assert keyed_client.get("/health").status_code == 200
  assert keyed_client.get("/metrics").status_code == 200


def test_the_openai_client_sends_its_key(keyed_client):
  client = lambda key: openai.OpenAI(base_url="http://testserver/v1", api_key=key,
                                     http_client=keyed_client, max_retries=0)
  assert client("key-two").completions.create(model=MODEL, prompt="x",
                                              max_tokens=2).choices[0].text == "ab"
  with pytest.raises(openai.AuthenticationError):
    client("nope").completions.create(model=MODEL, prompt="x", max_tokens=2)


def test_api_keys_file_is_one_key_per_line(tmp_path):
  keys = tmp_path / "keys"
  keys.write_text("alpha\n\n  beta  \n")
  assert read_api_keys(keys) == ["alpha", "beta"]
  assert parse_args(["--checkpoint_dir=x", f"--api_keys_file={keys}"]).api_keys_file == str(keys)
  keys.write_text("\n")
  with pytest.raises(ValueError, match="one key per line"):
    read_api_keys(keys)


# --- failures ----------------------------------------------------------------------------------

def test_an_engine_failure_is_a_500_with_an_openai_error():
  client = TestClient(create_app(FakeEngine(fail_after=0)), raise_server_exceptions=False)
  response = client.post("/v1/completions", json=completion())
  assert response.status_code == 500
  assert response.json()["error"]["type"] == "server_error"
  # the engine is free again for the next request
  assert client.post("/v1/completions", json=completion()).status_code == 500


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event():
  client = TestClient(create_app(FakeEngine(fail_after=2)))
  body = client.post("/v1/completions", json=completion(max_tokens=5, stream=True)).text
  events = [event[len("data: "):] for event in body.split("\n\n") if event]
  assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["a", "b"]
  assert json.loads(events[2])["error"]["type"] == "server_error"
  assert events[3] == "[DONE]"


# --- disconnects -------------------------------------------------------------------------------

@pytest.fixture
def slow_server():
  """A real uvicorn server (disconnects need a real socket) over a 20 ms/token engine."""
  engine = FakeEngine(seconds_per_token=0.02)
  port = portpicker.pick_unused_port()
  server = uvicorn.Server(uvicorn.Config(create_app(engine), port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 10
  while not server.started:
    assert time.monotonic() < deadline, "uvicorn did not start"
    time.sleep(0.01)
  yield engine, f"http://127.0.0.1:{port}"
  server.should_exit = True
  thread.join(timeout=10)


def test_a_client_that_leaves_mid_stream_stops_its_generation(slow_server):
  engine, url = slow_server
  with httpx.stream("POST", f"{url}/v1/completions", timeout=10,
                    json=completion(max_tokens=500, stream=True)) as response:
    for line in response.iter_lines():
      if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"] == "c":
        break
  assert engine.closed.wait(timeout=5), "generation went on after the client left"
  assert engine.decode_steps <= 6  # 3 read, plus what was in flight when the socket closed
  # the engine was handed back: the next request runs at once
  started = time.monotonic()
  response = httpx.post(f"{url}/v1/completions", json=completion(max_tokens=2), timeout=10)
  assert response.json()["choices"][0]["text"] == "ab" and time.monotonic() - started < 2
