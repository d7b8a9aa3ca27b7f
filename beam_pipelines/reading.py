"""Reading one input unit (a file, or a range of a TFDS split) into documents, never raising
on bad input: each unreadable document becomes a `Rejected` with a reason instead.

Plain files are one document each; JSONL(.gz) lines and Parquet rows contribute their `text`
field; TFDS examples their `text` feature. Nothing larger than `max_bytes` is ever held whole.
"""

import contextlib
import gzip
import json
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
TFDS_PREFIX = "tfds:"
TEXT_FIELD = "text"
SNIFF_BYTES = 8192
READ_CHUNK = 1 << 20
PARQUET_BATCH_ROWS = 1024
REASONS = ("invalid_utf8", "binary", "empty", "too_long", "malformed_json", "missing_text",
           "unreadable")


class Text(NamedTuple):
  line: int  # 1-based line or row; 0 for a whole file
  text: str


class Rejected(NamedTuple):
  line: int
  reason: str  # one of REASONS


def is_jsonl(path: str) -> bool:
  return path.lower().endswith(JSONL_SUFFIXES)


def is_parquet(path: str) -> bool:
  return path.lower().endswith(PARQUET_SUFFIXES)


def decode_document(data: bytes, line: int) -> Text | Rejected:
  if b"\0" in data[:SNIFF_BYTES]:
    return Rejected(line, "binary")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    return Rejected(line, "invalid_utf8")
  return Text(line, text) if text.strip() else Rejected(line, "empty")


def text_of_record(record, line: int, max_bytes: int) -> Text | Rejected:
  text = record.get(TEXT_FIELD) if isinstance(record, dict) else None
  if isinstance(text, bytes):
    return decode_document(text, line)
  if not isinstance(text, str):
    return Rejected(line, "missing_text")
  if not text.strip():
    return Rejected(line, "empty")
  if len(text) > max_bytes:
    return Rejected(line, "too_long")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates from JSON escapes
    return Rejected(line, "invalid_utf8")
  return Text(line, text)


def read_whole_file(f, max_bytes: int) -> Iterator[Text | Rejected]:
  data = f.read(max_bytes + 1)
  if len(data) > max_bytes:
    yield Rejected(0, "too_long")
  else:
    yield decode_document(data, 0)


def read_jsonl(f, max_bytes: int) -> Iterator[Text | Rejected]:
  """Each line is read at most max_bytes at a time; an over-long line is skipped in chunks."""
  line_number = 0
  while line := f.readline(max_bytes + 1):
    line_number += 1
    if len(line) > max_bytes and not line.endswith(b"\n"):
      while (rest := f.readline(READ_CHUNK)) and not rest.endswith(b"\n"):
        pass
      yield Rejected(line_number, "too_long")
      continue
    if not line.strip():
      continue
    try:
      line.decode("utf-8")
      record = json.loads(line)
    except UnicodeDecodeError:
      yield Rejected(line_number, "invalid_utf8")
      continue
    except ValueError:
      yield Rejected(line_number, "malformed_json")
      continue
    yield text_of_record(record, line_number, max_bytes)


def read_parquet(f, max_bytes: int) -> Iterator[Text | Rejected]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    table = pq.ParquetFile(f)
    if TEXT_FIELD not in table.schema_arrow.names:
      yield Rejected(0, "missing_text")
      return
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[TEXT_FIELD]):
      for value in batch.column(0).to_pylist():
        row += 1
        yield text_of_record({TEXT_FIELD: value}, row, max_bytes)
  except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
    del err
    yield Rejected(0, "unreadable")


@contextlib.contextmanager
def open_binary(path: str):
  """A binary file object with readline(limit); .gz is decompressed as a stream (Beam's own
  decompressing reader has no readline limit, so one huge line would be read whole)."""
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
    if path.lower().endswith(".gz"):
      with gzip.GzipFile(fileobj=raw) as f:
        yield f
    else:
      yield raw


def read_file(path: str, max_bytes: int) -> Iterator[Text | Rejected]:
  """Documents of one file."""
  try:
    with open_binary(path) as f:
      if is_jsonl(path):
        yield from read_jsonl(f, max_bytes)
      elif is_parquet(path):
        yield from read_parquet(f, max_bytes)
      else:
        yield from read_whole_file(f, max_bytes)
  except (OSError, EOFError, zlib.error):  # unreadable, not gzip, or a truncated .gz
    yield Rejected(0, "unreadable")


def parse_tfds_spec(spec: str) -> tuple[str, str]:
  """`tfds:NAME[/CONFIG][:SPLIT]` -> (name, split); the split defaults to train."""
  name, _, split = spec[len(TFDS_PREFIX):].partition(":")
  return name, split or "train"


def tfds_source(spec: str):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  name, split = parse_tfds_spec(spec)
  return tfds.data_source(name, split=split, download=False)


def read_tfds_range(spec: str, start: int, stop: int, max_bytes: int,
                    source=None) -> Iterator[Text | Rejected]:
  """Examples [start, stop) of a TFDS split through its random-access data source."""
  source = source if source is not None else tfds_source(spec)
  for index in range(start, stop):
    yield text_of_record(source[index], index, max_bytes)
