"""The chat template: messages -> one prompt string for a base model.

Each turn is rendered as `<|role|>\\ncontent\\n`, then `<|assistant|>\\n` opens the reply:

  <|system|>
  You are terse.
  <|user|>
  Hi
  <|assistant|>

The headers are the tokens `beam_pipelines.prepare_text` reserves in every tokenizer it trains
(`beam_pipelines.records.CHAT_TURN_TOKENS`), so each is one piece that ordinary text never
produces; a tokenizer made without them still works, splitting each header into ordinary
pieces. A reply ends where the model opens another turn: every header is a stop string.
"""

from beam_pipelines.records import CHAT_TURN_TOKENS

ROLES = tuple(CHAT_TURN_TOKENS)
CHAT_STOPS = list(CHAT_TURN_TOKENS.values())


def header(role: str) -> str:
  return f"{CHAT_TURN_TOKENS[role]}\n"


def chat_prompt(messages: list[tuple[str, str]]) -> str:
  """messages: (role, content) pairs, role one of ROLES."""
  return "".join(f"{header(role)}{content}\n" for role, content in messages) + header("assistant")
