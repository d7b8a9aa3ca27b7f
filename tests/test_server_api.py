"""serving.server's HTTP behaviour (API keys, disconnects, failures, a full queue, shutdown)
over a scripted fake engine.

The fake engine has the real one's slot interface and continues any prompt with "abcdef…", one
character per token, slowly when asked, so these tests need no model and can watch exactly how
many decode steps ran.
"""

import asyncio
import gc
import json
import logging
import socket
import threading
import time

import httpx
import numpy as np
import openai
import portpicker
import pytest
import uvicorn
from fastapi.testclient import TestClient

from conftest import run_in_thread
from maxlm import checkpoint
from maxlm.model import count_params
from maxlm.sampling import TokenChoice
from serving.engine import Step
from serving.orchestrator import Delta, Orchestrator
from serving.server import (DrainingServer, create_app, drain, engine_cpus, parse_args,
                            listening_socket, read_api_keys, served_params,
                            unless_disconnected)

MODEL = "fake"


class FakeEngine:
  """Slot i holds the index of the next letter to emit; `generate` advances every slot."""
  model_name, context_length, eos_id, quantize = MODEL, 1000, -1, "none"
  stop_ids = frozenset()

  def __init__(self, seconds_per_token: float = 0.0, fail_after: int | None = None,
               slots: int = 2):
    self.seconds_per_token, self.fail_after, self.slots = seconds_per_token, fail_after, slots
    self.decode_steps = 0
    self.most_active = 0

  def prompt_ids(self, prompt: str, max_tokens: int | None):
    return [1] + [ord(c) for c in prompt], max_tokens or 16

  def init_decode_state(self):
    return [None] * self.slots

  def prefill(self, prompt_ids, settings):
    return 1, step([0])

  def insert(self, prefix, state, slot):
    state[slot] = prefix
    return state

  def fits(self, tokens):  # a pool that never runs out
    return True

  def release(self, slot):
    pass

  def generate(self, state):
    if self.decode_steps == self.fail_after:
      raise RuntimeError("device lost")
    time.sleep(self.seconds_per_token)
    self.decode_steps += 1
    self.most_active = max(self.most_active, sum(s is not None for s in state))
    tokens = [0 if s is None else s for s in state]
    return [None if s is None else s + 1 for s in state], step(tokens)

  def decode(self, token_ids):
    return "".join(chr(ord("a") + t % 26) for t in token_ids)

  def token_bytes(self, token_id):
    return self.decode([token_id]).encode()


def step(tokens: list[int]) -> TokenChoice:
  rows = len(tokens)
  return TokenChoice(np.array(tokens, np.int32), np.zeros(rows, np.float32),
                     np.zeros((rows, 0), np.int32), np.zeros((rows, 0), np.float32))


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
                       ("get", "/v1/models"), ("post", "/tokenize"), ("post", "/detokenize"),
                       ("get", "/tokenizer_info"), ("post", "/reset_prefix_cache")):
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


def test_an_unauthenticated_20_mb_body_is_refused_before_a_byte_of_it_is_read():
  app = create_app(FakeEngine(), api_keys=["key-one"])
  body = json.dumps(completion(prompt="x" * (20 << 20))).encode()
  read, sent = 0, []

  async def receive():  # the body in 64 KiB pieces, counting what the server takes
    nonlocal read
    piece = body[read:read + (64 << 10)]
    read += len(piece)
    return {"type": "http.request", "body": piece, "more_body": read < len(body)}

  async def send(message):
    sent.append(message)

  scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
           "headers": [(b"content-type", b"application/json")]}
  asyncio.run(app(scope, receive, send))
  assert sent[0]["status"] == 401 and read == 0
  assert json.loads(sent[1]["body"])["error"]["code"] == "invalid_api_key"


def test_api_keys_file_is_one_key_per_line(tmp_path):
  keys = tmp_path / "keys"
  keys.write_text("alpha\n\n  beta  \n")
  assert read_api_keys(keys) == ["alpha", "beta"]
  assert parse_args(["--checkpoint_dir=x", f"--api_keys_file={keys}"]).api_keys_file == str(keys)
  keys.write_text("\n")
  with pytest.raises(ValueError, match="one key per line"):
    read_api_keys(keys)


