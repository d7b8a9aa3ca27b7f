"""serving.openai_api's request shapes at the HTTP boundary: every number out of its range, too
many or too long stop strings, and text that is no Unicode get a 400 naming the field, before
the engine sees them; the largest values in range reach the engine's own types intact.

Over a fake engine whose prefill converts the settings as the real one does.
"""

import hashlib
import json
import shutil

import numpy as np
import openai
import pytest
import sentencepiece as spm
from fastapi.testclient import TestClient
from test_orchestrator import FakeEngine

from maxlm import checkpoint
from maxlm.model import ModelConfig
from serving.engine import Engine
from serving.openai_api import MAX_STOP_CHARS, MAX_STOPS, ChatCompletionRequest, Logprobs
from serving.orchestrator import Delta, PromptLogprobs
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


NULLED = ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
          "top_k", "repetition_penalty", "ignore_eos", "seed", "stop", "stream_options")


def test_null_for_an_optional_field_is_its_default_as_the_openai_client_sends_it(client):
  """The official client sends null for each None it is given (`temperature=None`)."""
  nulls = dict.fromkeys(NULLED)
  completed = client.post("/v1/completions", json=completion(**nulls, echo=None, logprobs=None))
  chatted = client.post("/v1/chat/completions", json=chat(**nulls, logprobs=None,
                                                          top_logprobs=None))
  assert completed.status_code == 200, completed.text
  assert chatted.status_code == 200, chatted.text
  assert completed.json()["choices"][0]["logprobs"] is None


def test_stream_options_take_a_bool_not_a_string_like_every_other_field(client):
  response = client.post("/v1/completions", json=completion(
      stream=True, stream_options={"include_usage": "yes"}))
  assert response.status_code == 400, response.text


def test_a_long_unknown_model_name_is_a_404_that_does_not_echo_it_whole(client):
  response = client.post("/v1/completions", json=completion(model="m" * 100_000))
  assert response.status_code == 404
  assert len(response.json()["error"]["message"]) < 300


def openai_client(client) -> openai.OpenAI:
  return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client,
                       max_retries=0)


def test_the_openai_client_retrieves_the_served_model_and_gets_a_404_for_another(client):
  served = openai_client(client).models.retrieve("fake")
  assert served.id == "fake" and served.object == "model"
  assert served == openai_client(client).models.list().data[0]
  with pytest.raises(openai.NotFoundError) as refused:
    openai_client(client).models.retrieve("org/other-model")
  assert refused.value.code == "model_not_found" and "`fake`" in refused.value.message


@pytest.mark.parametrize("prompt, why", [
    ([1.5], "list[int] (at 0: Input should be a valid integer)"),
    ([[1], "a"], "list[list[int]] (at 1: Input should be a valid list)")])
def test_a_prompt_of_no_accepted_form_is_a_400_saying_why_each_form_failed(client, prompt, why):
  """The first form's error alone ("prompt.str: should be a valid string") hid that [1.5]
  is a list of token ids with a float in it."""
  response = client.post("/v1/completions", json=completion(prompt=prompt))
  assert_refused(response, "prompt")
  message = response.json()["error"]["message"]
  assert message.startswith("prompt: matches none of its forms: str (") and why in message


def test_a_content_part_of_an_unknown_type_is_a_400_naming_the_part_forms(client):
  response = client.post("/v1/chat/completions", json=chat(messages=[
      {"role": "user", "content": [{"type": "video", "url": "x"}]}]))
  assert_refused(response, "messages")
  message = response.json()["error"]["message"]
  assert message.startswith("messages.0.content: matches none of its forms")
  assert "list[content part] (at 0: Input tag 'video' found using 'type'" in message


@pytest.mark.parametrize("part, where", [
    ({"type": "image_url", "image_url": {"url": 5}},
     "at 0.image_url.image_url.url: Input should be a valid string"),
    ({"type": "image_url"}, "at 0.image_url.image_url: Field required"),
    ({"type": "text"}, "at 0.text.text: Field required")])
