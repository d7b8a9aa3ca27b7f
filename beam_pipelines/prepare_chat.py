"""Chat (SFT) or preference rows -> tokenized, masked, packed ArrayRecord + manifest + report.

  python -m beam_pipelines.prepare_chat --input='chats/*.jsonl' --tokenizer=runs/tiny \\
      --output_dir=/tmp/chat --seq_len=256

Rows (JSONL, .jsonl.gz or Parquet), detected one by one:
  SFT         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
              {"prompt": str, "completion": str}
  preference  {"prompt": str or messages, "chosen": str or messages, "rejected": str or messages}
One output dir holds one kind: --kind, or by default the kind of the first row that has one;
rows of the other kind go to the dead letters as `other_kind`, like every row that cannot
train (bad JSON or types, an unknown role, turn markers in content, no assistant turn, longer
than --seq_len; for a pair, its shared prompt plus both replies). --truncate keeps, of an SFT
conversation too long, its longest run of whole turns from the start that ends with an
assistant reply; preference pairs are never cut. A preference record holds each pair as one
segment, prompt once: fields tokens, segment_ids, positions, loss_mask and branch_ids (0 the
shared prefix, 1 the chosen reply, 2 the rejected one; see `chat_examples`).
--tokenizer is a data dir (its manifest's tokenizer block is copied) or a run dir; records
use that tokenizer unchanged. Held-out rows: --validation_input files, else a hash split of
rows by --validation_fraction. As prepare_text: a staging dir renamed into place (or, when no
train sequence comes out, kept with only its reports and named in the error), --overwrite,
--remove_stale_staging, dead_letter.jsonl, report.md, and flags this module does not know are
Beam pipeline options (a flag Beam does not know either exits 2).
"""

import argparse
import datetime
import hashlib
import itertools
import json
import logging
import math
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.io.filesystems import FileSystems
from array_record.python.array_record_module import ArrayRecordWriter

from beam_pipelines import chat_examples
from beam_pipelines import chat_report
from beam_pipelines import dataset_manifest
from beam_pipelines import documents
from beam_pipelines import prepare_text
from beam_pipelines import reading
from beam_pipelines import sources
from beam_pipelines import staging
from beam_pipelines import records
from beam_pipelines import stage_report
from beam_pipelines import tokenized_split
from beam_pipelines.chat_examples import BadRow

logger = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"
STATS = "stats"
MAX_ROW_BYTES = 16 << 20
SNIFF_ROWS = 100
LOG_EVERY_ROWS = 20_000


def read_rows(path: str, max_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, object]]:
  """(1-based line or row, parsed JSON value or BadRow) of one JSONL(.gz) or Parquet file."""
  try:
    with reading.open_binary(path) as f:
      if reading.is_parquet(path):
        yield from _parquet_rows(f)
      else:
        yield from _jsonl_rows(f, max_bytes)
  except EOFError as e:  # a .gz cut short
    yield 0, BadRow("unreadable", f"the file is truncated ({e}); copy or compress it again")
  except (OSError, zlib.error, ValueError) as e:  # pyarrow's ArrowInvalid: ValueError
    yield 0, BadRow("unreadable", f"cannot read the file ({e}); check that it is JSONL, "
                    ".jsonl.gz or Parquet")


def _jsonl_rows(f, max_bytes: int):
  for number, line in enumerate(iter(lambda: f.readline(max_bytes + 1), b""), 1):
    if len(line) > max_bytes and not line.endswith(b"\n"):
      while (rest := f.readline(reading.READ_CHUNK)) and not rest.endswith(b"\n"):
        pass
      yield number, BadRow("row_too_large", f"the line is over {max_bytes} bytes; split it")
    elif line.strip():
      yield number, _parse_json(line)


def _parse_json(line: bytes):
  try:
    return json.loads(line.decode("utf-8"))
  except UnicodeDecodeError:
    return BadRow("invalid_utf8", "the line is not UTF-8; re-encode the file as UTF-8")
  except ValueError as e:
    return BadRow("malformed_json", f"the line is not JSON ({e}); fix or drop it")
  except RecursionError:
    return BadRow("malformed_json", "the line nests arrays or objects deeper than Python's "
                  "JSON parser goes; flatten it or drop it")


