"""The on-disk format shared by the pipelines (writers) and `maxlm.data` (reader).

One ArrayRecord record is one example. The manifest's `fields` list says what it holds:
`[{"name": "tokens", "dtype": "int32", "shape": [seq_len]}, ...]`, shapes written out as numbers.
A record is each field's little-endian C-order bytes, concatenated in that order, with no
header. Why no header: the manifest already says every field's size, so a record's size is
fixed and checked on every decode, and the encoding of the packed text fields (`tokens`,
`segment_ids` and `positions`, int32 [seq_len] each) is then byte for byte v1's int32
[3, seq_len] array: v1 shards are v2 shards, and a v1 manifest (format
`maxlm.packed_int32.v1`, which lists only the names) reads as those three fields.

In packed text, `segment_ids` numbers the documents inside a sequence from 1; 0 marks padding.
`positions` restarts at 0 at each segment start. Pure NumPy, so readers need no Beam.
"""

from collections.abc import Mapping, Sequence
import functools
import math
from typing import NamedTuple

import numpy as np

from beam_pipelines.chat_template import RESERVED_TOKENS  # noqa: F401  (kept importable here)

RECORD_FORMAT = "maxlm.records.v2"
RECORD_FORMAT_V1 = "maxlm.packed_int32.v1"
RECORD_FIELDS = ("tokens", "segment_ids", "positions")  # the packed text fields, v1's rows
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"
SPLITS = ("train", "validation")
# The longest row the pipelines pack: a million tokens (the longest contexts trained today),
# 4 MB an int32 field. Beyond it a row is a typo's gigabytes held open in every bucket.
MAX_SEQ_LEN = 1 << 20
# Seeds salt a 64-bit hash (`documents.document_key`).
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)


def check_seq_len_and_seed(seq_len: int, seed: int, least: int) -> None:
  """--seq_len in [least, MAX_SEQ_LEN] and --seed a signed 64-bit integer, or ValueError."""
  if not least <= seq_len <= MAX_SEQ_LEN:
    raise ValueError(f"--seq_len must be at least {least} and at most {MAX_SEQ_LEN}, got "
                     f"{seq_len}")
  if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
    raise ValueError(f"--seed must be a signed 64-bit integer, in [{SEED_RANGE[0]}, "
                     f"{SEED_RANGE[1]}], got {seed}")


class Field(NamedTuple):
  """One array of every record: its name, dtype and shape."""
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return self.dtype.itemsize * math.prod(self.shape)


Fields = tuple[Field, ...]


def field(name: str, dtype, shape: Sequence[int]) -> Field:
  """A Field with its dtype fixed little-endian, whatever the machine writing or reading it."""
  return Field(name, np.dtype(dtype).newbyteorder("<"), tuple(int(n) for n in shape))


@functools.cache
def text_fields(seq_len: int) -> Fields:
  """Packed text: `tokens`, `segment_ids` and `positions`, int32 [seq_len] each."""
  return tuple(field(name, np.int32, (seq_len,)) for name in RECORD_FIELDS)


def manifest_fields(fields: Fields) -> list[dict]:
  """The manifest's `fields` entry for `fields`."""
  return [{"name": f.name, "dtype": f.dtype.name, "shape": list(f.shape)} for f in fields]


def fields_of_manifest(manifest: Mapping) -> Fields:
  """The fields a data dir's records hold, from its manifest (v1 or v2)."""
  if manifest.get("format") == RECORD_FORMAT_V1:
    return text_fields(manifest["seq_len"])
  entries = manifest.get("fields")
  if not isinstance(entries, list) or not entries:
    raise ValueError("the manifest's `fields` must be a non-empty list of "
                     "{name, dtype, shape}; rewrite it with the pipeline that made the data")
  fields = tuple(_parse_field(entry) for entry in entries)
  names = [f.name for f in fields]
  if len(set(names)) != len(names):
    raise ValueError(f"the manifest's `fields` name a field twice ({names}); "
                     "rewrite it with one entry per field")
  return fields


def _parse_field(entry) -> Field:
  if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
    raise ValueError(f"manifest field {entry!r} must have exactly the keys name, dtype and "
                     "shape; rewrite it with the pipeline that made the data")
  try:
    dtype = np.dtype(str(entry["dtype"]))
  except TypeError as e:
    raise ValueError(f"manifest field {entry['name']!r} has dtype {entry['dtype']!r}, which "
                     "NumPy does not know; use a name like int32, float32 or uint8") from e
  shape = entry["shape"]
  if (dtype.kind not in "biuf" or not isinstance(shape, list)
      or not all(type(n) is int and n > 0 for n in shape)):
    raise ValueError(f"manifest field {entry['name']!r} must have a numeric dtype and a shape "
                     f"of positive integers (got {entry['dtype']!r}, {shape!r})")
  return field(entry["name"], dtype, shape)


def encode_record(arrays: Mapping[str, np.ndarray], fields: Fields) -> bytes:
  """Serializes one example: `arrays` holds exactly `fields`' names, each of its shape."""
  if set(arrays) != {f.name for f in fields}:
    raise ValueError(f"record has fields {sorted(arrays)}, the manifest lists "
                     f"{[f.name for f in fields]}; write exactly the listed fields")
  parts = []
  for f in fields:
    array = np.asarray(arrays[f.name])
    if array.shape != f.shape:
      raise ValueError(f"record field {f.name!r} has shape {array.shape}, the manifest says "
                       f"{f.shape}; pad or cut it to that shape")
    parts.append(np.ascontiguousarray(array, dtype=f.dtype).tobytes())
  return b"".join(parts)


def decode_record(record: bytes, fields: Fields) -> dict[str, np.ndarray]:
  """Inverse of `encode_record`: {name: array of the field's dtype and shape}."""
  expected = sum(f.nbytes for f in fields)
  if len(record) != expected:
    sizes = ", ".join(f"{f.name} {f.dtype.name}{list(f.shape)}" for f in fields)
    raise ValueError(
        f"record has {len(record)} bytes but the manifest's fields ({sizes}) take {expected}; "
        "was it written with a different --seq_len or field list?")
  arrays, offset = {}, 0
  for f in fields:
    count = math.prod(f.shape)
    arrays[f.name] = np.frombuffer(record, f.dtype, count, offset).reshape(f.shape)
    offset += f.nbytes
  return arrays


def empty_record(fields: Fields) -> dict[str, np.ndarray]:
  """An all-zero example: for packed text, padding (segment 0: no loss, no attention)."""
  return {f.name: np.zeros(f.shape, f.dtype) for f in fields}


def encode_packed(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> bytes:
  """Serializes one packed text sequence; each argument is [seq_len] integers."""
  arrays = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
  return encode_record(arrays, text_fields(len(tokens)))


def decode_packed(record: bytes, seq_len: int) -> dict[str, np.ndarray]:
  """Inverse of `encode_packed`: returns {field: int32 [seq_len]}."""
  return decode_record(record, text_fields(seq_len))


def read_shard(path: str, fields: Fields | int) -> list[dict[str, np.ndarray]]:
  """Every record of one ArrayRecord shard, decoded, in file order; `fields` may be a seq_len,
  meaning the packed text fields."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
  fields = text_fields(fields) if isinstance(fields, int) else fields
  reader = ArrayRecordReader(path)
  try:
    return [decode_record(record, fields) for record in reader.read_all()]
  except ValueError as e:
    raise ValueError(f"shard {path}: {e}") from e
  finally:
    reader.close()