def test_an_api_keys_file_that_cannot_be_read_names_the_flag(tmp_path):
  for path in (tmp_path / "missing", tmp_path):
    with pytest.raises(ValueError, match=f"--api_keys_file {path} cannot be read"):
      read_api_keys(path)
  binary = tmp_path / "keys.bin"
  binary.write_bytes(b"\xff\xfe")
  with pytest.raises(ValueError, match="cannot be read .*utf-8"):
    read_api_keys(binary)


@pytest.mark.parametrize("flag, says", [
    ("--port=70000", "give a port from 1 to 65535"), ("--port=-1", "give a port"),
    ("--max_queue=0", "--max_queue=0; give a positive number"),
    ("--max_queue=-1", "give a positive number"),
    ("--header_timeout_s=nan", "--header_timeout_s=nan; give a positive number"),
    ("--kv_cache_memory=nan", "give a positive number"), ("--kv_cache_memory=inf", "GiB"),
    ("--max_len=0", "--max_len=0; give a positive number"),
    ("--shutdown_grace_s=-5", "--shutdown_grace_s=-5.0; give 0 or more"),
    ("--shutdown_grace_s=nan", "give 0 or more"),
    ("--max_prefill_chunk=-5", "give 0 or more"),
    ("--max_images_per_request=-1", "give 0 or more"),
    ("--max_image_pixels=0", "give a positive number"),
    ("--api_keys_file=", "--api_keys_file is empty"),
    ("--allowed_media_domains=example.com,https://cdn.org/", "'https://cdn.org/' is not a host"),
    ("--allowed_media_domains=*.cdn.net", "'*.cdn.net' is not a host")])
def test_a_flag_out_of_its_range_is_refused_before_anything_loads(flag, says, capsys):
  with pytest.raises(SystemExit) as exited:
    parse_args(["--checkpoint_dir=x", flag])
  assert exited.value.code == 2 and says in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_the_model_loads():
  taken = listening_socket("127.0.0.1", 0)
  taken.listen()
  port = taken.getsockname()[1]
  try:
    with pytest.raises(OSError, match=f"cannot listen on --host 127.0.0.1 --port {port}: "
                       "Address already in use"):
      listening_socket("127.0.0.1", port)
    with pytest.raises(OSError, match="cannot listen on --host not.a.host.invalid"):
      listening_socket("not.a.host.invalid", 0)
  finally:
    taken.close()


# --- failures ----------------------------------------------------------------------------------

class Cancellable:
  cancelled = False

  def cancel(self):
    self.cancelled = True


def test_a_stream_that_falls_behind_sends_what_has_arrived_as_one_chunk():
  async def chunks(items):
    queue = asyncio.Queue()
    for item in items:
      queue.put_nowait(item)
    generation, got = Cancellable(), []
    try:
      async for batch in drain(queue, generation):
        got.append("".join(delta.text for delta in batch))
    except ValueError as error:
      got.append(f"error: {error}")
    return got, generation.cancelled

  a, b, c = (Delta(letter, i, None) for i, letter in enumerate("abc"))
  assert asyncio.run(chunks([a, b, c, None])) == (["abc"], True)
  assert asyncio.run(chunks([a, b, ValueError("engine died")])) == (["ab", "error: engine died"],
                                                                     True)


def test_a_50_mb_prompt_is_a_413_and_health_stays_up():
  client = TestClient(create_app(FakeEngine()))
  response = client.post("/v1/completions", json=completion(prompt="x" * (50 << 20)))
  assert response.status_code == 413, response.text[:200]
  assert response.json()["error"]["code"] == "request_too_large"
  assert client.get("/health").status_code == 200
  small = create_app(FakeEngine(), max_request_bytes=1000)
  assert TestClient(small).post("/v1/completions", json=completion(
      prompt="x" * 1000)).status_code == 413


class SlowTokenizer(FakeEngine):
  """Takes 1 s to tokenize, and remembers on which thread."""

  def __init__(self):
    super().__init__()
    self.threads = []

  def prompt_ids(self, prompt, max_tokens):
    self.threads.append(threading.current_thread().name)
    time.sleep(1.0)
    return super().prompt_ids(prompt, max_tokens)


