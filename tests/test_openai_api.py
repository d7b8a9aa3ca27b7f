"""serving.openai_api's request shapes at the HTTP boundary: every number out of its range, too
many or too long stop strings, and text that is no Unicode get a 400 naming the field, before
the engine sees them; the largest values in range reach the engine's own types intact.

Over a fake engine whose prefill converts the settings as the real one does.
"""

import json

import pytest
from fastapi.testclient import TestClient
from test_orchestrator import FakeEngine

from serving.openai_api import MAX_STOP_CHARS, MAX_STOPS
from serving.server import create_app

INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


@pytest.fixture(scope="module")
def client():
  with TestClient(create_app(FakeEngine())) as client:
    yield client


def completion(**change) -> dict:
  return {"model": "fake", "prompt": "x", "max_tokens": 3, **change}


def chat(**change) -> dict:
  return {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
          **change}


def assert_refused(response, param: str):
  assert response.status_code == 400, response.text
  error = response.json()["error"]
  assert error["param"] == param and error["type"] == "invalid_request_error", error
  assert error["message"].startswith(param)


def test_the_issues_top_k_is_a_400_and_the_server_goes_on(client):
  response = client.post("/v1/completions",
                         json={"model": "fake", "prompt": "x", "max_tokens": 4,
                               "top_k": 2147483648})
  assert_refused(response, "top_k")
  assert client.post("/v1/completions", json=completion()).json()["choices"][0]["text"] == "yza"
  assert client.get("/health").status_code == 200


@pytest.mark.parametrize("field, value", [
    ("top_k", INT32_MAX + 1), ("top_k", -2), ("seed", INT64_MAX + 1), ("seed", -INT64_MAX - 2),
    ("seed", 2**200), ("max_tokens", 0), ("max_tokens", INT32_MAX + 1), ("logprobs", -1),
    ("logprobs", 6), ("n", 0), ("n", 2**64), ("temperature", -0.5), ("temperature", 2.5),
    ("top_p", 0), ("top_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0), ("top_k", 1.5)])
def test_a_number_out_of_its_range_is_a_400_naming_it(client, field, value):
  assert_refused(client.post("/v1/completions", json=completion(**{field: value})), field)


@pytest.mark.parametrize("field, value", [
    ("top_logprobs", 21), ("top_logprobs", -1), ("max_completion_tokens", INT32_MAX + 1),
    ("max_tokens", INT32_MAX + 1), ("seed", INT64_MAX + 1), ("n", 129)])
def test_a_chat_number_out_of_its_range_is_a_400_naming_it(client, field, value):
  request = chat(**{field: value}, logprobs=True)
  assert_refused(client.post("/v1/chat/completions", json=request), field)


@pytest.mark.parametrize("field, literal", [
    ("temperature", "NaN"), ("top_p", "NaN"), ("temperature", "Infinity"),
    ("presence_penalty", "-Infinity"), ("top_k", "1e400")])
def test_a_number_that_is_not_finite_is_a_400(client, field, literal):
  body = json.dumps(completion())[:-1] + f', "{field}": {literal}}}'
  response = client.post("/v1/completions", content=body.encode(),
                         headers={"Content-Type": "application/json"})
  assert_refused(response, field)


@pytest.mark.parametrize("change", [
    {"top_k": INT32_MAX}, {"seed": INT64_MAX}, {"seed": -INT64_MAX - 1}, {"temperature": 2},
    {"top_p": 1e-9}, {"top_k": -1}, {"presence_penalty": 0}, {"repetition_penalty": 1}])
def test_the_extremes_in_range_are_served(client, change):
  response = client.post("/v1/completions", json=completion(**change))
  assert response.status_code == 200, response.text


@pytest.mark.parametrize("change", [{"presence_penalty": 1}, {"frequency_penalty": -0.5},
                                    {"repetition_penalty": 1.2}])
def test_a_penalty_in_range_is_refused_until_supported(client, change):
  [(field, _)] = change.items()
  response = client.post("/v1/completions", json=completion(**change))
  assert response.status_code == 400 and response.json()["error"]["param"] == field
  assert "not supported" in response.json()["error"]["message"]


# --- stop strings ------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", [
    ["a", "b", "c", "d", "e"], ["z" * (MAX_STOP_CHARS + 1)], "z" * (MAX_STOP_CHARS + 1),
    ["q" * 1000] * 4_000])
def test_too_many_or_too_long_stop_strings_are_a_400(client, stop):
  """The last: the issue's list of stop strings, at 4 MB, under the 8 MiB body cap that
  answers its 10 MB with a 413."""
  for path, request in (("/v1/completions", completion(stop=stop)),
                        ("/v1/chat/completions", chat(stop=stop))):
    assert_refused(client.post(path, json=request), "stop")


def test_as_many_and_as_long_stop_strings_as_allowed_are_served(client):
  stops = ["q" * MAX_STOP_CHARS] * (MAX_STOPS - 1) + ["a"]
  body = client.post("/v1/completions", json=completion(stop=stops, max_tokens=5)).json()
  assert body["choices"][0]["text"] == "yz" and body["choices"][0]["finish_reason"] == "stop"


# --- text that is no Unicode -------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "fake", "prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "fake", "prompt": ["x\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x", "max_tokens": 2}', "model"),
    ("/v1/completions", '{"model": "fake", "prompt": "x", "stop": "\\ud800"}', "stop"),
    ("/v1/completions", '{"model": "fake", "prompt": "x", "stop": ["a", "\\ud800"]}', "stop"),
    ("/v1/chat/completions",
     '{"model": "fake", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/chat/completions", ('{"model": "fake", "messages": [{"role": "user", "content": '
                              '[{"type": "text", "text": "a\\ud800b"}]}]}'), "messages"),
    ("/v1/chat/completions", ('{"model": "\\udbff", "messages": [{"role": "user", "content": '
                              '"x"}]}'), "model")])
def test_a_lone_surrogate_is_a_400_naming_the_field(client, path, body, param):
  response = client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
  assert_refused(response, param)
  assert "surrogate" in response.json()["error"]["message"]
  assert client.get("/health").status_code == 200


def test_a_surrogate_pair_is_a_character_and_is_served(client):
  body = '{"model": "fake", "prompt": "\\ud83d\\ude00", "max_tokens": 2}'
  response = client.post("/v1/completions", content=body.encode(),
                         headers={"Content-Type": "application/json"})
  assert response.status_code == 200, response.text
