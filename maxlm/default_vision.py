"""The embedded image-text set: scikit-learn's handwritten digits and shapes drawn with Pillow in
colors, with captions and chat questions generated alongside, written as JSONL + PNG files (so a
user sees the format) and prepared by `beam_pipelines.prepare_images`, once, into the cache.

  python -m maxlm.default_vision      # prints the JSONL files and the data dir

Rows: `{"image": "images/d0007.png", "caption": "a handwritten 7"}` and
`{"image": ..., "messages": [user "What digit is this?", assistant "7"]}`; shapes ask "What
shape and color?" -> "a red circle". Validation rows show images no training row shows: the
digits of held-out writers' samples (every tenth) and shapes drawn from another seed.
"""

import argparse
import json
import random
from pathlib import Path
from typing import NamedTuple

import gin
import numpy as np
from PIL import Image, ImageDraw

from beam_pipelines.records import MANIFEST_NAME
from maxlm import default_corpus, user_cache

RECIPE = 1  # bumped whenever the drawings, questions or sizes change what the set holds
DIGIT_QUESTION = "What digit is this?"
SHAPE_QUESTION = "What shape and color?"
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220),
          "yellow": (235, 210, 30), "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
CANVAS = 32
HELD_OUT_EVERY = 10


class Sizes(NamedTuple):
  shapes_train: int = 1800
  shapes_validation: int = 200


DEFAULT_SIZES = Sizes()


class Sample(NamedTuple):
  """One image and what the rows built on it say: its file, a caption, a question, an answer."""
  image: Image.Image
  name: str
  caption: str
  question: str
  answer: str


def digit_samples(held_out: bool) -> list[Sample]:
  """The 1,797 8x8 digits of sklearn (ink 0..16, drawn dark on light), every tenth held out."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  samples = []
  for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
    if (index % HELD_OUT_EVERY == 0) != held_out:
      continue
    gray = (255 - pixels * 255 / 16).round().astype(np.uint8)
    samples.append(Sample(Image.fromarray(gray, "L"), f"d{index:04d}.png",
                          f"a handwritten {label}", DIGIT_QUESTION, str(label)))
  return samples


def draw_shape(shape: str, color: tuple[int, int, int], rng: random.Random) -> Image.Image:
  """One shape, its size and place drawn at random, on a light background of random tint."""
  background = tuple(rng.randint(225, 255) for _ in range(3))
  image = Image.new("RGB", (CANVAS, CANVAS), background)
  size = rng.randint(CANVAS // 2, CANVAS - 6)
  left, top = rng.randint(2, CANVAS - size - 2), rng.randint(2, CANVAS - size - 2)
  box = (left, top, left + size, top + size)
  draw = ImageDraw.Draw(image)
  if shape == "circle":
    draw.ellipse(box, fill=color)
  elif shape == "square":
    draw.rectangle(box, fill=color)
  else:
    draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)],
                 fill=color)
  return image


def shape_samples(count: int, seed: int, prefix: str) -> list[Sample]:
  rng = random.Random(seed)
  samples = []
  for index in range(count):
    shape, color = SHAPES[index % len(SHAPES)], rng.choice(sorted(COLORS))
    answer = f"a {color} {shape}"
    samples.append(Sample(draw_shape(shape, COLORS[color], rng), f"{prefix}{index:04d}.png",
                          answer, SHAPE_QUESTION, answer))
  return samples


def rows_of(samples: list[Sample], captions: bool) -> list[dict]:
  """A chat row per sample and, for training, a caption row too."""
  rows = []
  for sample in samples:
    image = f"images/{sample.name}"
    rows.append({"image": image, "messages": [
        {"role": "user", "content": sample.question},
        {"role": "assistant", "content": sample.answer}]})
    if captions:
      rows.append({"image": image, "caption": sample.caption})
  return rows


def write_default_set(directory: Path, sizes: Sizes = DEFAULT_SIZES, seed: int = 0) -> dict[str, Path]:
  """images/*.png, train.jsonl and validation.jsonl (chat questions on unseen images only)."""
  splits = {
      "train": digit_samples(False) + shape_samples(sizes.shapes_train, seed, "s"),
      "validation": digit_samples(True) + shape_samples(sizes.shapes_validation, seed + 1, "v")}
  (directory / "images").mkdir(parents=True, exist_ok=True)
  paths = {}
  for split, samples in splits.items():
    for sample in samples:
      sample.image.save(directory / "images" / sample.name)
    rows = rows_of(samples, captions=split == "train")
    random.Random(seed).shuffle(rows)
    paths[split] = directory / f"{split}.jsonl"
    paths[split].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  return paths


@gin.configurable(module="maxlm")
def ensure_default_vision(tokenizer_dir: str | None = None, image_size: int = 32,
                          patch_size: int = 8, seq_len: int = 64, cache_dir: str | None = None,
                          sizes: Sizes = DEFAULT_SIZES) -> str:
  """The data dir of the default image-text set, built first if not cached. `tokenizer_dir`
  (a data dir) defaults to the default corpus's."""
  tokenizer_dir = tokenizer_dir or default_corpus.ensure_default_corpus()
  manifest = json.loads((Path(tokenizer_dir) / MANIFEST_NAME).read_text())
  root = Path(cache_dir) if cache_dir else user_cache.cache_root()
  built = root / (f"vision-t{manifest['tokenizer']['sha256'][:12]}-i{image_size}-p{patch_size}"
                  f"-s{seq_len}-n{sum(sizes)}-r{RECIPE}")
  if not (built / "data" / MANIFEST_NAME).exists():
    print(f"building the default image-text set into {built} (once)", flush=True)
    from beam_pipelines import prepare_images  # noqa: PLC0415 - Beam costs a trainer ~2 s
    user_cache.report_other_builds(built)
    with user_cache.building(built) as partial:
      paths = write_default_set(partial, sizes)
      prepare_images.run([str(paths["train"])], str(partial / "data"),
                         validation_inputs=[str(paths["validation"])], tokenizer=tokenizer_dir,
                         image_size=image_size, patch_size=patch_size, seq_len=seq_len)
  return str(built / "data")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokenizer", default=None,
                      help="a data dir whose tokenizer to use (default: the default corpus)")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--patch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--cache_dir", default=None)
  flags = parser.parse_args(argv)
  data = ensure_default_vision(flags.tokenizer, flags.image_size, flags.patch_size,
                               flags.seq_len, flags.cache_dir)
  for split in ("train", "validation"):
    print(Path(data).parent / f"{split}.jsonl")
  print(f"image chat data: {data}")


if __name__ == "__main__":
  main()
