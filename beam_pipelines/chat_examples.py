"""Chat and preference rows -> token ids with their loss masks -> packed records.

A row is SFT (`{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`) or
preference (`{"prompt", "chosen", "rejected"}`, each a string or a message list). A row that
cannot become a training example raises `BadRow` with one of REASONS and a sentence naming the
fix; `beam_pipelines.prepare_chat` writes those to the dead letters. Pure Python and NumPy.

Records (see `fields_of_kind`): an SFT row holds whole conversations, `[bos] +
render_ids(...)`, numbered from 1 by `segment_ids`, with `loss_mask` 1 on assistant content and
its `<|end|>`. A preference row holds pair k as segment k = the shared prefix (the longest
common prefix of [bos] prompt chosen and [bos] prompt rejected), then the chosen continuation,
then the rejected one; `branch_ids` says which (0 shared, 1 chosen, 2 rejected), and the
rejected continuation's positions restart where the prefix ends, as the chosen one's do. The
mask is each half's own (1 on the replies only); a supervised token inside the shared prefix
counts for both replies. The model computes the prompt once (see `maxlm.post_training`).
"""

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from beam_pipelines import chat_template
from beam_pipelines import records

SFT, PREFERENCE = "sft", "preference"
KINDS = (SFT, PREFERENCE)
FIELD_NAMES = ("tokens", "segment_ids", "positions", "loss_mask")
BRANCH_FIELD = "branch_ids"
SHARED, CHOSEN, REJECTED = 0, 1, 2  # branch ids
REASONS = ("malformed_json", "malformed_row", "invalid_utf8", "row_too_large", "unreadable",
           "unknown_role", "reserved_token", "no_supervised_tokens", "identical_replies",
           "too_long", "other_kind")
OPEN_ROWS = 8  # rows a packer keeps open for later, shorter examples

Messages = tuple[tuple[str, str], ...]


class BadRow(ValueError):
  """A row that cannot become an example: `reason` (one of REASONS) and a sentence."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


class Conversation(NamedTuple):
  messages: Messages


class Pair(NamedTuple):
  prompt: Messages
  chosen: Messages
  rejected: Messages


class Tokenized(NamedTuple):
  """One conversation (or one half of a pair): int32 [n] ids starting with bos, and its mask."""
  tokens: np.ndarray
  loss_mask: np.ndarray


class Example(NamedTuple):
  """What packing places: one segment's int32 [n] tokens, loss_mask, positions and branch_ids;
  `truncated` counts the turns cut off to fit."""
  tokens: np.ndarray
  loss_mask: np.ndarray
  positions: np.ndarray
  branch_ids: np.ndarray
  truncated: int = 0


def names_of_kind(kind: str) -> tuple[str, ...]:
  return FIELD_NAMES + ((BRANCH_FIELD,) if kind == PREFERENCE else ())


def fields_of_kind(kind: str, seq_len: int) -> records.Fields:
  """The record fields of a data dir of `kind`, int32 [seq_len] each."""
  return tuple(records.field(name, np.int32, (seq_len,)) for name in names_of_kind(kind))


def unshared_example(tokenized: Tokenized, truncated: int = 0) -> Example:
  length = len(tokenized.tokens)
  return Example(tokenized.tokens, tokenized.loss_mask, np.arange(length, dtype=np.int32),
                 np.zeros(length, np.int32), truncated)


def shared_prefix_length(chosen: Tokenized, rejected: Tokenized) -> int:
  """How many leading (token, mask) pairs the two halves have in common."""
  length = min(len(chosen.tokens), len(rejected.tokens))
  differs = ((chosen.tokens[:length] != rejected.tokens[:length])
             | (chosen.loss_mask[:length] != rejected.loss_mask[:length]))
  return int(np.argmax(differs)) if differs.any() else length


def shared_example(chosen: Tokenized, rejected: Tokenized) -> Example:
  """One segment: the halves' shared prefix, then each half's continuation after it, both
  continuations numbered from the prefix's end."""
  prefix = shared_prefix_length(chosen, rejected)
  parts = ((chosen, SHARED, 0, prefix), (chosen, CHOSEN, prefix, None),
           (rejected, REJECTED, prefix, None))
  join = lambda arrays: np.concatenate(arrays).astype(np.int32)  # noqa: E731
  return Example(
      join([half.tokens[start:end] for half, _, start, end in parts]),
      join([half.loss_mask[start:end] for half, _, start, end in parts]),
      join([np.arange(len(half.tokens))[start:end] for half, _, start, end in parts]),
      join([np.full(len(half.tokens[start:end]), branch) for half, branch, start, end in parts]))