def test_tokenizing_a_prompt_leaves_the_event_loop_free():
  engine = SlowTokenizer()
  app = create_app(engine)

  async def scenario():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
      chat = asyncio.create_task(client.post("/v1/chat/completions", json={
          "model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}],
          "max_tokens": 2}))
      await asyncio.sleep(0.2)  # the prompt is being tokenized now
      begun = time.perf_counter()
      health = await client.get("/health")
      return health, time.perf_counter() - begun, await chat

  health, health_s, chat = asyncio.run(scenario())
  assert health.status_code == 200 and health_s < 0.3
  assert chat.json()["choices"][0]["message"]["content"] == "ab"
  assert engine.threads and threading.main_thread().name not in engine.threads


def test_a_wrong_method_is_a_405_that_says_what_is_allowed():
  client = TestClient(create_app(FakeEngine()))
  response = client.get("/v1/completions")
  assert response.status_code == 405 and response.headers["allow"] == "POST"
  assert "error" in response.json()


def test_cpus_leaves_one_core_to_the_clients_unless_told():
  assert engine_cpus("auto", [0, 1, 2, 3]) == [0, 1, 2]
  assert engine_cpus("auto", [5]) == [5]
  assert engine_cpus("all", [0, 1]) == [0, 1]
  assert engine_cpus("1", [2, 3]) == [2]
  for bad in ("0", "3", "many"):
    with pytest.raises(ValueError, match="--engine_cpus"):
      engine_cpus(bad, [0, 1])


def test_auto_gives_a_model_of_20m_parameters_or_more_every_core():
  assert engine_cpus("auto", [0, 1], model_params=88_000_000) == [0, 1]
  assert engine_cpus("auto", [0, 1], model_params=3_000_000) == [0]


def test_served_params_reads_the_active_count_from_the_metadata_alone(tiny_run, tmp_path):
  _, meta = checkpoint.read_meta(tiny_run)
  assert served_params(str(tiny_run), None) == count_params(checkpoint.config_from_meta(meta),
                                                            active=True) > 0
  assert served_params(str(tmp_path), None) == 0


def test_a_dead_engine_loop_is_a_503_and_health_says_so():
  client = TestClient(create_app(FakeEngine(fail_after=0)), raise_server_exceptions=False)
  assert client.get("/health").status_code == 200
  response = client.post("/v1/completions", json=completion())
  assert response.status_code == 503, response.text
  assert response.json()["error"]["code"] == "service_unavailable"
  assert "device lost" in response.json()["error"]["message"]
  assert client.get("/health").status_code == 503
  assert client.post("/v1/completions", json=completion()).status_code == 503


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event():
  client = TestClient(create_app(FakeEngine(fail_after=1)))
  body = client.post("/v1/completions", json=completion(max_tokens=5, stream=True)).text
  events = [json.loads(event[len("data: "):]) if event != "data: [DONE]" else "[DONE]"
            for event in body.split("\n\n") if event]
  texts = [event["choices"][0]["text"] for event in events if "choices" in event]
  assert "".join(texts) == "ab"  # the tokens before the failure, in one chunk or two
  assert events[len(texts)]["error"]["code"] == "service_unavailable"
  assert events[len(texts) + 1:] == ["[DONE]"]


def test_the_next_step_is_queued_before_the_last_steps_tokens_are_fetched(monkeypatch):
  calls = []

  class RecordingEngine(FakeEngine):
    def generate(self, state):
      calls.append("generate")
      return super().generate(state)

  fetch = Step.from_choice
  monkeypatch.setattr(Step, "from_choice", lambda choice: calls.append("fetch") or fetch(choice))
  orchestrator = Orchestrator(RecordingEngine()).start()
  deltas = orchestrator.generate([1, 2], max_tokens=5)
  orchestrator.shutdown(grace_s=5)
  assert "".join(d.text for d in deltas) == "abcde"
  assert [d.finish_reason for d in deltas] == [None] * 4 + ["length"]
  # The prompt's first token, then each step's tokens, are fetched only after the next step
  # is queued; the step queued while the last token was fetched is dropped, never delivered.
  assert calls == ["generate", "fetch"] * 5 + ["fetch"] * (len(calls) - 10)
  assert len(calls) <= 11


