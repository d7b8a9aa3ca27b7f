"""serving.orchestrator over scripted fake engines: a request that fails while it is admitted or
while its tokens become text fails alone and the loop goes on; a failing decode step still ends
the loop; and a completion's text continues its prompt's, whole and streamed, chat included.
"""

import json
import queue
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_detokenize import train_tokenizer

from maxlm.sampling import TokenChoice
from serving.chat import chat_prompt
from serving.engine import SamplingSettings, device_settings
from serving.orchestrator import (Orchestrator, QueueFull, Request, RequestFailed,
                                  Unavailable)
from serving.server import create_app

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def step(tokens: list[int]) -> TokenChoice:
  rows = len(tokens)
  return TokenChoice(np.array(tokens, np.int32), np.zeros(rows, np.float32),
                     np.zeros((rows, 0), np.int32), np.zeros((rows, 0), np.float32))


class FakeEngine:
  """Continues a prompt with the letters after its last id's (`a` after id 0), one per decode
  step. Its prefill turns the settings into the device's types as the real engine does, and
  `decode` refuses the id `poison`."""
  model_name, context_length, eos_id, quantize = "fake", 1000, -1, "none"
  stop_ids = frozenset()

  def __init__(self, slots: int = 2, seconds_per_token: float = 0.0, poison: int = -1,
               fail_generate: bool = False):
    self.slots, self.seconds_per_token = slots, seconds_per_token
    self.poison, self.fail_generate = poison, fail_generate

  def prompt_ids(self, prompt: str, max_tokens: int | None):
    return [0] + [LETTERS.index(c) for c in prompt if c in LETTERS], max_tokens or 16

  def init_decode_state(self):
    return [None] * self.slots

  def prefill(self, prompt_ids, settings):
    device_settings(settings)
    return prompt_ids[-1] + 1, step([prompt_ids[-1] + 1])

  def insert(self, prefix, state, slot):
    state[slot] = prefix
    return state

  def fits(self, tokens):  # a pool that never runs out
    return True

  def release(self, slot):
    pass

  def generate(self, state):
    if self.fail_generate:
      raise RuntimeError("device lost")
    time.sleep(self.seconds_per_token)
    tokens = [0 if s is None else s + 1 for s in state]
    return [None if s is None else s + 1 for s in state], step(tokens)

  def decode(self, token_ids):
    if self.poison in token_ids:
      raise ValueError(f"cannot decode {self.poison}")
    return "".join(LETTERS[t % 26] for t in token_ids)

  def token_bytes(self, token_id):
    return self.decode([token_id]).encode()


def text_of(deltas) -> str:
  return "".join(delta.text for delta in deltas)


@pytest.fixture
def running():
  orchestrators = []

  def start(engine: FakeEngine) -> Orchestrator:
    orchestrators.append(Orchestrator(engine).start())
    return orchestrators[-1]

  yield start
  for orchestrator in orchestrators:
    orchestrator.shutdown(grace_s=5)


def submit(orchestrator: Orchestrator, prompt_ids: list[int], max_tokens: int) -> queue.Queue:
  deltas = queue.Queue()
  orchestrator.submit(Request(prompt_ids, max_tokens=max_tokens, emit=deltas.put))
  return deltas


def all_deltas(deltas: queue.Queue) -> list:
  received = []
  while (item := deltas.get(timeout=10)) is not None:
    assert not isinstance(item, BaseException), item
    received.append(item)
  return received


# --- the waiting line --------------------------------------------------------------------------

def test_requests_whose_clients_left_free_their_places_in_the_line():
  orchestrator = Orchestrator(FakeEngine(slots=1, seconds_per_token=0.005), max_queue=2).start()
  try:
    busy = submit(orchestrator, [0], max_tokens=200)
    busy.get(timeout=10)  # its first token: it holds the only slot
    left = [Request([0], max_tokens=2, emit=queue.Queue().put) for _ in range(2)]
    orchestrator.submit_all(left)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
      submit(orchestrator, [0], max_tokens=2)
    for request in left:
      request.cancel()
    arriving = submit(orchestrator, [3], max_tokens=2)  # was a 429 while the slot was busy
    assert orchestrator.metrics.queue_depth._value.get() == 1
    assert text_of(all_deltas(arriving)) == "ef"
    assert len(all_deltas(busy)) == 199
  finally:
    orchestrator.shutdown(grace_s=5)


def test_a_batch_is_queued_whole_or_not_at_all():
  orchestrator = Orchestrator(FakeEngine(slots=1, seconds_per_token=0.005), max_queue=3).start()
  try:
    busy = submit(orchestrator, [0], max_tokens=100)
    busy.get(timeout=10)
    orchestrator.submit_all([Request([0], max_tokens=1, emit=queue.Queue().put)])
    with pytest.raises(QueueFull, match="1 requests are already waiting for a slot and this "
                       "one brings 3"):
      orchestrator.submit_all([Request([0], max_tokens=1, emit=queue.Queue().put)
                               for _ in range(3)])
    assert orchestrator.metrics.queue_depth._value.get() == 1  # none of the three went in
    all_deltas(busy)
  finally:
    orchestrator.shutdown(grace_s=5)


# --- one request's failure ---------------------------------------------------------------------

