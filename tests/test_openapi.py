"""serving.openapi: the spec says what the server answers, checked by reading it and by
schemathesis generating requests from it against the app over a fake engine (ASGI, in process)."""

import numpy as np
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_server_api import FakeEngine

from maxlm.sampling import PromptScores
from serving import metrics
from serving.engine import ContextLengthError
from serving.server import create_app

KEY = "key-one"


class FittingEngine(FakeEngine):
  """The fake engine, refusing what does not fit its context as the real one does, with the
  real one's token-id prompts, prompt scores (echo) and tokenizer routes."""
  vocab_size = 1000

  def prompt_ids(self, prompt, max_tokens):
    return self.token_prompt(super().prompt_ids(prompt, max_tokens)[0], max_tokens)

  def token_prompt(self, prompt_ids, max_tokens):
    if not all(0 <= token < self.vocab_size for token in prompt_ids):
      raise ValueError(f"a token id is not in [0, {self.vocab_size})")
    max_tokens = 16 if max_tokens is None else max_tokens
    if len(prompt_ids) + max_tokens > self.context_length:
      raise ContextLengthError(f"{len(prompt_ids)} + {max_tokens} tokens do not fit "
                               f"{self.context_length}")
    return prompt_ids, max_tokens

  def prefill_scored(self, prompt_ids, settings):
    rows = len(prompt_ids)
    return (*self.prefill(prompt_ids, settings), PromptScores(
        np.zeros((1, rows), np.float32), np.zeros((1, rows, 5), np.int32),
        np.zeros((1, rows, 5), np.float32)))

  def tokenize(self, text, add_special_tokens=True):
    return [1] * add_special_tokens + [ord(c) for c in text]

  def tokenizer_info(self):
    return {"eos_token": "</s>", "bos_token": "<s>", "model_max_length": self.context_length}


def operations(spec: dict) -> dict[str, dict]:
  return {f"{method.upper()} {path}": operation for path, methods in spec["paths"].items()
          for method, operation in methods.items()}


def test_the_spec_documents_400_not_422_and_each_error_the_server_gives():
  spec = operations(create_app(FakeEngine()).openapi())
  for name in ("POST /v1/completions", "POST /v1/chat/completions"):
    responses = spec[name]["responses"]
    assert sorted(responses) == ["200", "400", "404", "413", "429", "503"], name
    assert sorted(responses["200"]["content"]) == ["application/json", "text/event-stream"]
    error = responses["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
  assert sorted(spec["GET /health"]["responses"]) == ["200", "503"]
  assert [*spec["GET /metrics"]["responses"]["200"]["content"]] == [metrics.CONTENT_TYPE_LATEST]
  assert "422" not in str(spec) and "security" not in str(spec)


def test_with_api_keys_the_spec_declares_bearer_auth_on_all_but_health_and_metrics():
  spec = create_app(FakeEngine(), api_keys=[KEY]).openapi()
  assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http",
                                                              "scheme": "bearer"}}
  for name, operation in operations(spec).items():
    is_open = name in ("GET /health", "GET /metrics")
    assert ("security" in operation) != is_open, name
    assert ("401" in operation["responses"]) != is_open, name


# Loaded at collection, as @schema.parametrize needs (its lazy from_fixture fails on pytest 9);
# the app's orchestrator thread sleeps until a request comes.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(FittingEngine(),
                                                                    api_keys=[KEY]))


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_no_5xx_and_what_the_spec_documents(case):
  # Left out: the check that every schema-valid body is accepted. A schema cannot say which
  # valid values this server refuses with a 400 that names the field (n=2, several prompts, a
  # prompt past the context, 5.0 for an integer under strict parsing).
  case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                         excluded_checks=[positive_data_acceptance])
