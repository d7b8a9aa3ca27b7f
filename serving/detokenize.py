"""Incremental detokenization: token ids in, only text that will never change out.

Decoding token by token breaks byte-fallback characters (a 3-byte "€" is three tokens) and
SentencePiece's leading-space rule, so every step decodes the tokens since the last settled
point and emits the new suffix, holding back a trailing U+FFFD (an unfinished character) and
any tail that could still become a stop string. Stop strings are looked for only where the
new text could complete one, so a token costs the same at the end of a long stream as at its
start, and about the same with a long stop string as with a short one.
"""

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"
SETTLE_EVERY = 8  # how long the decoded window grows before it may settle


def first_stop(text: str, stops: list[str]) -> int | None:
  """Index of the earliest stop string in `text`, or None."""
  found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
  return min(found) if found else None


def stop_tail(text: str, stop: str, at_most: int) -> int:
  """Length of the longest tail of `text`, of at most `at_most` characters, that begins `stop`
  (and is shorter than it).

  Such a tail begins with the stop's first character, so only the places holding it are tried,
  longest first: text unlike the stop costs one `find`."""
  tail = text[len(text) - min(at_most, len(stop) - 1, len(text)):]
  at = tail.find(stop[:1])
  while at >= 0:
    if stop.startswith(tail[at:]):
      return len(tail) - at
    at = tail.find(stop[:1], at + 1)
  return 0


class TextStream:
  """Feeds generated token ids; `push` returns the newly stable text and whether a stop hit.

  `prompt_ids`: the ids the generated ones follow. The first generated piece is decoded after
  the prompt's last one, as mid-text, so a word-initial piece keeps its leading space and the
  prompt's text plus the stream's is the text of all the ids together.

  Only the live text is held: the tokens since the last settled point, decoded, after the
  settled text's last few characters, where a stop string may still begin. A token's cost does
  not grow with the text before it.
  """

  def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None,
               prompt_ids: Sequence[int] = ()):
    self.decode = decode
    self.stops = [stop for stop in stops or [] if stop]
    self.token_ids: list[int] = []
    self._keep = max(map(len, self.stops), default=1) - 1  # settled characters kept live
    self._window = 0        # token_ids[:_window] are settled: no later token changes their text
    self._anchor = list(prompt_ids[-1:])      # the token decoded before the window
    self._anchor_text = decode(self._anchor)  # its text alone, cut off the window's
    self._settled_tail = ""  # the settled text's last `_keep` characters
    self._sent = ""          # what was emitted of the live text
    self._diverged = False   # a decode rewrote emitted text, and that text has settled
    self._stable = ""        # the live text, less an unfinished character, at the last push
    self._held = [0] * len(self.stops)  # per stop, how much of its start `_stable` ends in

  def push(self, token_id: int) -> tuple[str, bool]:
    self.token_ids.append(token_id)
    live = self._live_text()
    cut = first_stop(live, self.stops)
    if cut is not None:
      return self._emit_up_to(cut, live), True
    stable = live.rstrip(REPLACEMENT_CHAR)
    held = self._hold_stop_starts(stable) if self.stops else 0
    new = self._emit_up_to(len(stable) - held, live)
    if len(self.token_ids) - self._window >= SETTLE_EVERY:
      self._settle(live)  # only text without a stop string settles: none is looked for there
    return new, False

  def flush(self) -> str:
    """The held-back rest, once no more tokens will come."""
    live = self._live_text()
    return self._emit_up_to(len(live), live)

  def _live_text(self) -> str:
    """The settled tail, then the window, decoded behind the token before it (its anchor) so
    that its first piece keeps its leading space as it does mid-text; the anchor's own text is
    cut off."""
    window = self.decode(self._anchor + self.token_ids[self._window:])
    return self._settled_tail + window[len(self._anchor_text):]

  def _hold_stop_starts(self, stable: str) -> int:
    """How many characters at the end of `stable` may begin a stop string: the most of any
    stop's start it ends in. Text that only grew ends in no more of a stop than it did plus
    what it grew by, so each stop is looked for only there: a token costs what its text adds,
    whatever the stop strings."""
    grown = (len(stable) - len(self._stable) if stable.startswith(self._stable)
             else len(stable))
    self._held = [stop_tail(stable, stop, held + grown)
                  for stop, held in zip(self.stops, self._held)]
    self._stable = stable
    return max(self._held)

  def _settle(self, live: str):
    """Once the text ends in a whole character after a token with text of its own, no later
    token changes it: decode from there on."""
    anchor_text = self.decode(self.token_ids[-1:])
    if not anchor_text or live.endswith(REPLACEMENT_CHAR):
      return
    settling = max(0, len(live) - self._keep)
    self._diverged |= not live.startswith(self._sent[:settling])
    self._sent, self._settled_tail = self._sent[settling:], live[settling:]
    self._stable = self._stable[settling:]
    self._window = len(self.token_ids)
    self._anchor, self._anchor_text = self.token_ids[-1:], anchor_text

  def _emit_up_to(self, end: int, live: str) -> str:
    """The live text up to `end` that was not emitted yet."""
    # A decode that rewrote already-sent text cannot be taken back; wait until it agrees again.
    text = live[:end]
    if self._diverged or len(text) <= len(self._sent) or not text.startswith(self._sent):
      return ""
    new, self._sent = text[len(self._sent):], text
    return new
