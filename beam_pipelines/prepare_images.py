"""Image-text rows -> tokenized image chat with pixels, ArrayRecord + manifest + report.

  python -m beam_pipelines.prepare_images --input='vision/*.jsonl' --tokenizer=runs/tiny \\
      --output_dir=/tmp/vision --image_size=32 --patch_size=8 --seq_len=128

Rows (JSONL or .jsonl.gz; see beam_pipelines.image_chat): `{"image", "caption"}`,
`{"image", "messages"}` with `<|image|>` placeholders, or `{"messages"}` with OpenAI
`image_url` content parts. An image is a path (relative ones from the input file's folder) or
a base64 `data:` URL; remote URLs are not fetched. `tfds:NAME[/CONFIG][:SPLIT]` inputs read a
TFDS image split through `tfds.data_source` (beam_pipelines.tfds_images: --tfds_image_key,
--tfds_text_key, --tfds_question). Images are decoded by
beam_pipelines.images (EXIF, RGB, resize + center crop to --image_size, uint8).

A record is one conversation (not packed: its images travel with it): `tokens`,
`segment_ids`, `positions`, `loss_mask` int32 [seq_len], each `<|image|>` expanded to
(image_size / patch_size)^2 positions, and `image` uint8 [image_size, image_size, 3], or
[max_images, image_size, image_size, 3] zero-padded with --max_images above 1. Bad rows and
bad images (truncated, corrupt, over --max_image_pixels, zero-size, placeholders that do not
match the images) go to dead_letter.jsonl with a reason; the report counts images in and out
by reason. Staging, --overwrite, held-out rows and Beam options are as in prepare_chat.
"""

import argparse
import datetime
import json
import logging
import math
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.io.filesystems import FileSystems
from array_record.python.array_record_module import ArrayRecordWriter

from beam_pipelines import (
  chat_examples,
  chat_template,
  dataset_manifest,
  documents,
  image_chat,
  images,
  prepare_chat,
  prepare_text,
  records,
  stage_report,
  staging,
  tfds_images,
  tokenized_split,
)
from beam_pipelines.chat_examples import BadRow

logger = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"
STAGE = "images"
TEXT_FIELDS = chat_examples.FIELD_NAMES


def fields_of(seq_len: int, image_size: int, max_images: int) -> records.Fields:
  image_shape = (image_size, image_size, 3) if max_images == 1 else (
      max_images, image_size, image_size, 3)
  return (*(records.field(name, np.int32, (seq_len,)) for name in TEXT_FIELDS),
          records.field("image", np.uint8, image_shape))


def expand_placeholders(tokenized: chat_examples.Tokenized, image_id: int,
                        num_patches: int) -> chat_examples.Tokenized:
  """Each placeholder repeated num_patches times, its mask (0) with it."""
  repeats = np.where(tokenized.tokens == image_id, num_patches, 1)
  return chat_examples.Tokenized(np.repeat(tokenized.tokens, repeats),
                                 np.repeat(tokenized.loss_mask, repeats))


