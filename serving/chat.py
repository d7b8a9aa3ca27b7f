"""The chat template: messages -> one prompt string for a base model.

Each turn is rendered as `<|role|>\\ncontent\\n`, then `<|assistant|>\\n` opens the reply:

  <|system|>
  You are terse.
  <|user|>
  Hi
  <|assistant|>

The headers are plain text today, so the tokenizer splits them into ordinary pieces. If a
tokenizer is trained with them as user-defined symbols (`user_defined_symbols=["<|user|>", ...]`
in beam_pipelines.tokenizer_training), SentencePiece maps each header to its reserved piece
with no change here. A reply ends where the model opens another turn: every header is a stop
string.
"""

ROLES = ("system", "user", "assistant")
CHAT_STOPS = [f"<|{role}|>" for role in ROLES]


def header(role: str) -> str:
  return f"<|{role}|>\n"


def chat_prompt(messages: list[tuple[str, str]]) -> str:
  """messages: (role, content) pairs, role one of ROLES."""
  return "".join(f"{header(role)}{content}\n" for role, content in messages) + header("assistant")