def test_a_full_queue_is_a_429_and_other_requests_go_on():
  app = create_app(FakeEngine(seconds_per_token=0.02, slots=1), max_queue=1)

  async def scenario():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
      running = asyncio.create_task(client.post("/v1/completions",
                                                json=completion(max_tokens=30)))
      await asyncio.sleep(0.2)  # it holds the only slot
      waiting = asyncio.create_task(client.post("/v1/completions",
                                                json=completion(max_tokens=2)))
      await asyncio.sleep(0.1)  # it fills the one place in the queue
      refused = await client.post("/v1/completions", json=completion())
      return refused, await running, await waiting

  refused, running, waiting = asyncio.run(scenario())
  assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
  assert running.json()["choices"][0]["text"] == "abcdefghijklmnopqrstuvwxyzabcd"
  assert waiting.json()["choices"][0]["text"] == "ab"


def test_of_two_batches_that_fit_the_queue_only_one_at_a_time_one_is_served_whole():
  app = create_app(FakeEngine(seconds_per_token=0.01, slots=1), max_queue=3)

  async def scenario():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
      return await asyncio.gather(*(client.post("/v1/completions", json=completion(
          prompt=[f"p{i}"] * 3, max_tokens=3)) for i in range(2)))

  statuses = sorted(response.status_code for response in asyncio.run(scenario()))
  assert statuses == [200, 429]  # the prompts of each went in together, or not at all


def test_requests_share_the_decode_slots():
  engine = FakeEngine(seconds_per_token=0.01, slots=4)
  app = create_app(engine)

  async def scenario():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
      return await asyncio.gather(*(client.post("/v1/completions", json=completion(
          max_tokens=10 + i)) for i in range(8)))

  responses = asyncio.run(scenario())
  assert [r.json()["choices"][0]["text"] for r in responses] == [
      "abcdefghijklmnopqrstuvwxyz"[:10 + i] for i in range(8)]
  assert engine.most_active == 4
  assert engine.decode_steps < sum(10 + i for i in range(8)) / 2


# --- disconnects and shutdown ------------------------------------------------------------------

def start_server(engine: FakeEngine, grace_s: float = 30.0):
  """A real uvicorn server in a thread (disconnects need a real socket)."""
  port = portpicker.pick_unused_port()
  app = create_app(engine)
  server = DrainingServer(uvicorn.Config(app, port=port, log_level="warning"),
                          app.state.orchestrator, grace_s)
  thread = run_in_thread(server)
  return server, thread, app.state.orchestrator, f"http://127.0.0.1:{port}"


@pytest.fixture
def slow_server():
  """Over a 20 ms/token engine."""
  engine = FakeEngine(seconds_per_token=0.02)
  server, thread, orchestrator, url = start_server(engine)
  yield engine, orchestrator, url
  server.should_exit = True
  thread.join(timeout=10)


def wait_for(condition, timeout_s=5.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.005)
  return True


def test_a_client_that_leaves_mid_stream_frees_its_slot(slow_server):
  engine, orchestrator, url = slow_server
  with httpx.stream("POST", f"{url}/v1/completions", timeout=10,
                    json=completion(max_tokens=500, stream=True)) as response:
    for line in response.iter_lines():
      if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"] == "c":
        break
  assert wait_for(lambda: orchestrator.active == 0), "the slot stayed taken after the client left"
  steps_when_freed = engine.decode_steps
  assert steps_when_freed <= 6  # 3 read, plus what was in flight when the socket closed
  time.sleep(0.1)
  assert engine.decode_steps == steps_when_freed  # nothing decodes for nobody
  response = httpx.post(f"{url}/v1/completions", json=completion(max_tokens=2), timeout=10)
  assert response.json()["choices"][0]["text"] == "ab"