def _parquet_rows(f):
  """A Parquet file's rows as JSON-like dicts. One schema holds every row, so a row has null
  in the columns of the other row formats (a file mixing `messages` rows with `prompt` +
  `completion` ones): a null field is left out, as a JSONL row would not have it."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = itertools.chain.from_iterable(
      batch.to_pylist() for batch in pq.ParquetFile(f).iter_batches(reading.PARQUET_BATCH_ROWS))
  yield from enumerate(({key: value for key, value in row.items() if value is not None}
                        for row in rows), 1)


def sniff_kind(paths: list[str]) -> str:
  """The kind of the first row (of the first rows of each file) that has one; else why none
  has, naming an unreadable file where there is one."""
  unreadable, rows = [], 0
  for path in paths:
    for _, row in itertools.islice(read_rows(path), SNIFF_ROWS):
      rows += 1
      if isinstance(row, BadRow) and row.reason == "unreadable":
        unreadable.append((path, row))
      try:
        return chat_examples.kind_of(row)
      except BadRow:
        continue
  if unreadable:
    path, bad = unreadable[0]
    others = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
    raise ValueError(f"--input file {path}{others} is unreadable, so no SFT or preference row "
                     f"was found: {bad}")
  if not rows:
    raise ValueError(f"no --input file holds a row ({len(paths)} read, all empty); check the "
                     "globs")
  raise ValueError(f"none of the first {SNIFF_ROWS} rows of each --input file is an SFT or "
                   "preference row; see `python -m beam_pipelines.prepare_chat --help`")


def kind_label(row) -> str:
  """The row's kind for the report, or `unrecognized`."""
  try:
    return chat_examples.kind_of(row)
  except BadRow:
    return "unrecognized"


def dead_letter_line(path: str, line: int, bad: BadRow) -> str:
  return json.dumps({"file": path, "line": line, "reason": bad.reason, "detail": str(bad)})


class ExamplesOfFile(beam.DoFn):
  """(path, part or None) -> (key, part, Example); bad rows -> DEAD_LETTER JSON lines.

  The key is a stable hash of the row, so equal rows land in the same split and shard.
  """

  def __init__(self, kind: str, model_proto: bytes, bos_id: int, seq_len: int, truncate: bool,
               seed: int):
    self._kind, self._model_proto, self._bos_id = kind, model_proto, bos_id
    self._seq_len, self._truncate, self._seed = seq_len, truncate, seed

  def setup(self):
    self._tokenizer = spm.SentencePieceProcessor(model_proto=self._model_proto)
    self._rows = 0

  def process(self, path_and_part):
    path, part = path_and_part
    rows = 0
    for line, row in read_rows(path):
      rows += 1
      self._log_progress()
      stage_report.count("chat", f"rows_in:{kind_label(row)}")
      try:
        if isinstance(row, BadRow):
          raise row
        example = chat_examples.example_of_row(row, self._kind, self._tokenizer, self._bos_id,
                                               self._seq_len, self._truncate)
      except BadRow as bad:
        stage_report.count("chat", f"dropped:{bad.reason}")
        yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter_line(path, line, bad))
        continue
      stage_report.count("chat", "truncated_turns", example.truncated)
      # Fields the example does not read still key the row: a lone surrogate, or a Parquet
      # column's bytes or timestamps.
      row_bytes = json.dumps(row, sort_keys=True, ensure_ascii=False, default=repr).encode(
          "utf-8", "surrogatepass")
      yield documents.document_key(row_bytes, self._seed), part, example
    stage_report.count_file("chat", rows)

  def _log_progress(self):
    self._rows += 1
    if self._rows % LOG_EVERY_ROWS == 0:
      logger.info("read and tokenized %d rows so far", self._rows)


def part_of(keyed, validation_fraction: float, bounds) -> tuple:
  """((part, bucket key), Example); the part of a --validation_input file is fixed."""
  key, part, example = keyed
  if part is None:
    part = ("validation" if documents.split_of(key, validation_fraction, bounds)
            == documents.VALIDATION else "train")
  return part, (key, example)


def bucketed(part_and_example, num_shards: dict[str, int]):
  part, (key, example) = part_and_example
  return (part, key % num_shards[part]), (key, example)


def pack_and_write(bucket, output_dir: str, seq_len: int, kind: str,
                   num_shards: dict[str, int]):
  """Packs one bucket (in key order, so reruns write the same shard) into one shard; yields
  (part, shard name, sequences) and a (part, ChatStats) STATS output."""
  (part, index), keyed = bucket
  examples = tokenized_split.in_key_order(keyed)
  name = tokenized_split.shard_name(part, index, num_shards[part])
  fields = chat_examples.fields_of_kind(kind, seq_len)
  writer = ArrayRecordWriter(FileSystems.join(output_dir, name), tokenized_split.WRITER_OPTIONS)
  count = 0
  for row in chat_examples.pack(examples, seq_len):
    writer.write(records.encode_record(chat_examples.record_arrays(row, kind), fields))
    count += 1
  writer.close()
  yield part, name, count
  yield beam.pvalue.TaggedOutput(STATS, (part, chat_report.stats_of(examples)))


