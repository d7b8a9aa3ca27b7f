"""Stable word and word n-gram hashes shared by the quality filters and MinHash.

Python's `hash` is salted per process, so Beam workers would disagree; these hashes are pure
functions of the text.
"""

from typing import NamedTuple

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)
_WORD_SEED = np.uint64(0x6A09E667F3BCC908)


def word_hashes(words: list[str]) -> np.ndarray:
  """uint64 [len(words)]: a hash of each word's UTF-8 bytes that every process agrees on,
  computed for all words at once with no Python step per word. It is the sum over the word's
  bytes of mix64(byte, position in word, word length), Zobrist-style, so distinct words collide
  with chance ~2^-64, mixed again. Words hold no newline (str.split makes them) and are at
  most 2^28 bytes."""
  data = np.frombuffer("\n".join(words).encode("utf-8", "surrogatepass"), np.uint8)
  separators = np.flatnonzero(data == ord("\n"))
  starts = np.concatenate(([0], separators + 1))
  spans = np.diff(np.append(starts, len(data) + 1))  # bytes per word, with its separator
  position = (np.arange(len(data)) - np.repeat(starts, spans)[:len(data)]).astype(np.uint64)
  length = np.repeat(spans - 1, spans)[:len(data)].astype(np.uint64)
  keys = data.astype(np.uint64) | (position << np.uint64(8)) | (length << np.uint64(36))
  values = mix64(keys ^ _WORD_SEED)
  values[separators] = 0
  return mix64(np.add.reduceat(values, starts)) if len(words) else np.zeros(0, np.uint64)


class Vocabulary(NamedTuple):
  """The distinct words of a word list, in order of first occurrence, and the list as ids."""
  words: list[str]
  index: dict[str, int]  # word -> id
  ids: np.ndarray  # int64 [len(word list)]
  lengths: np.ndarray  # int64 [len(words)]: characters per distinct word

  @classmethod
  def of(cls, words: list[str]) -> "Vocabulary":
    index = {word: i for i, word in enumerate(dict.fromkeys(words))}
    return cls(list(index), index, np.fromiter(map(index.__getitem__, words), np.int64,
                                               len(words)),
               np.fromiter(map(len, index), np.int64, len(index)))

  def local_hashes(self) -> np.ndarray:
    """uint64 [len(ids)]: distinct words get distinct, well-mixed hashes, meaningful only
    within this word list (ids depend on the order words first occur)."""
    return mix64(self.ids.astype(np.uint64))


def mix64(values: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer: a bijection on uint64 whose every output bit depends on every
  input bit."""
  with np.errstate(over="ignore"):
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
  """uint64 [len(hashes) - n + 1]: hash of each run of n consecutive word hashes."""
  return ngram_hashes_at(hashes, np.arange(max(0, len(hashes) - n + 1)), n)


def ngram_hashes_at(hashes: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
  """uint64 [len(starts)]: ngram_hashes(hashes, n)[starts]; every start + n <= len(hashes)."""
  combined = hashes[starts]
  with np.errstate(over="ignore"):
    for offset in range(1, n):
      combined = (combined * _MIX) ^ hashes[starts + offset]
  return combined
