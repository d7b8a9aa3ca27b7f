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

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned


class SafetensorsFile:
  """The tensors of one .safetensors file, each read when asked for."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    with open(self.path, "rb") as file:
      (length,) = struct.unpack("<Q", file.read(8))
      header = json.loads(file.read(length))
    self.metadata = header.pop("__metadata__", {})
    self.entries = header
    self._data_start = 8 + length

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _dtype(self.entries[name]["dtype"], self.path, name)

  def tensor(self, name: str) -> np.ndarray:
    entry = self.entries[name]
    start, end = entry["data_offsets"]
    data = np.memmap(self.path, np.uint8, "r", self._data_start + start, (end - start,))
    return np.array(data.view(self.dtype(name)).reshape(entry["shape"]))


def _dtype(name: str, path: Path, tensor: str) -> np.dtype:
  if name not in DTYPES:
    raise ValueError(f"{path}: tensor {tensor} has dtype {name}; maxlm reads "
                     f"{', '.join(DTYPES)}")
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