def write_manifest(unused_element, *, output_dir: str, kind: str, seq_len: int,
                   tokenizer: dict, settings: dict, stats: dict, shards: list) -> None:
  """The pipeline's last step: manifest.json without its report (the driver adds it)."""
  del unused_element
  splits = {split: chat_report.split_entry(stats.get(split), [
      (name, count) for part, name, count in shards if part == split])
            for split in records.SPLITS}
  train = stats.get("train")
  dataset_manifest.write_manifest(output_dir, {
      "format": records.RECORD_FORMAT, "kind": kind, "seq_len": seq_len,
      "fields": records.manifest_fields(chat_examples.fields_of_kind(kind, seq_len)),
      "tokenizer": tokenizer, "splits": splits,
      "unigram_entropy_nats": dataset_manifest.unigram_entropy(
          train.histogram if train else np.zeros(0)),
      "settings": settings,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})


class Tokenizer:
  """The model proto of `--tokenizer` and the manifest block describing it."""

  def __init__(self, directory: str):
    root = Path(directory)
    manifest_path = root / records.MANIFEST_NAME
    if manifest_path.exists():  # a data dir: its block, unchanged
      self.entry = json.loads(manifest_path.read_text())["tokenizer"]
    else:  # a run dir: its tokenizer.model, described afresh
      self.entry = None
    path = root / (self.entry or {}).get("file", records.TOKENIZER_NAME)
    if not path.is_file():
      raise ValueError(f"--tokenizer {directory} holds no {path.name}; pass a data dir of "
                       "beam_pipelines.prepare_text or a run dir of maxlm.train")
    self.model_proto = path.read_bytes()
    sha256 = hashlib.sha256(self.model_proto).hexdigest()
    if self.entry is None:
      self.entry = dataset_manifest.tokenizer_entry(
          self.model_proto, "unknown", list(records.RESERVED_TOKENS))
    elif self.entry.get("sha256") != sha256:
      raise ValueError(f"--tokenizer {directory}: {path.name} does not match the manifest's "
                       "sha256; re-run the pipeline that wrote that directory")
    self.entry["file"] = records.TOKENIZER_NAME
    self._check_renders_chats(directory)

  def _check_renders_chats(self, directory: str) -> None:
    tokenizer = spm.SentencePieceProcessor(model_proto=self.model_proto)
    try:
      chat_examples.tokenize((("user", "hi"), ("assistant", "hello")), tokenizer, 0)
    except BadRow as e:
      raise ValueError(f"--tokenizer {directory}: {e}") from None


def build_pipeline(pipeline: beam.Pipeline, files: list[tuple[str, str | None]], *,
                   output_dir: str, kind: str, tokenizer: Tokenizer, seq_len: int,
                   truncate: bool, seed: int, validation_fraction: float,
                   num_shards: dict[str, int], settings: dict) -> None:
  examples = (pipeline
              | "Files" >> beam.Create(files)
              | "Examples" >> beam.ParDo(ExamplesOfFile(
                  kind, tokenizer.model_proto, tokenizer.entry["bos_id"], seq_len, truncate,
                  seed)).with_outputs(DEAD_LETTER, main="examples"))
  prepare_text.write_line_files(examples[DEAD_LETTER] | "NameDeadLetters" >> beam.Map(
      lambda line: (stage_report.DEAD_LETTER_NAME, line)), output_dir)
  bounds = examples.examples | "KeyBounds" >> beam.CombineGlobally(documents.KeyBounds())
  written = (examples.examples
             | "Parts" >> beam.Map(part_of, validation_fraction, beam.pvalue.AsSingleton(bounds))
             | "Buckets" >> beam.Map(bucketed, num_shards)
             | "GroupIntoBuckets" >> beam.GroupByKey()
             | "PackAndWrite" >> beam.FlatMap(pack_and_write, output_dir, seq_len, kind,
                                              num_shards).with_outputs(STATS, main="shards"))
  stats = written[STATS] | "SumStats" >> beam.CombinePerKey(chat_report.sum_stats)
  _ = (pipeline
       | "Once" >> beam.Create([None])
       | "WriteManifest" >> beam.Map(
           write_manifest, output_dir=output_dir, kind=kind, seq_len=seq_len,
           tokenizer=tokenizer.entry, settings=settings, stats=beam.pvalue.AsDict(stats),
           shards=beam.pvalue.AsList(written.shards)))


def check_settings(output_dir: str, seq_len: int, validation_fraction: float, kind: str,
                   num_shards: int, seed: int = 0) -> None:
  if not output_dir:
    raise ValueError("--output_dir is empty; name the directory to write")
  records.check_seq_len_and_seed(seq_len, seed, least=2)
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
  if kind not in ("auto", *chat_examples.KINDS):
    raise ValueError(f"--kind must be auto, sft or preference, got {kind!r}")
  if num_shards < 0:
    raise ValueError(f"--num_shards must be 0 (one per 256 MiB of input) or more, got "
                     f"{num_shards}")


