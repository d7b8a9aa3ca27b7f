"""Documents keyed by a stable hash of their text, and their train/validation split."""

import hashlib
import math
from typing import NamedTuple

import apache_beam as beam

METRICS_NAMESPACE = "prepare_text"
KEY_BITS = 63  # keys stay below 2**63 so Beam's varint int coder carries them
TRAIN, VALIDATION = 0, 1


class Document(NamedTuple):
  key: int  # document_key of the text: equal texts have equal keys
  source: str
  origin: str  # file, or file:line / tfds spec[index], for dead letters and duplicate lists
  text: str


def document_key(text_utf8: bytes, seed: int) -> int:
  """A stable hash of the text, so identical documents always land in the same split."""
  digest = hashlib.blake2b(text_utf8, digest_size=8,
                           salt=seed.to_bytes(8, "little", signed=True)).digest()
  return int.from_bytes(digest, "little") >> (64 - KEY_BITS)


class KeyBounds(beam.CombineFn):
  """(document count, lowest key, highest key) over all documents."""

  def create_accumulator(self):
    return 0, 2**KEY_BITS, -1

  def add_input(self, bounds, document):
    count, lowest, highest = bounds
    key = document[0]
    return count + 1, min(lowest, key), max(highest, key)

  def merge_accumulators(self, accumulators):
    counts, lows, highs = zip(*accumulators)
    return sum(counts), min(lows), max(highs)

  def extract_output(self, bounds):
    return bounds


def split_of(key: int, validation_fraction: float, bounds: tuple[int, int, int]) -> int:
  """TRAIN or VALIDATION by hash threshold; with >= 2 distinct documents the lowest key is
  always held out and the highest always trained on, so neither split is empty."""
  count, lowest, highest = bounds
  if validation_fraction > 0 and count >= 2 and lowest != highest:
    if key == lowest:
      return VALIDATION
    if key == highest:
      return TRAIN
  return VALIDATION if key < math.floor(validation_fraction * 2**KEY_BITS) else TRAIN