def test_a_bad_part_of_a_known_type_is_a_400_naming_its_own_field(client, part, where):
  response = client.post("/v1/chat/completions", json=chat(messages=[
      {"role": "user", "content": [part]}]))
  assert_refused(response, "messages")
  assert where in response.json()["error"]["message"]


def test_null_for_a_required_field_is_still_a_400_naming_it(client):
  assert_refused(client.post("/v1/completions", json=completion(prompt=None)), "prompt")


@pytest.mark.parametrize("route, change", [
    ("/v1/chat/completions", {"response_format": {"type": "text"}}),
    ("/v1/completions", {"suffix": ""}), ("/v1/completions", {"response_format": None})])
def test_openai_s_no_op_values_of_unsupported_fields_are_served(client, route, change):
  """`response_format` {"type": "text"} is OpenAI's default, and an empty suffix adds
  nothing; a client may send either. Other values are still refused (next test)."""
  body = chat(**change) if route.endswith("chat/completions") else completion(**change)
  response = client.post(route, json=body)
  assert response.status_code == 200, response.text


@pytest.mark.parametrize("route, change", [
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/completions", {"suffix": " and so on"})])
def test_other_values_of_unsupported_fields_are_refused_naming_them(client, route, change):
  [(field, _)] = change.items()
  body = chat(**change) if route.endswith("chat/completions") else completion(**change)
  response = client.post(route, json=body)
  assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_a_refused_value_is_quoted_in_at_most_a_hundred_characters(client):
  response = client.post("/v1/completions", json=completion(tools=["x" * 100] * 1000))
  message = response.json()["error"]["message"]
  assert response.status_code == 400 and message.startswith("tools=['xxx")
  assert len(message) < 200 and message.endswith("... is not supported yet; leave it unset")


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


# --- lm-evaluation-harness's contract, over a tiny random model --------------------------------
# echo + logprobs against a forward pass without a cache; token-id prompts; the tokenizer routes.

@pytest.fixture(scope="module")
def model_client(tmp_path_factory):
  from test_serving import CONTEXT, save_random_checkpoint, train_tokenizer
  tokenizer_file = train_tokenizer(tmp_path_factory.mktemp("tokenizer"))
  vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()
  config = ModelConfig(vocab_size=vocab_size, num_layers=2, embed_dim=64, num_heads=4,
                       num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=CONTEXT)
  workdir = tmp_path_factory.mktemp("tiny_run")
  save_random_checkpoint(workdir, config, hashlib.sha256(tokenizer_file.read_bytes()).hexdigest())
  shutil.copy(tokenizer_file, workdir / checkpoint.TOKENIZER)
  engine = Engine.from_checkpoint(workdir, slots=2)
  with TestClient(create_app(engine, model_name="tiny")) as client:
    yield client, engine


def numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def echo(client, prompt, **change) -> dict:
  response = client.post("/v1/completions", json={
      "model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1,
      "echo": True, **change})
  assert response.status_code == 200, response.text
  return response.json()


def test_echo_returns_each_prompt_tokens_logprob_from_a_forward_without_cache(model_client):
  client, engine = model_client
  prompt_ids = engine.encode("def wrap(text, width=70):")
  logprobs = echo(client, prompt_ids, logprobs=3)["choices"][0]["logprobs"]
  reference = numpy_log_softmax(engine.logits_without_cache(prompt_ids))
  expected = [reference[t - 1, prompt_ids[t]] for t in range(1, len(prompt_ids))]
  assert len(logprobs["token_logprobs"]) == len(prompt_ids) + 1  # the generated token last
  assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
  # float32 rounding of two attention paths, on a random model whose logits reach +-50
  np.testing.assert_allclose(logprobs["token_logprobs"][1:len(prompt_ids)], expected, atol=3e-4)
  token_text = Logprobs(chat=False, token_bytes=engine.token_bytes).token
  for t in range(1, len(prompt_ids)):
    top = logprobs["top_logprobs"][t]
    argmax = token_text(int(np.argmax(reference[t - 1])))
    assert top[argmax] == max(top.values())
    np.testing.assert_allclose(top[argmax], reference[t - 1].max(), atol=3e-4)


def test_a_greedy_prompt_tokens_logprob_equals_its_top_logprob_exactly(model_client):
  """lm-eval's is_greedy compares them with `!=`."""
  client, engine = model_client
  prompt_ids = engine.encode("def")
  for _ in range(6):  # extend the prompt greedily: every later token is the argmax
    prompt_ids.append(int(np.argmax(engine.logits_without_cache(prompt_ids)[-1])))
  logprobs = echo(client, prompt_ids)["choices"][0]["logprobs"]
  for t in range(len(prompt_ids) - 6, len(prompt_ids)):
    assert logprobs["token_logprobs"][t] == max(logprobs["top_logprobs"][t].values())


def test_max_tokens_0_with_echo_scores_the_prompt_and_generates_nothing(model_client):
  client, engine = model_client
  prompt_ids = engine.encode("import textwrap")
  choice = echo(client, prompt_ids, max_tokens=0)["choices"][0]
  one = echo(client, prompt_ids)["choices"][0]
  assert choice["logprobs"]["token_logprobs"] == one["logprobs"]["token_logprobs"][:-1]
  assert choice["finish_reason"] == "length"
  assert choice["text"] == engine.decode(prompt_ids)


def test_a_batch_of_token_id_prompts_gets_one_choice_each_in_order(model_client):
  client, engine = model_client
  prompts = [engine.encode(text) for text in ("def wrap(", "width = 70", "x")]
  choices = echo(client, prompts)["choices"]
  assert [c["index"] for c in choices] == [0, 1, 2]
  for prompt_ids, choice in zip(prompts, choices):
    alone = echo(client, prompt_ids)["choices"][0]
    # A shared prefix is computed once for the batch, so float32 sums run in another order:
    # the same numbers within 1e-5, or a relative 1e-6 (this random model's reach -15).
    assert choice["logprobs"]["token_logprobs"][0] is alone["logprobs"]["token_logprobs"][0]
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        alone["logprobs"]["token_logprobs"][1:], rel=1e-6, abs=1e-5)
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids) + 1


