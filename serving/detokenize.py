"""Incremental detokenization: token ids in, only text that will never change out.

Decoding token by token breaks byte-fallback characters (a 3-byte "€" is three tokens) and
SentencePiece's leading-space rule, so every step decodes the whole generated list and emits
the new suffix, holding back a trailing U+FFFD (an unfinished character) and any tail that
could still become a stop string.
"""

from collections.abc import Callable

REPLACEMENT_CHAR = "\ufffd"


def first_stop(text: str, stops: list[str]) -> int | None:
  """Index of the earliest stop string in `text`, or None."""
  found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
  return min(found) if found else None


def partial_stop_len(text: str, stops: list[str]) -> int:
  """Length of the longest tail of `text` that is the start of a stop string."""
  longest = 0
  for stop in stops:
    for size in range(min(len(stop) - 1, len(text)), longest, -1):
      if text.endswith(stop[:size]):
        longest = size
        break
  return longest


class TextStream:
  """Feeds generated token ids; `push` returns the newly stable text and whether a stop hit."""

  def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None):
    self.decode = decode
    self.stops = [stop for stop in stops or [] if stop]
    self.token_ids: list[int] = []
    self.emitted = ""

  def push(self, token_id: int) -> tuple[str, bool]:
    self.token_ids.append(token_id)
    text = self.decode(self.token_ids)
    cut = first_stop(text, self.stops)
    if cut is not None:
      return self._emit_up_to(text[:cut]), True
    stable = text.rstrip(REPLACEMENT_CHAR)
    return self._emit_up_to(stable[:len(stable) - partial_stop_len(stable, self.stops)]), False

  def flush(self) -> str:
    """The held-back rest, once no more tokens will come."""
    return self._emit_up_to(self.decode(self.token_ids))

  def _emit_up_to(self, text: str) -> str:
    # A decode that rewrote already-sent text cannot be taken back; wait until it agrees again.
    if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
      return ""
    new, self.emitted = text[len(self.emitted):], text
    return new