def input_files(inputs: list[str], validation_inputs: list[str]) -> tuple[list, int]:
  """([(path, its part, or None for a hash split)], input bytes)."""
  train = sources.match_files(inputs)
  validation = sources.match_files(validation_inputs) if validation_inputs else {}
  if both := sorted(train.keys() & validation.keys()):
    raise ValueError(f"{both[0]} is both an --input and a --validation_input file; list it once")
  train_part = "train" if validation else None  # None: split by hash
  files = [(path, train_part) for path in sorted(train)]
  files += [(path, "validation") for path in sorted(validation)]
  return files, sum(train.values()) + sum(validation.values())


def run(inputs: list[str], output_dir: str, *, tokenizer: str, seq_len: int,
        validation_inputs: list[str] = (), validation_fraction: float = 0.01,
        kind: str = "auto", truncate: bool = False, seed: int = 0, num_shards: int = 0,
        overwrite: bool = False, beam_args: list[str] | None = None,
        remove_stale_staging: bool = False) -> dict:
  """Runs the pipeline to completion and returns the manifest it wrote."""
  start = time.perf_counter()
  check_settings(output_dir, seq_len, validation_fraction, kind, num_shards, seed)
  prepare_text.check_output_dir(output_dir, overwrite)
  files, total_bytes = input_files(inputs, list(validation_inputs))
  kind = sniff_kind([path for path, _ in files]) if kind == "auto" else kind
  chat_tokenizer = Tokenizer(tokenizer)
  train_shards = num_shards or prepare_text.shards_for_bytes(total_bytes)
  shards = {"train": train_shards,
            "validation": max(1, math.ceil(train_shards * validation_fraction))}
  settings = {"inputs": list(inputs), "validation_inputs": list(validation_inputs),
              "validation_fraction": validation_fraction, "truncate": truncate, "seed": seed,
              "tokenizer_dir": str(tokenizer)}
  prepare_text.report_stale_staging(output_dir, remove_stale_staging)
  with staging.staged(output_dir) as staged:
    logger.info("%s rows from %d files (%.1f MB); staging in %s", kind, len(files),
                total_bytes / 1e6, staged)
    dataset_manifest.write_atomically(FileSystems.join(staged, records.TOKENIZER_NAME),
                                      chat_tokenizer.model_proto)
    pipeline = beam.Pipeline(options=prepare_text.pipeline_options(beam_args))
    build_pipeline(pipeline, files, output_dir=staged, kind=kind, tokenizer=chat_tokenizer,
                   seq_len=seq_len, truncate=truncate, seed=seed,
                   validation_fraction=validation_fraction, num_shards=shards,
                   settings=settings)
    manifest, table = stage_report.finish_staged(
        staged, output_dir, pipeline.run(), start, chat_report.build_report,
        chat_report.report_markdown)
    prepare_text.check_output_dir(output_dir, overwrite)
  print(f"prepared {output_dir}\n{table}", flush=True)
  return manifest


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0], allow_abbrev=False,
      epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="comma-separated globs of training rows")
  parser.add_argument("--tokenizer", required=True,
                      help="a data dir of prepare_text or a run dir of maxlm.train")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--seq_len", type=int, required=True)
  parser.add_argument("--validation_input", default="",
                      help="comma-separated globs of held-out rows (default: a hash split)")
  parser.add_argument("--validation_fraction", type=float, default=0.01)
  parser.add_argument("--kind", default="auto", help="auto, sft or preference")
  parser.add_argument("--truncate", action="store_true",
                      help="cut SFT conversations longer than --seq_len to whole turns")
  parser.add_argument("--num_shards", type=int, default=0,
                      help="train shards; 0 = one per 256 MiB of input")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --output_dir whole")
  parser.add_argument("--remove_stale_staging", action="store_true",
                      help="remove the staging dirs (--output_dir.tmp-*) of earlier runs whose "
                           "process is gone")
  return staging.parse_flags(parser, argv, "prepare_chat")


def globs(flag: str) -> list[str]:
  return [glob.strip() for glob in flag.split(",") if glob.strip()]


def main(argv: list[str] | None = None) -> None:
  flags, beam_args = parse_flags(argv)
  staging.log_to_stderr()
  staging.run_until_stopped("prepare_chat", flags.output_dir, lambda: run(
      globs(flags.input), flags.output_dir, tokenizer=flags.tokenizer, seq_len=flags.seq_len,
      validation_inputs=globs(flags.validation_input),
      validation_fraction=flags.validation_fraction, kind=flags.kind, truncate=flags.truncate,
      seed=flags.seed, num_shards=flags.num_shards, overwrite=flags.overwrite,
      beam_args=beam_args, remove_stale_staging=flags.remove_stale_staging))


if __name__ == "__main__":
  main()