@pytest.mark.parametrize("echo", [False, True])
def test_a_client_that_leaves_a_stream_of_several_prompts_frees_every_slot(slow_server, echo):
  engine, orchestrator, url = slow_server
  with httpx.stream("POST", f"{url}/v1/completions", timeout=10, json=completion(
      prompt=["x", "y"], max_tokens=500, stream=True, echo=echo)) as response:
    assert response.status_code == 200
    seen = set()
    for line in response.iter_lines():
      if line.startswith("data: "):
        seen.add(json.loads(line[6:])["choices"][0]["index"])
        if seen == {0, 1} and engine.decode_steps >= 3:
          break
  assert wait_for(lambda: orchestrator.active == 0), "a slot stayed taken after the client left"
  steps_when_freed = engine.decode_steps
  time.sleep(0.1)
  assert engine.decode_steps == steps_when_freed  # nothing decodes for nobody
  response = httpx.post(f"{url}/v1/completions", json=completion(max_tokens=2), timeout=10)
  assert response.json()["choices"][0]["text"] == "ab"


def test_a_client_that_leaves_before_its_whole_response_frees_its_slot(slow_server):
  engine, orchestrator, url = slow_server
  host, port = url.removeprefix("http://").split(":")
  body = json.dumps(completion(max_tokens=1000)).encode()
  client = socket.create_connection((host, int(port)))
  client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
  assert wait_for(lambda: engine.decode_steps >= 5)
  client.close()
  steps_when_left = engine.decode_steps
  assert wait_for(lambda: orchestrator.active == 0), "the slot stayed taken after the client left"
  assert engine.decode_steps - steps_when_left <= 2
  time.sleep(0.1)
  assert engine.decode_steps - steps_when_left <= 2  # nothing decodes for nobody


def stream_in_thread(url: str, max_tokens: int):
  """Streams one completion in a thread; returns (thread, its SSE data lines, "got 3 tokens")."""
  lines, started = [], threading.Event()

  def read():
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json=completion(max_tokens=max_tokens, stream=True)) as response:
      for line in response.iter_lines():
        if line.startswith("data: "):
          lines.append(line[6:])
          if len(lines) == 3:
            started.set()
  thread = threading.Thread(target=read)
  thread.start()
  return thread, lines, started


def test_shutdown_lets_streams_in_flight_finish():
  server, thread, _, url = start_server(FakeEngine(seconds_per_token=0.02), grace_s=30)
  reader, lines, started = stream_in_thread(url, max_tokens=40)
  assert started.wait(10)
  server.handle_exit(15, None)  # what uvicorn runs on SIGTERM
  reader.join(timeout=20)
  thread.join(timeout=20)
  assert not thread.is_alive(), "the server did not stop"
  assert lines[-1] == "[DONE]"
  chunks = [json.loads(line) for line in lines[:-1]]
  assert "".join(c["choices"][0]["text"] for c in chunks) == ("abcdefghijklmnopqrstuvwxyz" * 2)[:40]
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"
  assert len(chunks) == 40  # a stream that keeps up with the engine gets a chunk per token


def test_shutdown_past_its_grace_period_ends_streams_with_an_error_event():
  server, thread, _, url = start_server(FakeEngine(seconds_per_token=0.02), grace_s=0.2)
  reader, lines, started = stream_in_thread(url, max_tokens=1000)
  assert started.wait(10)
  server.handle_exit(15, None)
  reader.join(timeout=20)
  thread.join(timeout=20)
  assert not thread.is_alive(), "the server did not stop"
  assert lines[-1] == "[DONE]"
  error = json.loads(lines[-2])["error"]
  assert error["code"] == "service_unavailable" and "shut down" in error["message"]
  assert 3 <= len(lines) - 2 < 100


def test_a_client_leaving_cancels_its_gathered_prompts_without_an_error_log(caplog):
  """A multi-prompt completion waits on a gather of its prompts; the client leaving cancels
  it, and asyncio must not log the cancelled gather as an exception never retrieved."""
  class LeftAlready:
    async def receive(self):
      return {"type": "http.disconnect"}

  async def leave():
    prompts = asyncio.gather(asyncio.sleep(3600), asyncio.sleep(3600))
    received = await unless_disconnected(prompts, LeftAlready())
    await asyncio.sleep(0.01)  # the cancellations land
    return received, prompts.done()

  with caplog.at_level(logging.ERROR, logger="asyncio"):
    assert asyncio.run(leave()) == (None, True)
    gc.collect()
  assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]