class Settings(dict):
  """image_size, patch_size, max_images, max_image_pixels, seq_len: what every row uses."""

  @property
  def num_patches(self) -> int:
    return (self["image_size"] // self["patch_size"]) ** 2


def example_of_row(row, base_dir: Path, tokenizer, bos_id: int, settings: Settings):
  """A parsed row -> (Tokenized, uint8 images [n, size, size, 3]); raises BadRow/BadImage."""
  messages, sources = image_chat.image_chat_of_row(row)
  if len(sources) > settings["max_images"]:
    raise BadRow("too_many_images", f"the row has {len(sources)} images, over --max_images "
                 f"{settings['max_images']}; raise it or split the row")
  tokenized = chat_examples.tokenize(messages, tokenizer, bos_id)
  if not tokenized.loss_mask.any():
    raise BadRow("no_supervised_tokens", "the row has no assistant reply; add one")
  image_id = tokenizer.piece_to_id(chat_template.IMAGE_TOKEN)
  tokenized = expand_placeholders(tokenized, image_id, settings.num_patches)
  if len(tokenized.tokens) > settings["seq_len"]:
    raise BadRow("too_long", f"the row is {len(tokenized.tokens)} tokens with its image "
                 f"patches, longer than --seq_len {settings['seq_len']}; raise it")
  pixels = [pixels_of(source, base_dir, settings) for source in sources]
  return tokenized, np.stack(pixels) if pixels else np.zeros(
      (0, settings["image_size"], settings["image_size"], 3), np.uint8)


def pixels_of(source, base_dir: Path, settings: Settings) -> np.ndarray:
  """A path or data: URL (decoded), or a TFDS example's pixels -> uint8 [size, size, 3]; a
  path's BadImage names it."""
  if isinstance(source, np.ndarray):
    return images.array_image(source, settings["image_size"], settings["max_image_pixels"])
  data = images.source_bytes(source, base_dir)
  try:
    return images.decode_image(data, settings["image_size"], settings["max_image_pixels"])
  except images.BadImage as bad:
    if images.is_data_url(source):
      raise
    raise images.BadImage(bad.reason, f"{base_dir / source}: {bad}") from None


def rows_of(unit, tfds_fields: tfds_images.Fields):
  """(line or TFDS index, row or BadRow, the bytes its key hashes) of one work item."""
  if isinstance(unit, tfds_images.Unit):
    for index, row in tfds_images.rows(unit, tfds_fields):
      yield index, row, f"{unit.spec}[{index}]".encode()
    return
  for line, row in prepare_chat.read_rows(unit):
    yield line, row, None


def record_of(example, fields: records.Fields, max_images: int) -> dict[str, np.ndarray]:
  """One conversation padded to its fields: segment 1, positions from 0, images zero-padded."""
  tokenized, pixels = example
  length = len(tokenized.tokens)
  arrays = records.empty_record(fields)
  arrays["tokens"][:length] = tokenized.tokens
  arrays["segment_ids"][:length] = 1
  arrays["positions"][:length] = np.arange(length)
  arrays["loss_mask"][:length] = tokenized.loss_mask
  if max_images == 1:
    arrays["image"][:] = pixels[0] if len(pixels) else 0
  else:
    arrays["image"][:len(pixels)] = pixels
  return arrays


def image_count(row) -> int:
  """The images a row names, however malformed the rest of it."""
  if not isinstance(row, dict):
    return 0
  if "image" in row:
    return len(row["image"]) if isinstance(row["image"], list) else 1
  messages = row.get("messages") if isinstance(row.get("messages"), list) else []
  return sum(isinstance(part, dict) and part.get("type") == "image_url"
             for message in messages if isinstance(message, dict)
             and isinstance(message.get("content"), list) for part in message["content"])


class ExamplesOfFile(beam.DoFn):
  """(path, part or None) -> (key, part, example); bad rows -> DEAD_LETTER JSON lines."""

  def __init__(self, model_proto: bytes, bos_id: int, settings: Settings, seed: int,
               tfds_fields: tfds_images.Fields = tfds_images.CAPTIONS):
    self._model_proto, self._bos_id, self._settings, self._seed = (model_proto, bos_id,
                                                                    settings, seed)
    self._tfds_fields = tfds_fields

  def setup(self):
    self._tokenizer = spm.SentencePieceProcessor(model_proto=self._model_proto)

  def process(self, unit_and_part):
    unit, part = unit_and_part
    path = unit.spec if isinstance(unit, tfds_images.Unit) else unit
    rows = 0
    for line, row, key_bytes in rows_of(unit, self._tfds_fields):
      rows += 1
      stage_report.count(STAGE, "rows_in")
      stage_report.count(STAGE, "images_in", image_count(row))
      try:
        if isinstance(row, BadRow):
          raise row
        example = example_of_row(row, Path(path).parent, self._tokenizer, self._bos_id,
                                 self._settings)
      except (BadRow, images.BadImage) as bad:
        stage_report.count(STAGE, f"dropped:{bad.reason}")
        yield beam.pvalue.TaggedOutput(DEAD_LETTER, prepare_chat.dead_letter_line(path, line, bad))
        continue
      stage_report.count(STAGE, "images_out", len(example[1]))
      row_bytes = key_bytes or json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")
      yield documents.document_key(row_bytes, self._seed), part, example
    if not isinstance(unit, tfds_images.Unit):
      stage_report.count_file(STAGE, rows)


def write_shard(bucket, output_dir: str, fields: records.Fields, max_images: int,
                num_shards: dict[str, int]):
  """One bucket, in key order (reruns write the same shard) -> one shard; yields
  (part, shard name, records, tokens, supervised tokens)."""
  (part, index), keyed = bucket
  examples = tokenized_split.in_key_order(keyed)
  name = tokenized_split.shard_name(part, index, num_shards[part])
  writer = ArrayRecordWriter(FileSystems.join(output_dir, name), tokenized_split.WRITER_OPTIONS)
  for example in examples:
    writer.write(records.encode_record(record_of(example, fields, max_images), fields))
  writer.close()
  yield (part, name, len(examples), sum(len(t.tokens) for t, _ in examples),
         sum(int(t.loss_mask.sum()) for t, _ in examples))


def split_entries(shards: list) -> dict:
  splits = {}
  for split in records.SPLITS:
    mine = [s for s in shards if s[0] == split]
    splits[split] = {"documents": sum(s[2] for s in mine), "sequences": sum(s[2] for s in mine),
                     "tokens": sum(s[3] for s in mine),
                     "supervised_tokens": sum(s[4] for s in mine),
                     "shards": sorted(s[1] for s in mine)}
  return splits


def write_manifest(unused_element, *, output_dir: str, fields: records.Fields,
                   tokenizer: dict, vision: dict, settings: dict, shards: list) -> None:
  del unused_element
  dataset_manifest.write_manifest(output_dir, {
      "format": records.RECORD_FORMAT, "kind": "image_chat", "seq_len": settings["seq_len"],
      "fields": records.manifest_fields(fields), "tokenizer": tokenizer, "vision": vision,
      "splits": split_entries(shards), "settings": settings,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})


def build_report(manifest: dict, totals: dict[str, int], seconds: float) -> dict:
  """totals: the run's `images:` counters."""
  prefix = f"{STAGE}:dropped:"
  dropped = {name[len(prefix):]: n for name, n in sorted(totals.items())
             if name.startswith(prefix)}
  files_in, empty_files = stage_report.files_read(totals)
  return {"files_in": files_in, "empty_files": empty_files,
          "rows_in": totals.get(f"{STAGE}:rows_in", 0),
          "examples_out": {name: s["documents"] for name, s in manifest["splits"].items()},
          "images_in": totals.get(f"{STAGE}:images_in", 0),
          "images_out": totals.get(f"{STAGE}:images_out", 0),
          "dead_letters": sum(dropped.values()), "dead_letters_by_reason": dropped,
          "seconds": round(seconds, 2)}


def report_markdown(manifest: dict) -> str:
  report = manifest["report"]
  reasons = ", ".join(f"{r} {n:,}" for r, n in report["dead_letters_by_reason"].items())
  lines = [(f"image chat data from {stage_report.plural(report['files_in'], 'file')} "
            f"({report['empty_files']:,} empty); rows in {report['rows_in']:,}; images in "
            f"{report['images_in']:,}, out {report['images_out']:,}"),
           (f"dead letters: {report['dead_letters']:,} ({stage_report.DEAD_LETTER_NAME}): "
            f"{reasons or 'none'}"), "",
           "| split | conversations | tokens | supervised tokens | shards |",
           "|---|---:|---:|---:|---:|"]
  for name, split in manifest["splits"].items():
    lines.append(f"| {name} | {split['documents']:,} | {split['tokens']:,} | "
                 f"{split['supervised_tokens']:,} | {len(split['shards'])} |")
  vision = manifest["vision"]
  lines += ["", (f"images {vision['image_size']}px, {vision['num_patches']} patches each; "
                 f"seq_len {manifest['seq_len']}; {report['seconds']:.1f}s")]
  return "\n".join(lines) + "\n"


def check_settings(settings: Settings, validation_fraction: float, seed: int = 0) -> None:
  size, patch = settings["image_size"], settings["patch_size"]
  if size < 1 or patch < 1 or size % patch:
    raise ValueError(f"--image_size {size} must be a positive multiple of --patch_size {patch}")
  if settings["max_images"] < 1:
    raise ValueError(f"--max_images must be at least 1, got {settings['max_images']}")
  records.check_seq_len_and_seed(settings["seq_len"], seed, least=2)
  if settings.num_patches >= settings["seq_len"]:
    raise ValueError(f"--image_size {size} / --patch_size {patch} makes {settings.num_patches} "
                     f"patches per image, which leave no room for text in --seq_len "
                     f"{settings['seq_len']}; raise --seq_len or --patch_size, or lower "
                     "--image_size")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")


def check_image_token(tokenizer: prepare_chat.Tokenizer, directory: str) -> int:
  sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
  token = chat_template.IMAGE_TOKEN
  if sp.encode(token) != [sp.piece_to_id(token)]:
    raise ValueError(f"--tokenizer {directory} does not hold {token} as one piece; use one "
                     "trained by beam_pipelines.prepare_text")
  return sp.piece_to_id(token)


def work_items(inputs: list[str], validation_inputs: list[str]) -> tuple[list, int]:
  """([(file path or tfds_images.Unit, its part or None for a hash split)], file bytes)."""
  globs = [i for i in inputs if not tfds_images.is_spec(i)]
  validation_globs = [i for i in validation_inputs if not tfds_images.is_spec(i)]
  files, total_bytes = prepare_chat.input_files(globs, validation_globs)
  train_part = "train" if validation_inputs else None  # None: split by hash
  files = [(path, part if part == "validation" else train_part) for path, part in files]
  for specs, part in ((inputs, train_part), (validation_inputs, "validation")):
    files += [(unit, part) for spec in specs if tfds_images.is_spec(spec)
              for unit in tfds_images.units(spec)]
  return files, total_bytes


def run(inputs: list[str], output_dir: str, *, tokenizer: str, image_size: int,
        patch_size: int = 8, seq_len: int = 128, max_images: int = 1,
        max_image_pixels: int | None = None, validation_inputs: list[str] = (),
        validation_fraction: float = 0.01, seed: int = 0, num_shards: int = 0,
        overwrite: bool = False, beam_args: list[str] | None = None,
        tfds_fields: tfds_images.Fields = tfds_images.CAPTIONS,
        remove_stale_staging: bool = False) -> dict:
  """Runs the pipeline to completion and returns the manifest it wrote."""
  start = time.perf_counter()
  settings = Settings(image_size=image_size, patch_size=patch_size, max_images=max_images,
                      max_image_pixels=max_image_pixels, seq_len=seq_len)
  check_settings(settings, validation_fraction, seed)
  prepare_text.check_output_dir(output_dir, overwrite)
  files, total_bytes = work_items(list(inputs), list(validation_inputs))
  chat_tokenizer = prepare_chat.Tokenizer(tokenizer)
  image_id = check_image_token(chat_tokenizer, tokenizer)
  train_shards = num_shards or prepare_text.shards_for_bytes(total_bytes)
  shards = {"train": train_shards,
            "validation": max(1, math.ceil(train_shards * validation_fraction))}
  fields = fields_of(seq_len, image_size, max_images)
  vision = {"image_size": image_size, "patch_size": patch_size,
            "num_patches": settings.num_patches, "image_token_id": image_id,
            "max_images": max_images}
  recorded = {**settings, "inputs": list(inputs), "validation_inputs": list(validation_inputs),
              "validation_fraction": validation_fraction, "seed": seed,
              "tokenizer_dir": str(tokenizer)}
  prepare_text.report_stale_staging(output_dir, remove_stale_staging)
  with staging.staged(output_dir) as staged:
    logger.info("image rows from %d files (%.1f MB); staging in %s", len(files),
                total_bytes / 1e6, staged)
    dataset_manifest.write_atomically(FileSystems.join(staged, records.TOKENIZER_NAME),
                                      chat_tokenizer.model_proto)
    pipeline = beam.Pipeline(options=prepare_text.pipeline_options(beam_args))
    examples = (pipeline
                | "Files" >> beam.Create(files)
                | "Examples" >> beam.ParDo(ExamplesOfFile(
                    chat_tokenizer.model_proto, chat_tokenizer.entry["bos_id"], settings,
                    seed, tfds_fields)).with_outputs(DEAD_LETTER, main="examples"))
    prepare_text.write_line_files(examples[DEAD_LETTER] | "NameDeadLetters" >> beam.Map(
        lambda line: (stage_report.DEAD_LETTER_NAME, line)), staged)
    bounds = examples.examples | "KeyBounds" >> beam.CombineGlobally(documents.KeyBounds())
    written = (examples.examples
               | "Parts" >> beam.Map(prepare_chat.part_of, validation_fraction,
                                     beam.pvalue.AsSingleton(bounds))
               | "Buckets" >> beam.Map(prepare_chat.bucketed, shards)
               | "GroupIntoBuckets" >> beam.GroupByKey()
               | "Write" >> beam.FlatMap(write_shard, staged, fields, max_images, shards))
    _ = (pipeline
         | "Once" >> beam.Create([None])
         | "WriteManifest" >> beam.Map(
             write_manifest, output_dir=staged, fields=fields, tokenizer=chat_tokenizer.entry,
             vision=vision, settings=recorded, shards=beam.pvalue.AsList(written)))
    manifest, table = stage_report.finish_staged(staged, output_dir, pipeline.run(), start,
                                                 build_report, report_markdown)
    prepare_text.check_output_dir(output_dir, overwrite)
  print(f"prepared {output_dir}\n{table}", flush=True)
  return manifest


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0], allow_abbrev=False,
      epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="comma-separated globs of image rows "
                      "and tfds:NAME[/CONFIG][:SPLIT] splits")
  parser.add_argument("--tokenizer", required=True,
                      help="a data dir of prepare_text or a run dir of maxlm.train")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--image_size", type=int, required=True)
  parser.add_argument("--patch_size", type=int, default=8,
                      help="the ViT's patch side; each image takes (size/patch)^2 positions")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--max_images", type=int, default=1, help="images per row at most")
  parser.add_argument("--max_image_pixels", type=int, default=None,
                      help="width*height above which an image is a decompression bomb "
                      "(default Pillow's limit)")
  parser.add_argument("--validation_input", default="",
                      help="comma-separated globs of held-out rows (default: a hash split)")
  parser.add_argument("--validation_fraction", type=float, default=0.01)
  parser.add_argument("--num_shards", type=int, default=0,
                      help="train shards; 0 = one per 256 MiB of input")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tfds_image_key", default="image", help="TFDS inputs: the image feature")
  parser.add_argument("--tfds_text_key", default=None,
                      help="TFDS inputs: the text feature (default caption, else label: a class "
                      "label becomes its name)")
  parser.add_argument("--tfds_question", default=None,
                      help="TFDS inputs: a user question the text answers (default: the text "
                      "is a caption)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --output_dir whole")
  parser.add_argument("--remove_stale_staging", action="store_true",
                      help="remove the staging dirs (--output_dir.tmp-*) of earlier runs whose "
                           "process is gone")
  return staging.parse_flags(parser, argv, "prepare_images")


def main(argv: list[str] | None = None) -> None:
  flags, beam_args = parse_flags(argv)
  staging.log_to_stderr()
  staging.run_until_stopped("prepare_images", flags.output_dir, lambda: run(
      prepare_chat.globs(flags.input), flags.output_dir, tokenizer=flags.tokenizer,
      image_size=flags.image_size, patch_size=flags.patch_size, seq_len=flags.seq_len,
      max_images=flags.max_images, max_image_pixels=flags.max_image_pixels,
      validation_inputs=prepare_chat.globs(flags.validation_input),
      validation_fraction=flags.validation_fraction, seed=flags.seed,
      num_shards=flags.num_shards, overwrite=flags.overwrite, beam_args=beam_args,
      tfds_fields=tfds_images.Fields(flags.tfds_image_key, flags.tfds_text_key,
                                     flags.tfds_question),
      remove_stale_staging=flags.remove_stale_staging))


if __name__ == "__main__":
  main()