def test_a_text_prompt_and_its_token_ids_score_the_same(model_client):
  client, engine = model_client
  text = "return text"
  by_text = echo(client, text)["choices"][0]
  by_ids = echo(client, engine.encode(text))["choices"][0]
  assert by_text["logprobs"]["token_logprobs"] == by_ids["logprobs"]["token_logprobs"]
  assert by_text["text"].startswith(text)


@pytest.mark.parametrize("prompt, fragment", [
    ([], "empty"), ([[]], "empty"), ([5, 10**6], "not in [0"), ([-1], "not in [0"),
    ([[1, 2], "x"], "prompt")])
def test_a_token_id_prompt_the_model_cannot_take_is_a_400(model_client, prompt, fragment):
  client, _ = model_client
  response = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                  "max_tokens": 1})
  assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
  assert fragment in response.json()["error"]["message"]


def test_a_scoring_batch_with_one_id_the_model_cannot_take_is_a_400_naming_it(model_client):
  """lm-eval's batch is checked whole before any prompt is queued: [[1, 2], [5, 10**6]]."""
  client, _ = model_client
  response = client.post("/v1/completions", json={
      "model": "tiny", "prompt": [[1, 2], [5, 10**6]], "max_tokens": 1, "logprobs": 1,
      "echo": True})
  assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
  assert "token id 1000000" in response.json()["error"]["message"]
  assert len(echo(client, [[1, 2], [5, 6]])["choices"]) == 2


def test_max_tokens_0_without_echo_and_echo_in_chat_are_400s(model_client):
  client, _ = model_client
  no_echo = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
  assert no_echo.status_code == 400 and "echo" in no_echo.json()["error"]["message"]
  chat_echo = client.post("/v1/chat/completions", json={
      "model": "tiny", "messages": [{"role": "user", "content": "x"}], "echo": True})
  assert chat_echo.status_code == 400 and chat_echo.json()["error"]["param"] == "echo"


