"""The evaluators' input files, read with errors a user can act on: each names the file, and
the line and field where the fault is (a missing path, a directory, bytes that are not UTF-8,
a line that is not a JSON object, a field of the wrong type)."""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from maxlm.errors import UserError

T = TypeVar("T")

KNOWN_SUFFIXES = (".jsonl", ".json", ".txt")
GLOB_CHARACTERS = frozenset("*?[")


def default_task_name(path: str, fallback: str) -> str:
  """A task's name from its path: a file's stem when its suffix is a KNOWN_SUFFIXES one, else
  the last part whole (a data dir `...-h0.03-r5` keeps its dots); a glob is named for its
  directory, and `fallback` names what has no name of its own (`*.txt`)."""
  named = Path(path.rstrip("/") or "/")
  while GLOB_CHARACTERS & set(named.name):
    named = named.parent
  if named.suffix in KNOWN_SUFFIXES:
    return named.stem
  return named.name or fallback


def read_text(path: str | Path, what: str) -> str:
  """The UTF-8 text of the file of `what` (e.g. "JSONL file of multiple-choice items")."""
  try:
    data = Path(path).read_bytes()
  except FileNotFoundError:
    raise UserError(f"{path} does not exist; pass an existing {what}") from None
  except IsADirectoryError:
    raise UserError(f"{path} is a directory; pass a {what}") from None
  except OSError as error:
    raise UserError(f"{path} cannot be read ({error.strerror}); pass a readable {what}"
                    ) from None
  return decode_utf8(data, path)


def decode_utf8(data: bytes, path: str | Path) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as error:
    line = data.count(b"\n", 0, error.start) + 1
    raise UserError(f"{path}:{line} is not UTF-8 (byte {data[error.start]:#04x}); save the "
                    "file as UTF-8") from None


def jsonl_objects(path: str | Path, what: str, fields: tuple[str, ...], example: str
                  ) -> Iterator[tuple[str, dict]]:
  """(`PATH:LINE`, object) per non-blank line of a JSONL file of `what`s, each a JSON object
  that has every one of `fields`; `example` shows the user one such line."""
  for number, line in enumerate(read_text(path, f"JSONL file of {what}s").splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except ValueError as error:
      raise UserError(f"{where} is not a {what} ({error}); write one JSON object per line: "
                      f"{example}") from None
    if not isinstance(record, dict):
      raise UserError(f"{where} is not a {what} (it is {shown(record)}); write one JSON object "
                      f"per line: {example}")
    missing = [name for name in fields if name not in record]
    if missing:
      raise UserError(f'{where} is not a {what} (no "{missing[0]}"); write one JSON object per '
                      f"line: {example}")
    yield where, record


def jsonl_items(path: str | Path, what: str, fields: tuple[str, ...], example: str,
                item_of: Callable[[dict, str], T], limit: int | None) -> list[T]:
  """`item_of(object, "PATH:LINE")` of the first `limit` (None: every) `jsonl_objects`; a file
  of none is refused."""
  items = []
  for where, record in jsonl_objects(path, what, fields, example):
    items.append(item_of(record, where))
    if limit is not None and len(items) == limit:
      break
  if not items:
    raise UserError(f"{path} holds no items")
  return items


def field_error(where: str, name: str, value, wanted: str) -> UserError:
  """`PATH:LINE: "name" is <value as JSON>; write <wanted>`."""
  return UserError(f'{where}: "{name}" is {shown(value)}; write {wanted}')


def is_string_list(value) -> bool:
  return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def is_index(value) -> bool:
  """A JSON integer: not a float such as 1.7 or 1.0, a string, or true/false."""
  return isinstance(value, int) and not isinstance(value, bool)


def shown(value, width: int = 40) -> str:
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= width else text[:width - 3] + "..."