def test_a_prefill_that_fails_fails_its_request_alone(running):
  orchestrator = running(FakeEngine(seconds_per_token=0.005))
  neighbour = submit(orchestrator, [0], max_tokens=40)
  with pytest.raises(RequestFailed, match="admitting it: OverflowError"):
    orchestrator.generate([0], max_tokens=4, settings=SamplingSettings(top_k=2**31))
  assert orchestrator.alive
  assert text_of(orchestrator.generate([0], max_tokens=3)) == "bcd"
  received = all_deltas(neighbour)
  assert text_of(received) == (LETTERS * 2)[1:41] and received[-1].finish_reason == "length"


def test_a_token_whose_text_fails_fails_its_request_alone(running):
  orchestrator = running(FakeEngine(seconds_per_token=0.005, poison=5))
  neighbour = submit(orchestrator, [10], max_tokens=20)  # its ids are 11 to 30
  with pytest.raises(RequestFailed, match="turning its token into text: ValueError"):
    orchestrator.generate([2], max_tokens=6)  # its ids are 3, 4, then the poisoned 5
  assert orchestrator.alive and orchestrator.active <= 1
  assert text_of(all_deltas(neighbour)) == (LETTERS * 2)[11:31]
  assert text_of(orchestrator.generate([9], max_tokens=2)) == "kl"


def test_a_failing_decode_step_still_ends_the_loop(running):
  orchestrator = running(FakeEngine(fail_generate=True))
  with pytest.raises(Unavailable, match="device lost"):
    orchestrator.generate([0], max_tokens=3)
  assert not orchestrator.alive


class RefusingEngine(FakeEngine):
  """Its prefill fails for top_k=7, a setting the request shapes let through."""

  def prefill(self, prompt_ids, settings):
    if settings.top_k == 7:
      raise ValueError("top_k=7 is not compiled")
    return super().prefill(prompt_ids, settings)


def completion(**change) -> dict:
  return {"model": "fake", "prompt": "x", "max_tokens": 3, **change}


def sse_events(body: str) -> list:
  return [json.loads(event[len("data: "):]) if event != "data: [DONE]" else "[DONE]"
          for event in body.split("\n\n") if event]


def test_over_http_a_failed_request_gets_a_500_and_the_server_goes_on():
  client = TestClient(create_app(RefusingEngine()))
  response = client.post("/v1/completions", json=completion(top_k=7))
  assert response.status_code == 500, response.text
  assert response.json()["error"]["type"] == "server_error"
  assert "top_k=7 is not compiled" in response.json()["error"]["message"]
  events = sse_events(client.post("/v1/completions", json=completion(top_k=7, stream=True)).text)
  assert events[0]["error"]["type"] == "server_error" and events[1:] == ["[DONE]"]
  assert client.post("/v1/completions", json=completion()).json()["choices"][0]["text"] == "yza"
  assert client.get("/health").status_code == 200


# --- the completion continues the prompt --------------------------------------------------------

class TokenizerEngine(FakeEngine):
  """A real SentencePiece tokenizer; every prompt is continued with the ids of `script`."""

  def __init__(self, tokenizer, script: list[int]):
    super().__init__(slots=2)
    self.tokenizer, self.script, self.eos_id = tokenizer, script, tokenizer.eos_id()
    self.stop_ids = frozenset({tokenizer.eos_id()})

  def prompt_ids(self, prompt: str, max_tokens: int | None):
    return [self.tokenizer.bos_id()] + self.tokenizer.encode(prompt), max_tokens

  def prefill(self, prompt_ids, settings):
    return 0, step([self.script[0]])

  def generate(self, state):
    tokens = [0 if s is None else self.script[(s + 1) % len(self.script)] for s in state]
    return [None if s is None else s + 1 for s in state], step(tokens)

  def decode(self, token_ids):
    return self.tokenizer.decode([t for t in token_ids if t != self.eos_id])


@pytest.mark.parametrize("chat", [False, True])
def test_the_completion_text_continues_the_prompt_text_whole_and_streamed(tmp_path, chat):
  """Issue 17: " Paris", not "Paris", after "The capital of France is"."""
  tokenizer = train_tokenizer(tmp_path)
  script = tokenizer.encode(" Paris, café 5€ 😀 naïve text")
  engine = TokenizerEngine(tokenizer, script)
  client = TestClient(create_app(engine))
  question = "The capital of France is"
  if chat:
    path, prompt = "/v1/chat/completions", chat_prompt([("user", question)])
    request = {"model": "fake", "messages": [{"role": "user", "content": question}]}
  else:
    path, prompt, request = "/v1/completions", question, {"model": "fake", "prompt": question}
  request["max_tokens"] = len(script)
  prompt_ids, _ = engine.prompt_ids(prompt, None)
  expected = engine.decode(prompt_ids + script)[len(engine.decode(prompt_ids)):]
  assert expected.startswith(" Paris")

  whole = client.post(path, json=request).json()["choices"][0]
  assert (whole["message"]["content"] if chat else whole["text"]) == expected
  events = sse_events(client.post(path, json={**request, "stream": True}).text)
  pieces = [(event["choices"][0]["delta"].get("content") if chat
             else event["choices"][0]["text"]) for event in events[:-1]]
  assert "".join(piece or "" for piece in pieces) == expected