def test_the_eos_string_tokenizes_to_the_eos_id_and_tokens_round_trip(model_client):
  client, engine = model_client
  info = client.get("/tokenizer_info").json()
  assert info["model_max_length"] == engine.context_length
  tokenizer = engine.tokenizer
  for name, token_id in (("eos_token", tokenizer.eos_id()), ("bos_token", tokenizer.bos_id())):
    tokens = client.post("/tokenize", json={"prompt": info[name],
                                            "add_special_tokens": False}).json()["tokens"]
    assert tokens == [token_id], name
  text = "def wrap(text):"
  body = client.post("/tokenize", json={"prompt": text + info["eos_token"]}).json()
  assert body["tokens"] == [tokenizer.bos_id()] + tokenizer.encode(text) + [tokenizer.eos_id()]
  assert body["count"] == len(body["tokens"])
  assert client.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"] == text


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"), ("/detokenize", {"tokens": "ab"}, "tokens")])
def test_a_malformed_tokenizer_request_is_a_400_naming_the_field(model_client, path, body, param):
  client, _ = model_client
  response = client.post(path, json=body)
  assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_echoed_text_offsets_point_into_the_echoed_text_when_pieces_fall_back_to_bytes(
    model_client):
  """Through the server, with the trained tokenizer (which spells é, ö and the emoji in
  byte pieces): every offset lies in the text, none goes back, and each whole piece's text
  is found at its offset, but for the first piece's dummy-prefix space, which the text does
  not have (fuzzing had offsets past the end, counting `bytes:` labels and that space)."""
  client, _ = model_client
  response = client.post("/v1/completions", json={
      "model": "tiny", "prompt": "h\u00e9llo \U0001f600 w\u00f6rld", "echo": True,
      "logprobs": 1, "max_tokens": 0})
  assert response.status_code == 200, response.text
  [choice] = response.json()["choices"]
  text, tokens, offsets = (choice["text"], choice["logprobs"]["tokens"],
                           choice["logprobs"]["text_offset"])
  assert any(token.startswith("bytes:") for token in tokens)  # the case under test is here
  assert offsets == sorted(offsets) and all(0 <= offset <= len(text) for offset in offsets)
  for token, offset in zip(tokens, offsets):
    if not token.startswith("bytes:"):
      piece = token.lstrip(" ") if offset == 0 else token
      assert text[offset:offset + len(piece)] == piece, (token, offset, text)


def test_echoed_logprobs_name_each_token_and_its_text_offset_and_bytes_stay_apart():
  """Completions' echoed logprobs object, on a hand-made vocabulary: offsets count characters
  of the text from the start ("abc\u00e9"; the second byte of \u00e9 is at its character's
  offset, and the `bytes:` labels count for nothing), a piece that is not whole UTF-8 is
  `bytes:\\xNN`, alternatives are cut to the request's count, and the generated token's offset
  follows the prompt's."""
  pieces = {0: b"a", 1: "\u00e9".encode(), 2: b"\xc3", 3: b"\xa9", 4: b"bc"}
  shaping = Logprobs(chat=False, token_bytes=pieces.__getitem__)
  scored = PromptLogprobs([-1.0, -2.0, -0.5], np.array([[4, 0], [1, 2], [3, 4]]),
                          np.array([[-0.1, -3.0], [-0.2, -4.0], [-0.3, -5.0]]))
  echoed = shaping.of_prompt([0, 4, 2, 3], scored, alternatives=1)
  assert echoed == {"tokens": ["a", "bc", "bytes:\\xc3", "bytes:\\xa9"],
                    "token_logprobs": [None, -1.0, -2.0, -0.5],
                    "top_logprobs": [None, {"bc": -0.1}, {"\u00e9": -0.2}, {"bytes:\\xa9": -0.3}],
                    "text_offset": [0, 1, 3, 3]}
  generated = shaping.of([Delta("\u00e9", 1, None, -0.7, ((1, -0.7),))])
  assert generated["text_offset"] == [4] and generated["tokens"] == ["\u00e9"]
  wider = Logprobs(chat=False, token_bytes=pieces.__getitem__).of_prompt([0, 4, 2, 3], scored, 2)
  assert wider["top_logprobs"] == [None, {"bc": -0.1, "a": -3.0},
                                   {"\u00e9": -0.2, "bytes:\\xc3": -4.0},
                                   {"bytes:\\xa9": -0.3, "bc": -5.0}]
  none = Logprobs(chat=False, token_bytes=pieces.__getitem__).of_prompt([0, 4, 2, 3], scored, 0)
  assert none["top_logprobs"] == [None, {}, {}, {}]


