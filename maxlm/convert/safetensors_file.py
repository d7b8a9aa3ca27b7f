"""The safetensors format in numpy: a little-endian u64 header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the tensors' bytes.

Our own reader and writer, because `safetensors.numpy` has no bfloat16 (numpy lacks it) and
writes a whole dict at once: reading maps the file and returns one tensor at a time, writing
lays the header out from shapes alone and then streams each tensor as it is made.
"""

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from maxlm.errors import UserError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned


class SafetensorsFile:
  """The tensors of one .safetensors file, each read when asked for."""

  def __init__(self, path: str | os.PathLike):
    """Reads the header; a file too short for it or for the tensors it lists, or whose header
    is no safetensors header, raises UserError naming the file."""
    self.path = Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as file:
      prefix = file.read(8)
      if len(prefix) < 8:
        raise _corrupt(self.path, f"it has {size} bytes, fewer than a header's length")
      (length,) = struct.unpack("<Q", prefix)
      if 8 + length > size:
        raise _corrupt(self.path, f"its header claims {length} bytes of the {size} it has")
      header = _parse_header(self.path, file.read(length))
    self.metadata = header.pop("__metadata__", {})
    self.entries = header
    self._data_start = 8 + length
    if (end := self._data_start + _data_end(self.path, header)) > size:
      raise _corrupt(self.path, f"its tensors end at byte {end} but it has {size} bytes")

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _dtype(self.entries[name]["dtype"], self.path, name)

  def nbytes(self, name: str) -> int:
    start, end = self.entries[name]["data_offsets"]
    return end - start

  def tensor(self, name: str) -> np.ndarray:
    entry = self.entries[name]
    start, end = entry["data_offsets"]
    data = np.memmap(self.path, np.uint8, "r", self._data_start + start, (end - start,))
    return np.array(data.view(self.dtype(name)).reshape(entry["shape"]))


def _corrupt(path: Path, reason: str) -> UserError:
  return UserError(f"{path} is truncated or corrupt ({reason}); download or copy it again")


def _parse_header(path: Path, text: bytes) -> dict:
  try:
    header = json.loads(text)
  except ValueError:
    header = None
  if not isinstance(header, dict):
    raise _corrupt(path, "its header is no JSON object")
  return header


def _data_end(path: Path, header: dict) -> int:
  """Where the last tensor's bytes end, counted from the end of the header."""
  try:
    return max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
  except (KeyError, IndexError, TypeError, ValueError):
    raise _corrupt(path, "a header entry has no data_offsets") from None


def _dtype(name: str, path: Path, tensor: str) -> np.dtype:
  if name not in DTYPES:
    raise UserError(f"{path}: tensor {tensor} has dtype {name}, and maxlm reads "
                    f"{', '.join(DTYPES)} only; convert the checkpoint to one of those")
  return DTYPES[name]


def header(specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
           metadata: dict[str, str] | None = None) -> bytes:
  """The length-prefixed header of tensors (name, shape, dtype) stored in that order."""
  entries, offset = {}, 0
  if metadata:
    entries["__metadata__"] = metadata
  for name, shape, dtype in specs:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    entries[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                     "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(entries, separators=(",", ":")).encode()
  text += b" " * (-(8 + len(text)) % _ALIGN)
  return struct.pack("<Q", len(text)) + text


def write(path: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], np.dtype]],
          make: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes the tensors `specs` names, calling `make(name)` for each in turn: only one tensor
  is in memory at a time."""
  with open(path, "wb") as file:
    file.write(header(specs, metadata))
    for name, shape, dtype in specs:
      array = np.ascontiguousarray(make(name), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"tensor {name} came out {array.shape}, not the {tuple(shape)} the "
                         "header promised")
      file.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
