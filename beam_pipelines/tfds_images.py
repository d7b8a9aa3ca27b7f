"""TFDS image splits as image-text rows for `prepare_images`: `--input=tfds:NAME[/CONFIG][:SPLIT]`.

Examples are read by index through `tfds.data_source` (the split's ArrayRecord files; no
TensorFlow), in ranges of RANGE so that workers share a split. Each example becomes the row
`{"image": pixels, "caption": text}`, or with a question `{"image": pixels, "messages": [user
question, assistant text]}`: the text is the example's `text_key` feature, a class label read
as its name (`ClassLabel.names`) when the split's info has them.
"""

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from beam_pipelines import reading
from beam_pipelines.chat_examples import BadRow

RANGE = 2000  # examples per work item
TEXT_KEYS = ("caption", "label")  # tried in order when --tfds_text_key is not given


class Fields(NamedTuple):
  """Which features make a row: the image's, the text's (None: the first of TEXT_KEYS that
  the example has), and the user's question (None: a caption row)."""
  image_key: str = "image"
  text_key: str | None = None
  question: str | None = None


CAPTIONS = Fields()


class Unit(NamedTuple):
  """Examples [start, stop) of a TFDS split."""
  spec: str
  start: int
  stop: int


def is_spec(path: str) -> bool:
  return path.startswith(reading.TFDS_PREFIX)


def units(spec: str) -> list[Unit]:
  """The split's index ranges; a split that cannot be opened or is empty is a user error."""
  try:
    size = len(reading.tfds_source(spec))
  except Exception as err:  # noqa: BLE001  # TFDS raises many kinds
    raise ValueError(f"--input {spec!r} could not be opened ({err}); prepare it with "
                     "`tfds build` or set TFDS_DATA_DIR") from None
  if not size:
    raise ValueError(f"--input {spec!r} has no examples")
  return [Unit(spec, start, min(size, start + RANGE)) for start in range(0, size, RANGE)]


def label_names(source, key: str) -> list[str] | None:
  """The class names of feature `key` when the source's dataset info declares them."""
  info = getattr(source, "dataset_info", None)
  try:
    return list(info.features[key].names)
  except (AttributeError, KeyError, TypeError):
    return None


def text_of(value, names: list[str] | None) -> str | None:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, str):
    return value
  if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer):
    index = int(value)
    return names[index] if names and 0 <= index < len(names) else str(index)
  return None


def row_of(example, where: str, fields: Fields, names: list[str] | None) -> dict:
  """One TFDS example -> an image-text row; BadRow naming the flag to set when a feature is
  missing or is not text. `names`: the class names of the label feature, if it has them."""
  if not isinstance(example, dict) or fields.image_key not in example:
    have = sorted(example) if isinstance(example, dict) else type(example).__name__
    raise BadRow("malformed_row", f"{where} has no image feature {fields.image_key!r} (it has "
                 f"{have}); set --tfds_image_key")
  text_key = fields.text_key or next((k for k in TEXT_KEYS if k in example), None)
  text = text_of(example[text_key], names) if text_key in example else None
  if not text:
    raise BadRow("malformed_row", f"{where} has no text feature {text_key or TEXT_KEYS!r} that "
                 f"is a string or a class label (it has {sorted(example)}); set --tfds_text_key")
  if fields.question is None:
    return {"image": np.asarray(example[fields.image_key]), "caption": text}
  return {"image": np.asarray(example[fields.image_key]),
          "messages": [{"role": "user", "content": fields.question},
                       {"role": "assistant", "content": text}]}


def rows(unit: Unit, fields: Fields, source=None) -> Iterator[tuple[int, dict | BadRow]]:
  """(index, row or BadRow) for every example of the unit."""
  source = source if source is not None else reading.tfds_source(unit.spec)
  names = label_names(source, fields.text_key or "label")
  for index in range(unit.start, unit.stop):
    try:
      yield index, row_of(source[index], f"{unit.spec}[{index}]", fields, names)
    except BadRow as bad:
      yield index, bad