# --- several prompts, and echo, streamed ------------------------------------------------------

def streamed_choices(client: openai.OpenAI, **request) -> tuple[dict[int, list], object]:
  """({index: that choice's chunks' choice objects, in order}, the usage chunk)."""
  *chunks, usage_chunk = client.completions.create(**request, stream=True,
                                                   stream_options={"include_usage": True})
  assert usage_chunk.choices == [] and all(len(chunk.choices) == 1 for chunk in chunks)
  by_index = {}
  for chunk in chunks:
    by_index.setdefault(chunk.choices[0].index, []).append(chunk.choices[0])
  return by_index, usage_chunk.usage


def joined_logprobs(parts: list) -> dict:
  """The chunks' logprobs objects, one after the other."""
  keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
  return {key: [v for part in parts if part.logprobs for v in getattr(part.logprobs, key)]
          for key in keys}


@pytest.mark.parametrize("as_ids", [False, True])
def test_several_prompts_stream_each_choice_as_its_prompt_alone_completes(model_client, as_ids):
  """vLLM streams a batch of prompts: choice prompt * n + i's chunks join to the prompt's own
  greedy completion; usage counts each prompt once and every choice's tokens."""
  http, engine = model_client
  client = openai_client(http)
  texts = ["def wrap(", "width = 70", "x"]
  prompts = [engine.encode(text) for text in texts] if as_ids else texts
  request = dict(model="tiny", max_tokens=5, temperature=0)
  alone = [client.completions.create(**request, prompt=prompt) for prompt in prompts]
  by_index, usage = streamed_choices(client, **request, prompt=prompts, n=2)
  assert sorted(by_index) == list(range(6))
  for index, parts in by_index.items():
    expected = alone[index // 2].choices[0]
    assert "".join(part.text for part in parts) == expected.text, index
    assert [part.finish_reason for part in parts][-1] == expected.finish_reason
    assert all(part.finish_reason is None for part in parts[:-1])
  assert usage.prompt_tokens == sum(response.usage.prompt_tokens for response in alone)
  assert usage.completion_tokens == 2 * sum(r.usage.completion_tokens for r in alone)
  assert usage == client.completions.create(**request, prompt=prompts, n=2).usage


@pytest.mark.parametrize("max_tokens", [0, 1, 4])  # 0 and 1: lm-eval's, scored by the Scorer
def test_echo_streams_the_prompt_and_its_logprobs_first_then_the_completion(model_client,
                                                                            max_tokens):
  """Each choice's first chunk starts with its prompt; joined, a choice's chunks (text and
  logprobs, offsets included) are the whole response's choice."""
  http, engine = model_client
  client = openai_client(http)
  prompts = [engine.encode(text) for text in ("def wrap(", "return text")]
  request = dict(model="tiny", prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True,
                 logprobs=2)
  whole = client.completions.create(**request)
  by_index, usage = streamed_choices(client, **request)
  assert sorted(by_index) == [0, 1] and usage == whole.usage
  for expected, (prompt_ids, parts) in zip(whole.choices, zip(prompts, by_index.values())):
    assert parts[0].text.startswith(engine.decode(prompt_ids))
    assert "".join(part.text for part in parts) == expected.text
    assert parts[-1].finish_reason == expected.finish_reason
    streamed = joined_logprobs(parts)
    assert len(streamed["tokens"]) == len(prompt_ids) + max_tokens
    assert streamed["tokens"] == expected.logprobs.tokens
    assert streamed["text_offset"] == expected.logprobs.text_offset
    assert streamed["token_logprobs"][0] is None  # nothing predicts the first token
    assert streamed["token_logprobs"][1:] == pytest.approx(
        expected.logprobs.token_logprobs[1:], rel=1e-6, abs=1e-5)


def test_echo_without_logprobs_streams_the_prompt_text_then_the_completion(model_client):
  http, _ = model_client
  client = openai_client(http)
  request = dict(model="tiny", prompt="def wrap(", max_tokens=4, temperature=0)
  completion = client.completions.create(**request).choices[0].text
  by_index, _ = streamed_choices(client, **request, echo=True)
  assert "".join(part.text for part in by_index[0]) == "def wrap(" + completion
  assert by_index[0][0].text.startswith("def wrap(")
  assert all(part.logprobs is None for part in by_index[0])


# --- n choices of a prompt ---------------------------------------------------------------------

def test_n_choices_are_the_samples_of_seed_plus_index_and_count_the_prompt_once(model_client):
  """Each of n choices equals a request of its own with seed + its index (vLLM's children's
  seeds), whole and streamed; usage counts the prompt once and every choice's tokens."""
  http, engine = model_client
  client = openai_client(http)
  request = dict(model="tiny", prompt="def f(x):", max_tokens=6, temperature=1.0,
                 extra_body={"ignore_eos": True})
  alone = [client.completions.create(**request, seed=5 + index).choices[0].text
           for index in range(3)]
  assert len(set(alone)) > 1  # else this test could not tell the choices apart
  whole = client.completions.create(**request, seed=5, n=3)
  assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [
      (index, text, "length") for index, text in enumerate(alone)]
  prompt_tokens = len(engine.prompt_ids("def f(x):", 6)[0])
  assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 18)

  chunks = list(client.completions.create(**request, seed=5, n=3, stream=True,
                                          stream_options={"include_usage": True}))
  *text_chunks, usage_chunk = chunks
  streamed = ["".join(c.choices[0].text for c in text_chunks if c.choices[0].index == index)
              for index in range(3)]
  assert streamed == alone and usage_chunk.choices == [] and usage_chunk.usage == whole.usage
  last = {c.choices[0].index: c.choices[0].finish_reason for c in text_chunks}
  assert last == {0: "length", 1: "length", 2: "length"}

  chat = dict(model="tiny", messages=[{"role": "user", "content": "def f(x):"}], max_tokens=4,
              temperature=1.0, seed=9, extra_body={"ignore_eos": True})
  replies = [client.chat.completions.create(**{**chat, "seed": 9 + index}).choices[0]
             for index in range(2)]
  both = client.chat.completions.create(**chat, n=2, logprobs=True)
  assert [c.message.content for c in both.choices] == [r.message.content for r in replies]
  assert [len(c.logprobs.content) for c in both.choices] == [4, 4]
  chunks = list(client.chat.completions.create(**chat, n=2, stream=True))
  for index, reply in enumerate(replies):
    mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
    assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
    assert "".join(c.delta.content or "" for c in mine) == reply.message.content


def test_more_choices_than_the_waiting_line_holds_is_a_400_not_a_429_to_retry():
  with TestClient(create_app(FakeEngine(), max_queue=4)) as client:
    assert client.post("/v1/completions", json=completion(n=4)).status_code == 200
    assert_refused(client.post("/v1/completions", json=completion(n=3, prompt=["x", "y"])), "n")
    assert_refused(client.post("/v1/chat/completions", json=chat(n=5)), "n")


def test_a_developer_message_is_the_system_turn_as_openai_renamed_it(client):
  def roles(first_role):
    request = ChatCompletionRequest.model_validate(chat(messages=[
        {"role": first_role, "content": "Answer briefly."}, {"role": "user", "content": "x"}]))
    return [message.role for message in request.messages]
  assert roles("developer") == roles("system") == ["system", "user"]
  assert client.post("/v1/chat/completions", json=chat(messages=[
      {"role": "developer", "content": "Answer briefly."},
      {"role": "user", "content": "x"}])).status_code == 200
  assert_refused(client.post("/v1/chat/completions", json=chat(messages=[
      {"role": "tool", "content": "x"}])), "messages")
