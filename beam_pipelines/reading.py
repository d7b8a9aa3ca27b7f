"""Reading one input unit (a file, or a range of a TFDS split) into documents, never raising
on bad input: each unreadable document becomes a `Rejected` with a reason instead.

Plain files are one document each; JSONL(.gz) lines and Parquet rows contribute their `text`
field; TFDS examples their `text` feature. Nothing larger than `max_bytes` is ever held whole.
A local path is opened only if it is a regular file (or a link to one): directories, broken or
looping links, FIFOs and devices are rejected by kind, and never opened in a way that can block.
"""

import contextlib
import errno
import gzip
import json
import os
import stat
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
TFDS_PREFIX = "tfds:"
TEXT_FIELD = "text"
SNIFF_BYTES = 8192
READ_CHUNK = 1 << 20
PARQUET_BATCH_ROWS = 1024
NOT_REGULAR = ("directory", "dangling_symlink", "symlink_loop", "fifo", "special_file")
REASONS = ("invalid_utf8", "binary", "empty", "too_long", "malformed_json", "not_an_object",
           "missing_text", "text_not_a_string", "unreadable") + NOT_REGULAR


class Text(NamedTuple):
  line: int  # 1-based line or row; 0 for a whole file
  text: str


class Rejected(NamedTuple):
  line: int
  reason: str  # one of REASONS
  detail: str = ""  # what was found, where the reason alone does not say


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
  if not isinstance(record, dict):
    return Rejected(line, "not_an_object", f"the row is a JSON {json_type(record)}, not an "
                    f"object with a {TEXT_FIELD!r} field")
  text = record.get(TEXT_FIELD)
  if isinstance(text, bytes):
    return decode_document(text, line)
  if text is None:
    return Rejected(line, "missing_text")
  if not isinstance(text, str):
    return Rejected(line, "text_not_a_string",
                    f"the {TEXT_FIELD!r} field is a JSON {json_type(text)}, not a string")
  if not text.strip():
    return Rejected(line, "empty")
  if len(text) > max_bytes:
    return Rejected(line, "too_long")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates from JSON escapes
    return Rejected(line, "invalid_utf8")
  return Text(line, text)


def json_type(value) -> str:
  """The JSON name of a parsed value's type."""
  if isinstance(value, bool):
    return "boolean"
  return {dict: "object", list: "array", str: "string", int: "number", float: "number",
          type(None): "null"}.get(type(value), type(value).__name__)


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
    yield Rejected(0, "unreadable", str(err))


class NotRegularFile(Exception):
  """A local input that is not a regular file; `reason` is one of NOT_REGULAR."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path} is not a regular file ({reason})")
    self.reason = reason


def is_local(path: str) -> bool:
  return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)


def kind_of_mode(mode: int) -> str | None:
  """None for a regular file, else its NOT_REGULAR reason."""
  if stat.S_ISREG(mode):
    return None
  if stat.S_ISDIR(mode):
    return "directory"
  return "fifo" if stat.S_ISFIFO(mode) else "special_file"


def kind_of_path(path: str) -> str | None:
  """None for a regular file or a link to one, else why not: a NOT_REGULAR reason, or
  `unreadable` for a path that vanished or may not be looked at."""
  try:
    return kind_of_mode(os.stat(path).st_mode)
  except FileNotFoundError:
    return "dangling_symlink" if os.path.islink(path) else "unreadable"
  except OSError as err:
    return "symlink_loop" if err.errno == errno.ELOOP else "unreadable"


def open_regular_file(path: str):
  """Binary file object of a local regular file, else NotRegularFile. The stat comes first so a
  device or FIFO is never opened; the open is non-blocking and checked again with fstat, so one
  swapped in after the stat cannot hang the read either."""
  reason = kind_of_path(path)
  if reason in NOT_REGULAR:
    raise NotRegularFile(path, reason)
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
  try:
    reason = kind_of_mode(os.fstat(fd).st_mode)
    if reason:
      raise NotRegularFile(path, reason)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


@contextlib.contextmanager
def open_binary(path: str):
  """A binary file object with readline(limit); .gz is decompressed as a stream (Beam's own
  decompressing reader has no readline limit, so one huge line would be read whole)."""
  if is_local(path):
    opened = open_regular_file(path)
  else:
    opened = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  with opened as raw:
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
  except NotRegularFile as err:
    yield Rejected(0, err.reason)
  except (OSError, EOFError, zlib.error) as err:  # unreadable, not gzip, or a truncated .gz
    yield Rejected(0, "unreadable", str(err))


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