def kind_of(row) -> str:
  if not isinstance(row, dict):
    raise BadRow("malformed_row", f"a row must be a JSON object, got {type(row).__name__}")
  if "chosen" in row or "rejected" in row:
    return PREFERENCE
  if "messages" in row or "completion" in row:
    return SFT
  raise BadRow("malformed_row", f"row has keys {sorted(row)[:8]}; give `messages`, "
               "`prompt` + `completion`, or `prompt` + `chosen` + `rejected`")


def parse_row(row) -> Conversation | Pair:
  if kind_of(row) == SFT:
    if "messages" in row:
      return Conversation(messages_of(row["messages"], "messages"))
    return Conversation(turns_of(row, "prompt", "user") + turns_of(row, "completion",
                                                                   "assistant", text_only=True))
  return Pair(turns_of(row, "prompt", "user"), turns_of(row, "chosen", "assistant"),
              turns_of(row, "rejected", "assistant"))


def turns_of(row: dict, key: str, role: str, text_only: bool = False) -> Messages:
  """A string field as one turn of `role`, or a message list."""
  if key not in row:
    raise BadRow("malformed_row", f"row lacks `{key}`; add it or use another row format")
  value = row[key]
  if isinstance(value, str):
    return ((role, text_of(value, key)),)
  if isinstance(value, list) and not text_only:
    return messages_of(value, key)
  kinds = "a string" if text_only else "a string or a list of {role, content} objects"
  raise BadRow("malformed_row", f"`{key}` is {type(value).__name__}; make it {kinds}")


def messages_of(value, key: str) -> Messages:
  if not isinstance(value, list) or not value:
    raise BadRow("malformed_row", f"`{key}` must be a non-empty list of {{role, content}} "
                 "objects")
  messages = []
  for i, message in enumerate(value):
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)):
      raise BadRow("malformed_row", f"`{key}[{i}]` must be an object with string `role` and "
                   "`content`")
    if message["role"] not in chat_template.ROLES:
      raise BadRow("unknown_role", f"`{key}[{i}]` has role {message['role']!r}; use one of "
                   f"{', '.join(chat_template.ROLES)}")
    messages.append((message["role"], text_of(message["content"], f"{key}[{i}].content")))
  return tuple(messages)


