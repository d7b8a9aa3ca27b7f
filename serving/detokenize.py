"""Incremental detokenization: token ids in, only text that will never change out.

Decoding token by token breaks byte-fallback characters (a 3-byte "€" is three tokens) and
SentencePiece's leading-space rule, so every step decodes the tokens since the last settled
point and emits the new suffix, holding back a trailing U+FFFD (an unfinished character) and
any tail that could still become a stop string.
"""

from collections.abc import Callable

REPLACEMENT_CHAR = "\ufffd"
SETTLE_EVERY = 8  # how long the decoded window grows before it may settle


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
    self._settled = ""      # the text of token_ids[:_window], which no later token changes
    self._window = 0
    self._anchor_text = ""  # the text of token_ids[_window - 1] decoded alone

  def push(self, token_id: int) -> tuple[str, bool]:
    self.token_ids.append(token_id)
    text = self._text()
    if len(self.token_ids) - self._window >= SETTLE_EVERY:
      self._settle(text)
    cut = first_stop(text, self.stops)
    if cut is not None:
      return self._emit_up_to(text[:cut]), True
    stable = text.rstrip(REPLACEMENT_CHAR)
    return self._emit_up_to(stable[:len(stable) - partial_stop_len(stable, self.stops)]), False

  def flush(self) -> str:
    """The held-back rest, once no more tokens will come."""
    return self._emit_up_to(self._text())

  def _text(self) -> str:
    """The text of every token so far, decoding only those after the settled ones.

    The window is decoded behind the last settled token (its anchor), so that its first
    piece keeps its leading space as it does mid-text; the anchor's own text is cut off."""
    anchor = self.token_ids[self._window - 1:self._window]
    tail = self.decode(anchor + self.token_ids[self._window:])
    return self._settled + tail[len(self._anchor_text):]

  def _settle(self, text: str):
    """Once the text ends in a whole character after a token with text of its own, no later
    token changes it: decode from there on."""
    anchor_text = self.decode(self.token_ids[-1:])
    if anchor_text and not text.endswith(REPLACEMENT_CHAR):
      self._settled, self._window, self._anchor_text = text, len(self.token_ids), anchor_text

  def _emit_up_to(self, text: str) -> str:
    # A decode that rewrote already-sent text cannot be taken back; wait until it agrees again.
    if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
      return ""
    new, self.emitted = text[len(self.emitted):], text
    return new
