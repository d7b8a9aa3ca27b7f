"""The reserved tokens and the chat template, in one place: the pipelines, the loader and the
server import them, so training and serving render a conversation to the same ids.

Each turn is `<|role|>content<|end|>` and a newline; a prompt asking for a reply ends with the
assistant's header:

  <|system|>You are terse.<|end|>
  <|user|>Hi<|end|>
  <|assistant|>

Every piece of text (a turn's content, or the newline between turns) sits between two reserved
tokens, and SentencePiece cuts text at its user-defined symbols before anything else. So
tokenizing the whole conversation gives the ids of tokenizing each piece alone: a content's
tokens never merge with a header or a newline, which makes the assistant mask exact and the
ids of a served prompt those of the same turns in training.

A reply ends with `<|end|>`: SFT trains on it (mask 1) and serving stops at it. Not the eos id,
though every tokenizer has one: serving renders a conversation to a string, and an earlier
reply's eos cannot be written in one. The headers stay stop strings too, so a model never
trained on `<|end|>` still stops where it opens another turn. `beam_pipelines.prepare_text`
reserves every token here in each tokenizer it trains; a tokenizer made before `<|end|>` was
reserved still serves (the stop string matches its pieces), while `render_ids`, which training
uses, asks for a tokenizer holding each reserved token as one piece.

A leaf module: it imports nothing from the project.
"""

from collections.abc import Sequence
from typing import NamedTuple, Protocol

CHAT_TURN_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
IMAGE_TOKEN = "<|image|>"  # the placeholder an image's embeddings will replace
# Appended in this order after the tokenizer's pad/bos/eos/unk: new tokens go last, so the ids
# of the older ones stay put.
RESERVED_TOKENS = (*CHAT_TURN_TOKENS.values(), IMAGE_TOKEN, END_TOKEN)
ROLES = tuple(CHAT_TURN_TOKENS)
CHAT_STOPS = [END_TOKEN, *CHAT_TURN_TOKENS.values()]
TURN_SEPARATOR = "\n"


class Tokenizer(Protocol):
  def encode(self, text: str) -> list[int]: ...

  def piece_to_id(self, piece: str) -> int: ...


class RenderedIds(NamedTuple):
  """A conversation's token ids and, per token, 1 where SFT trains: an assistant's content
  and its `<|end|>`."""
  ids: list[int]
  assistant: list[int]


def header(role: str) -> str:
  if role not in CHAT_TURN_TOKENS:
    raise ValueError(f"unknown chat role {role!r}; use one of {', '.join(ROLES)}")
  return CHAT_TURN_TOKENS[role]


def render(messages: Sequence[tuple[str, str]]) -> str:
  """messages: (role, content) pairs, role one of ROLES -> the conversation's text."""
  return "".join(f"{header(role)}{content}{END_TOKEN}{TURN_SEPARATOR}"
                 for role, content in messages)


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
  """The conversation followed by the assistant's header, which opens the reply."""
  return render(messages) + header("assistant")


def render_ids(messages: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> RenderedIds:
  """The ids of `render(messages)`, tokenized at once, with the assistant mask.

  No bos: the packer adds it, as it does to documents and as serving's encode does.
  """
  _check_reserved(tokenizer, [header(role) for role, _ in messages] + [END_TOKEN])
  end_id, separator = tokenizer.piece_to_id(END_TOKEN), tokenizer.encode(TURN_SEPARATOR)
  ids, assistant = [], []
  for index, (role, content) in enumerate(messages):
    _check_content(index, content)
    body = tokenizer.encode(content) if content else []
    trained = int(role == "assistant")
    ids += [tokenizer.piece_to_id(header(role)), *body, end_id, *separator]
    assistant += [0] + [trained] * (len(body) + 1) + [0] * len(separator)
  if ids != tokenizer.encode(render(messages)):
    raise ValueError("this tokenizer does not cut text at the reserved tokens (does it add a "
                     "dummy prefix?); use one trained by beam_pipelines.prepare_text")
  return RenderedIds(ids, assistant)


def missing_pieces(tokenizer: Tokenizer, tokens: Sequence[str]) -> list[str]:
  """Those of `tokens` the tokenizer has no piece for (an imported model's own tokenizer has
  none of maxlm's); unlike `render_ids`, a dummy prefix before the piece is allowed."""
  return [token for token in tokens
          if tokenizer.encode(token)[-1:] != [tokenizer.piece_to_id(token)]]


def _check_reserved(tokenizer: Tokenizer, tokens: list[str]) -> None:
  for token in dict.fromkeys(tokens):
    if tokenizer.encode(token) != [tokenizer.piece_to_id(token)]:
      raise ValueError(f"the tokenizer does not hold {token} as one piece; use one trained by "
                       "beam_pipelines.prepare_text, which reserves " + " ".join(RESERVED_TOKENS))


def _check_content(index: int, content: str) -> None:
  if not isinstance(content, str):
    raise ValueError(f"message {index}'s content is {type(content).__name__}, not text")
  for token in CHAT_STOPS:  # the image placeholder may sit in content; turn markers may not
    if token in content:
      raise ValueError(f"message {index}'s content holds the reserved token {token}; "
                       "remove it from the text")


def expand_image_placeholders(ids: Sequence[int], image_id: int, num_patches: int) -> list[int]:
  """`ids` with each image placeholder repeated `num_patches` times, one position per patch
  of the vision model (`VisionConfig.num_patches`), which is what the model reads."""
  return [piece for token in ids for piece in [token] * (num_patches if token == image_id else 1)]
