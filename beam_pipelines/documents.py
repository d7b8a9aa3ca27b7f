"""Input side of `prepare_text`: globs -> documents keyed by a stable hash -> train/validation."""

import hashlib
import json
import math
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

METRICS_NAMESPACE = "prepare_text"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
KEY_BITS = 63  # keys stay below 2**63 so Beam's varint int coder carries them
TRAIN, VALIDATION = 0, 1

files_read = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "files_read")
documents_read = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "documents_read")
empty_documents = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "empty_documents")
malformed_json_lines = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "malformed_json_lines")
missing_text_lines = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "missing_text_lines")


def recursive_variants(pattern: str) -> list[str]:
  """Beam's `dir/**/x` needs at least one directory between; Python's also matches `dir/x`."""
  head, separator, tail = pattern.partition("/**/")
  if not separator:
    return [pattern]
  tails = recursive_variants(tail)
  return [f"{head}/**/{t}" for t in tails] + [f"{head}/{t}" for t in tails]


class MatchedInputs(NamedTuple):
  patterns: list[str]  # only patterns that match at least one file
  files: int
  total_bytes: int


def resolve_inputs(globs: list[str]) -> MatchedInputs:
  """Matches every glob up front; a glob matching nothing is a user error."""
  patterns, files, total_bytes = [], 0, 0
  for glob in globs:
    glob_files = 0
    for pattern in recursive_variants(glob):
      metadata = FileSystems.match([pattern])[0].metadata_list
      if metadata:
        patterns.append(pattern)
        glob_files += len(metadata)
        total_bytes += sum(m.size_in_bytes for m in metadata)
    if not glob_files:
      raise ValueError(f"--input glob {glob!r} matched no files; check the path and quoting")
    files += glob_files
  return MatchedInputs(patterns, files, total_bytes)


def document_key(text_utf8: bytes, seed: int) -> int:
  """A stable hash of the text, so identical documents always land in the same split."""
  digest = hashlib.blake2b(text_utf8, digest_size=8,
                           salt=seed.to_bytes(8, "little", signed=True)).digest()
  return int.from_bytes(digest, "little") >> (64 - KEY_BITS)


def is_jsonl(path: str) -> bool:
  return path.lower().endswith(JSONL_SUFFIXES)


def _json_text(line: bytes) -> str | None:
  """The `text` field of one JSONL line, counting lines that have none."""
  try:
    record = json.loads(line)
  except ValueError:
    malformed_json_lines.inc()
    return None
  text = record.get("text") if isinstance(record, dict) else None
  if not isinstance(text, str):
    missing_text_lines.inc()
    return None
  return text


def read_texts(path: str) -> Iterator[str]:
  """Documents in one file: the whole file, or each JSONL line's `text` field."""
  with FileSystems.open(path) as f:  # decompresses .gz by extension
    if not is_jsonl(path):
      yield f.read().decode("utf-8", errors="replace")
      return
    for line in iter(f.readline, b""):
      if line.strip():
        text = _json_text(line)
        if text is not None:
          yield text


class ReadDocuments(beam.DoFn):
  """path -> (document_key, text) for each non-empty document in the file."""

  def __init__(self, seed: int):
    self._seed = seed

  def process(self, path: str) -> Iterator[tuple[int, str]]:
    files_read.inc()
    for text in read_texts(path):
      if not text:
        empty_documents.inc()
        continue
      try:
        text_utf8 = text.encode("utf-8")
      except UnicodeEncodeError:  # lone surrogates from JSON escapes; SentencePiece rejects them
        text_utf8 = text.encode("utf-8", errors="replace")
        text = text_utf8.decode("utf-8")
      documents_read.inc()
      yield document_key(text_utf8, self._seed), text


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


def partition_by_split(document, num_partitions, validation_fraction, bounds) -> int:
  del num_partitions
  return split_of(document[0], validation_fraction, bounds)
