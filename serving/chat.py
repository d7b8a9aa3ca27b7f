"""The chat template, as serving uses it; `beam_pipelines.chat_template` owns it, so a served
prompt renders to the ids the same turns had in training. An imported model without maxlm's
chat tokens renders the Hugging Face template its tokenizer_config.json brought, as
transformers and vLLM render one."""

import functools

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from beam_pipelines.chat_template import (CHAT_STOPS, IMAGE_TOKEN, RESERVED_TOKENS, ROLES,
                                          chat_prompt, missing_pieces)

__all__ = ["CHAT_STOPS", "IMAGE_TOKEN", "RESERVED_TOKENS", "ROLES", "chat_prompt",
           "hf_chat_prompt", "missing_pieces"]


def hf_chat_prompt(template: str, messages: list[tuple[str, str]], bos_token: str,
                   eos_token: str) -> str:
  """The turns in a Hugging Face chat template (Jinja), the assistant's turn to follow. A
  template's own refusal (`raise_exception`) or failure is a ValueError saying so."""
  try:
    return compiled_template(template).render(
        messages=[{"role": role, "content": content} for role, content in messages],
        add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
  except jinja2.TemplateError as e:
    raise ValueError(f"the model's chat template refused the messages: {e}") from None


@functools.lru_cache(maxsize=4)
def compiled_template(template: str) -> jinja2.Template:
  """As transformers compiles one: sandboxed, trim_blocks and lstrip_blocks, and a
  `raise_exception` for the template's own checks. Raises jinja2.TemplateError."""
  environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  environment.globals["raise_exception"] = _raise_exception
  return environment.from_string(template)


def _raise_exception(message: str):
  raise jinja2.TemplateError(message)