def text_of(value: str, where: str) -> str:
  """`value`, if it is text: JSON's `\\ud800` escape decodes to a lone surrogate, which is
  no character and which no tokenizer can encode."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    surrogate = f"\\u{ord(value[e.start]):04x}"
    raise BadRow("invalid_utf8", f"`{where}` holds the lone surrogate {surrogate}, half of a "
                 "UTF-16 pair; fix the program that wrote the row") from None
  return value


def tokenize(messages: Messages, tokenizer: chat_template.Tokenizer, bos_id: int,
             reply_from: int = 0) -> Tokenized:
  """[bos] + the conversation's ids; the mask is render_ids' assistant mask, from turn
  `reply_from` on (a pair's prompt trains nothing)."""
  try:
    prompt_ids = chat_template.render_ids(messages[:reply_from], tokenizer).ids
    ids, assistant = chat_template.render_ids(messages, tokenizer)
  except ValueError as e:
    raise BadRow("reserved_token", str(e)) from None
  mask = [0] * (1 + len(prompt_ids)) + assistant[len(prompt_ids):]
  return Tokenized(np.array([bos_id, *ids], np.int32), np.array(mask, np.int32))


def turn_starts(tokenized: Tokenized, header_ids: Sequence[int]) -> list[int]:
  """Where each turn begins: content may not hold a header, so headers open turns only."""
  return [int(i) for i in np.flatnonzero(np.isin(tokenized.tokens, header_ids))]


def sft_example(conversation: Conversation, tokenizer, bos_id: int, seq_len: int,
                truncate: bool) -> Example:
  """One conversation that fits `seq_len`; with `truncate`, a longer one keeps its longest
  run of whole turns from the start that ends with an assistant reply and fits."""
  messages = conversation.messages
  whole = tokenize(messages, tokenizer, bos_id)
  if not whole.loss_mask.any():
    raise BadRow("no_supervised_tokens", "the conversation has no assistant turn, so nothing "
                 "would train; add the assistant's reply")
  if len(whole.tokens) <= seq_len:
    return unshared_example(whole)
  too_long = (f"the conversation is {len(whole.tokens)} tokens with bos, longer than "
              f"--seq_len {seq_len}")
  if not truncate:
    raise BadRow("too_long", f"{too_long}; raise --seq_len or pass --truncate")
  header_ids = [tokenizer.piece_to_id(h) for h in chat_template.CHAT_TURN_TOKENS.values()]
  ends = turn_starts(whole, header_ids)[1:] + [len(whole.tokens)]
  for turns in range(len(messages) - 1, 0, -1):
    if messages[turns - 1][0] == "assistant" and ends[turns - 1] <= seq_len:
      kept = Tokenized(whole.tokens[:ends[turns - 1]], whole.loss_mask[:ends[turns - 1]])
      return unshared_example(kept, truncated=len(messages) - turns)
  raise BadRow("too_long", f"{too_long}, and even its first reply does not fit; raise "
               "--seq_len")


def preference_example(pair: Pair, tokenizer, bos_id: int, seq_len: int) -> Example:
  """Both halves of a pair sharing their common prefix; never truncated (a cut reply may no
  longer be the one preferred)."""
  identical = BadRow("identical_replies", "`chosen` equals `rejected`, so there is no "
                     "preference to learn; drop the row or fix one reply")
  if pair.chosen == pair.rejected:
    raise identical
  halves = tuple(tokenize(pair.prompt + reply, tokenizer, bos_id, len(pair.prompt))
                 for reply in (pair.chosen, pair.rejected))
  for name, half in zip(("chosen", "rejected"), halves):
    if not half.loss_mask.any():
      raise BadRow("no_supervised_tokens", f"`{name}` has no assistant turn, so nothing would "
                   "train; make it the assistant's reply")
  example = shared_example(*halves)
  if len(example.tokens) == len(halves[0].tokens) == len(halves[1].tokens):
    raise identical  # different text, the same ids
  if len(example.tokens) > seq_len:
    raise BadRow("too_long", f"the shared prompt and both replies are {len(example.tokens)} "
                 f"tokens with bos, longer than --seq_len {seq_len}; raise --seq_len or "
                 "shorten the row")
  return example


def example_of_row(row, kind: str, tokenizer, bos_id: int, seq_len: int,
                   truncate: bool) -> Example:
  """A parsed JSON value -> the Example of a data dir of `kind`, or BadRow."""
  if kind_of(row) != kind:
    raise BadRow("other_kind", f"a {kind_of(row)} row in {kind} data; put it in a separate "
                 "--input and output dir")
  parsed = parse_row(row)
  if kind == SFT:
    return sft_example(parsed, tokenizer, bos_id, seq_len, truncate)
  return preference_example(parsed, tokenizer, bos_id, seq_len)


class _Row:
  """A record being filled: its [fields, seq_len] arrays and how far they are filled."""

  def __init__(self, seq_len: int):
    self.arrays = np.zeros((len(FIELD_NAMES) + 1, seq_len), np.int32)
    self.filled = 0
    self.segments = 0

  def fits(self, example: Example) -> bool:
    return self.filled + len(example.tokens) <= self.arrays.shape[-1]

  def add(self, example: Example) -> None:
    self.segments += 1
    start, end = self.filled, self.filled + len(example.tokens)
    tokens, segment_ids, positions, loss_mask, branch_ids = self.arrays[:, start:end]
    tokens[:], segment_ids[:], positions[:] = example.tokens, self.segments, example.positions
    loss_mask[:], branch_ids[:] = example.loss_mask, example.branch_ids
    self.filled = end


def pack(examples: Iterable[Example], seq_len: int, open_rows: int = OPEN_ROWS,
         ) -> Iterator[np.ndarray]:
  """Examples -> int32 [len(FIELD_NAMES) + 1, seq_len] rows (FIELD_NAMES, then branch_ids),
  each example whole in the first open row where it fits; when none has room, the oldest is
  emitted. Padding is token 0 (pad), segment 0, position 0, mask 0, branch 0."""
  rows: list[_Row] = []
  for example in examples:
    row = next((r for r in rows if r.fits(example)), None)
    if row is None:
      if len(rows) == open_rows:
        yield rows.pop(0).arrays
      row = _Row(seq_len)
      rows.append(row)
    row.add(example)
  for row in rows:
    yield row.arrays


def record_arrays(row: np.ndarray, kind: str) -> dict[str, np.ndarray]:
  """A packed row as {field name: [seq_len]}, the names of `fields_of_kind(kind, ...)`."""
  return dict(zip(names_of_kind(kind), row))
