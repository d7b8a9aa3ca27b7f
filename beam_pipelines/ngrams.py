"""Stable word and word n-gram hashes shared by the quality filters and MinHash.

Python's `hash` is salted per process, so Beam workers would disagree; blake2b is not.
"""

import hashlib

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


def word_hashes(words: list[str]) -> np.ndarray:
  """uint64 [len(words)]: one stable hash per word (each distinct word hashed once)."""
  table = {word: int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"),
                                                digest_size=8).digest(), "little")
           for word in dict.fromkeys(words)}
  return np.fromiter(map(table.__getitem__, words), np.uint64, len(words))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
  """uint64 [len(hashes) - n + 1]: hash of each run of n consecutive word hashes."""
  count = len(hashes) - n + 1
  if count <= 0:
    return np.zeros(0, np.uint64)
  combined = hashes[:count].copy()
  with np.errstate(over="ignore"):
    for offset in range(1, n):
      combined = (combined * _MIX) ^ hashes[offset:offset + count]
  return combined
