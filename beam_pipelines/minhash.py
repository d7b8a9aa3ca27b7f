"""MinHash signatures of word 5-gram shingles and LSH banding (pure NumPy)."""

import hashlib

import numpy as np

from beam_pipelines import ngrams

SHINGLE_WORDS = 5
_CHUNK = 1024  # shingles per block: [_CHUNK, num_perm] uint64 stays in cache


def shingles(text: str, n: int = SHINGLE_WORDS) -> np.ndarray:
  """Distinct uint64 hashes of the word n-grams; a text shorter than n words is one shingle."""
  hashes = ngrams.word_hashes(text.split())
  if not len(hashes):
    return np.zeros(0, np.uint64)
  return np.unique(ngrams.ngram_hashes(hashes, min(n, len(hashes))))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(a, b) uint64 [num_perm] of the hash family h(x) = (a * x + b) >> 32, a odd."""
  rng = np.random.default_rng(seed)
  a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
  return a, b


def signature(shingle_hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """uint32 [num_perm]: the minimum of each hash function over the shingles."""
  minima = np.full(len(a), np.iinfo(np.uint64).max, np.uint64)
  hashed = np.empty((min(_CHUNK, len(shingle_hashes)), len(a)), np.uint64)
  with np.errstate(over="ignore"):
    for start in range(0, len(shingle_hashes), _CHUNK):
      chunk = shingle_hashes[start:start + _CHUNK, None]
      block = hashed[:len(chunk)]
      np.multiply(chunk, a, out=block)
      block += b
      np.minimum(minima, block.min(axis=0), out=minima)
  return (minima >> np.uint64(32)).astype(np.uint32)  # the shift is monotone: min commutes


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(a == b))


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
  """Chance that two documents with this Jaccard share at least one band."""
  return 1.0 - (1.0 - similarity**rows)**bands


def lsh_bands(threshold: float, num_perm: int, recall_at_threshold: float = 0.95) -> tuple[int, int]:
  """(bands, rows), bands * rows <= num_perm: the most rows per band (fewest spurious candidates)
  that still make a pair at exactly `threshold` a candidate with `recall_at_threshold`.
  Candidates are verified against the threshold afterwards, so erring low costs only time."""
  for rows in range(num_perm, 0, -1):
    bands = num_perm // rows
    if candidate_probability(threshold, bands, rows) >= recall_at_threshold:
      return bands, rows
  return num_perm, 1


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
  """One 8-byte bucket key per band; equal keys mean equal rows in that band."""
  return [hashlib.blake2b(sig[band * rows:(band + 1) * rows].tobytes(), digest_size=8,
                          salt=band.to_bytes(8, "little")).digest() for band in range(bands)]
