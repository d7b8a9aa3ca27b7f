"""benchmarks/chat_exact_match.py's scoring, against a stand-in OpenAI server that answers a
known subset of the questions right."""

import json

import httpx
import openai

from benchmarks import chat_exact_match

PAIRS = [([{"role": "user", "content": f"What is the name of the function defined here?\n"
                                       f"def f{i}(x):"}], f"f{i}") for i in range(10)]
PAIRS.append(([{"role": "system", "content": "Answer with the exact text from the code."},
               {"role": "user", "content": "What is the name of the function defined here?\n"
                                           "def g(a, b):"},
               {"role": "assistant", "content": "g"},
               {"role": "user", "content": "What are its parameters?"}], "a, b"))


def stand_in_server(requests: list[dict]) -> httpx.MockTransport:
  """Answers the function name for even i and the two-turn row (padded with spaces, which
  exact match ignores), something else otherwise."""
  def handle(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
      return httpx.Response(200, json={"object": "list", "data": [
          {"id": "sft_tiny", "object": "model", "created": 0, "owned_by": "maxlm"}]})
    body = json.loads(request.content)
    requests.append(body)
    last = body["messages"][-1]["content"]
    name = last.split("def ")[-1].split("(")[0] if "def " in last else None
    reply = (" a, b\n" if name is None else name if int(name[1:]) % 2 == 0 else name + "x")
    return httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": reply}}]})
  return httpx.MockTransport(handle)


def test_exact_match_asks_every_question_greedily_and_counts_the_exact_replies():
  requests = []
  client = openai.OpenAI(base_url="http://server/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(transport=stand_in_server(requests)))
  score, replies = chat_exact_match.exact_match(client, PAIRS, concurrency=3)
  assert score == 6 / 11  # f0, f2, f4, f6, f8 and the two-turn row
  assert replies[1] == "f1x" and replies[-1] == " a, b\n"
  assert sorted(json.dumps(r["messages"]) for r in requests) == sorted(
      json.dumps(messages) for messages, _ in PAIRS)
  assert all(r["temperature"] == 0.0 and r["model"] == "sft_tiny" for r in requests)


def test_a_reply_matches_only_when_equal_but_for_surrounding_whitespace():
  assert chat_exact_match.is_exact_match(" f(x, y)\n", "f(x, y)")
  assert not chat_exact_match.is_exact_match("f(x,y)", "f(x, y)")
  assert not chat_exact_match.is_exact_match("f", "f(x, y)")
  assert not chat_exact_match.is_exact_match(None, "f")


def test_exact_match_is_reported_per_question_asked_last():
  replies = [f"f{i}" if i < 3 else "no" for i in range(10)] + ["a, b"]
  by_question = chat_exact_match.exact_match_by_question(PAIRS, replies)
  assert by_question == {"What is the name of the function defined here?": (10, 0.3),
                         "What are its parameters?": (1, 1.0)}
