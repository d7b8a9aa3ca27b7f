"""Raw text -> clean, deduplicated, tokenized, packed ArrayRecord shards + manifest + report.

  python -m beam_pipelines.prepare_text --input='data/**/*.txt,more/*.jsonl.gz' \\
      --output_dir=/tmp/dataset --vocab_size=4096 --seq_len=256
  python -m beam_pipelines.prepare_text --source='web:3=crawl/*.parquet' \\
      --source='code:1:code=src/**/*.py' --source='reviews=tfds:imdb_reviews:train' ...

Stages (each on by default, each with a --no_* flag): read (dead letters for bad input),
normalize, quality heuristics, language ID, PII scrubbing, exact and near-duplicate removal,
SentencePiece training, tokenize, pack, write per-source train shards. The run writes into a
temporary directory beside --output_dir and renames it into place when complete; SIGINT or
SIGTERM stops it (exit 130 or 143) and removes that directory, and those of earlier runs that
were killed outright are named at the start (--remove_stale_staging removes them). A run that
makes no train sequence exits 2 naming what it dropped, and keeps of that directory only the
dead letters and the report, for the user to read. Flags this module does not know are Beam
pipeline options (e.g. --runner=DataflowRunner --project=...); a flag Beam does not know either
exits 2.
"""

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import cleaning
from beam_pipelines import dataset_manifest
from beam_pipelines import dedup
from beam_pipelines import documents
from beam_pipelines import langid
from beam_pipelines import pii
from beam_pipelines import quality
from beam_pipelines import reading
from beam_pipelines import records
from beam_pipelines import sources as sources_lib
from beam_pipelines import stage_report
from beam_pipelines import staging
from beam_pipelines import tokenized_split
from beam_pipelines import tokenizer_training
from beam_pipelines.quality import QualityThresholds
from beam_pipelines.sources import Source
from maxlm import tokenizer as tokenizer_lib

logger = logging.getLogger(__name__)

BYTES_PER_TRAIN_SHARD = 256 << 20
MAX_AUTO_SHARDS = 1024


@dataclasses.dataclass(frozen=True)
class StageFlags:
  """Which optional stages run, and their settings."""
  normalize: bool = True
  quality: bool = True
  langid: bool = True
  pii: bool = True
  exact_dedup: bool = True
  near_dedup: bool = True
  near_dup_threshold: float = 0.8
  languages: tuple[str, ...] = ("en",)
  min_language_score: float = 0.5
  max_document_bytes: int = 16 << 20
  quality_thresholds: QualityThresholds = QualityThresholds()
  tokenizer_type: str = "bpe"
  special_tokens: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  sources: list[Source]
  output_dir: str
  vocab_size: int
  seq_len: int
  validation_fraction: float
  seed: int
  train_shards: dict[str, int]  # per source
  validation_shards: int
  spm_sample_docs: int
  spm_sample_bytes: int
  stages: StageFlags
  langid_model: str | None = None  # unpacked by the launcher for local workers
  tokenizer: dataset_manifest.TokenizerFile | None = None  # given: tokenize with it, train none

  def special_tokens(self) -> list[str]:
    """PII placeholders (when scrubbing), the reserved chat/image tokens, then the user's."""
    placeholders = list(pii.PLACEHOLDERS) if self.stages.pii else []
    reserved = placeholders + list(records.RESERVED_TOKENS)
    return reserved + [t for t in self.stages.special_tokens if t not in reserved]

  def settings(self) -> dict:
    """What the manifest records about how the data was made."""
    return {"sources": [dataclasses.asdict(s) for s in self.sources],
            "stages": dataclasses.asdict(self.stages), "vocab_size": self.vocab_size,
            "validation_fraction": self.validation_fraction, "seed": self.seed,
            "tokenizer_type": (self.stages.tokenizer_type if self.tokenizer is None
                               else f"given {self.tokenizer.name}"),
            "special_tokens": self.special_tokens()}


def cleaned_documents(pipeline: beam.Pipeline, config: PrepareConfig, units):
  """(cleaned, deduplicated Documents, dead-letter lines, [duplicate lines per dedup stage])."""
  stages = config.stages
  read = (pipeline
          | "Units" >> beam.Create(units)
          | "Read" >> beam.ParDo(cleaning.ReadDocuments(stages.max_document_bytes)).with_outputs(
              cleaning.DEAD_LETTER, main="documents"))
  cleaning_config = cleaning.CleaningConfig(
      profiles={s.name: s.profile for s in config.sources}, normalize=stages.normalize,
      quality=stages.quality, langid=stages.langid, pii=stages.pii, languages=stages.languages,
      min_language_score=stages.min_language_score, thresholds=stages.quality_thresholds,
      seed=config.seed, langid_model=config.langid_model)
  docs = read.documents | "Clean" >> beam.ParDo(cleaning.CleanDocuments(cleaning_config))
  duplicates = []
  if stages.exact_dedup:
    exact = docs | "ExactDedup" >> dedup.ExactDedup()
    docs, duplicates = exact.documents, duplicates + [exact[dedup.DUPLICATES]]
  if stages.near_dedup:
    near = docs | "NearDedup" >> dedup.NearDedup(stages.near_dup_threshold, seed=config.seed)
    docs, duplicates = near.documents, duplicates + [near[dedup.DUPLICATES]]
  return docs, read[cleaning.DEAD_LETTER], duplicates


def write_line_files(lines_by_name, output_dir: str) -> None:
  """(file name, JSON line) pairs -> one JSONL file per name, lines sorted."""
  _ = (lines_by_name
       | "GroupLines" >> beam.GroupByKey()
       | "WriteLines" >> beam.Map(write_lines, output_dir))


def write_lines(name_and_lines: tuple[str, Iterable[str]], output_dir: str) -> None:
  name, lines = name_and_lines
  dataset_manifest.write_atomically(
      FileSystems.join(output_dir, name), "".join(f"{line}\n" for line in sorted(lines)).encode())


def part_of(document: documents.Document, validation_fraction: float, bounds) -> tuple:
  """(output part, document): `validation`, or `train-SOURCE`."""
  if documents.split_of(document.key, validation_fraction, bounds) == documents.VALIDATION:
    return "validation", document
  return f"train-{document.source}", document


def trained_tokenizer(sample: list[str], vocab_size: int, model_type: str,
                      special_tokens: tuple[str, ...]) -> list[dataset_manifest.TokenizerFile]:
  """The tokenizer trained on the sample; none from an empty one (no train documents), so the
  run ends and is refused with its counts rather than failing inside the pipeline."""
  if not sample:
    return []
  proto = tokenizer_training.train_tokenizer(sample, vocab_size, model_type, special_tokens)
  return [dataset_manifest.TokenizerFile(records.TOKENIZER_NAME, proto)]


def build_pipeline(pipeline: beam.Pipeline, config: PrepareConfig, units) -> None:
  docs, dead_letters, duplicates = cleaned_documents(pipeline, config, units)
  named_lines = [dead_letters | "NameDeadLetters" >> beam.Map(
      lambda line: (stage_report.DEAD_LETTER_NAME, line))]
  named_lines += [lines | f"NameDuplicates{i}" >> beam.Map(
      lambda line: (stage_report.DUPLICATES_NAME, line)) for i, lines in enumerate(duplicates)]
  write_line_files(named_lines | "AllLines" >> beam.Flatten(), config.output_dir)
  bounds = docs | "KeyBounds" >> beam.CombineGlobally(documents.KeyBounds())
  parts = docs | "Parts" >> beam.Map(part_of, config.validation_fraction,
                                     beam.pvalue.AsSingleton(bounds))
  if config.tokenizer is not None:
    tokenizer = beam.pvalue.AsSingleton(pipeline
                                        | "GivenTokenizer" >> beam.Create([config.tokenizer]))
  else:
    tokenizer = beam.pvalue.AsSingleton(
        parts
        | "TrainTexts" >> beam.FlatMap(lambda part: [part[1].text] if part[0] != "validation"
                                       else [])
        | "SampleForTokenizer" >> beam.CombineGlobally(tokenizer_training.HashSample(
            config.spm_sample_docs, config.spm_sample_bytes))
        | "TrainTokenizer" >> beam.FlatMap(
            trained_tokenizer, config.vocab_size, config.stages.tokenizer_type,
            tuple(config.special_tokens())), default_value=None)
  num_shards = {f"train-{name}": n for name, n in config.train_shards.items()}
  num_shards["validation"] = config.validation_shards
  written = parts | "TokenizePackWrite" >> tokenized_split.TokenizePackWrite(
      tokenizer=tokenizer, output_dir=config.output_dir, seq_len=config.seq_len,
      vocab_size=config.vocab_size, num_shards=num_shards)
  _ = (pipeline
       | "Once" >> beam.Create([None])
       | "WriteManifest" >> beam.Map(
           dataset_manifest.write_tokenizer_and_manifest,
           output_dir=config.output_dir, seq_len=config.seq_len, settings=config.settings(),
           tokenizer=tokenizer, parts=list(num_shards),
           weights={s.name: s.weight for s in config.sources},
           stats=beam.pvalue.AsDict(written["stats"]),
           shards=beam.pvalue.AsList(written["shards"])))


# Beam's default runner, and its DirectRunner too, first download the Prism runner from
# GitHub and run the pipeline there when they can; the FnApiRunner is the in-process runner
# the DirectRunner falls back to for batch pipelines, with nothing fetched.
LOCAL_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: list[str] | None) -> PipelineOptions:
  """`beam_args` as Beam's options, run in-process on LOCAL_RUNNER unless they name a runner."""
  args = list(beam_args or [])
  if not any(arg == "--runner" or arg.startswith("--runner=") for arg in args):
    args.append(f"--runner={LOCAL_RUNNER}")
  return PipelineOptions(args)


def is_nonempty_dir(path: str) -> bool:
  return bool(FileSystems.match([FileSystems.join(path, "*")])[0].metadata_list)


def file_in_the_way(path: str) -> str | None:
  """The local path itself or the nearest of its existing parents when that is not a
  directory (where no directory can be made); None elsewhere."""
  if not reading.is_local(path):
    return None
  existing = os.path.abspath(path)
  while not os.path.lexists(existing) and existing != os.path.dirname(existing):
    existing = os.path.dirname(existing)
  return None if os.path.isdir(existing) else existing


def check_output_dir(output_dir: str, overwrite: bool) -> None:
  blocking = file_in_the_way(output_dir)
  if blocking == os.path.abspath(output_dir):
    raise ValueError(f"--output_dir {output_dir} is a file, not a directory; choose another "
                     "path (--overwrite replaces only a directory)")
  if blocking:
    raise ValueError(f"--output_dir {output_dir} is inside {blocking}, which is a file; choose "
                     "a path under a directory")
  if FileSystems.exists(output_dir) and is_nonempty_dir(output_dir) and not overwrite:
    raise FileExistsError(f"--output_dir {output_dir} already exists and is not empty; pass "
                          "--overwrite to replace it or choose another directory")


def report_stale_staging(output_dir: str, remove: bool) -> None:
  """One line naming the staging dirs that killed runs left beside output_dir, or removing
  them."""
  stale = staging.stale_dirs(output_dir)
  if stale and remove:
    FileSystems.delete(stale)
    logger.warning("removed %d stale staging dirs: %s", len(stale), " ".join(stale))
  elif stale:
    logger.warning("%d staging dirs of earlier runs that did not finish: %s; remove them with "
                   "--remove_stale_staging", len(stale), " ".join(stale))


def shards_for_bytes(input_bytes: int) -> int:
  return min(MAX_AUTO_SHARDS, max(1, math.ceil(input_bytes / BYTES_PER_TRAIN_SHARD)))


def check_settings(vocab_size: int, seq_len: int, validation_fraction: float,
                   stages: StageFlags, trains_tokenizer: bool = True, seed: int = 0) -> None:
  records.check_seq_len_and_seed(seq_len, seed, least=1)
  if trains_tokenizer and vocab_size < 300:
    raise ValueError(f"--vocab_size must be at least 300 (256 byte pieces + specials), "
                     f"got {vocab_size}")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
  if not 0 < stages.near_dup_threshold <= 1:
    raise ValueError(f"--near_dup_threshold must be in (0, 1], got {stages.near_dup_threshold}")
  if stages.tokenizer_type not in tokenizer_training.MODEL_TYPES:
    raise ValueError(f"--tokenizer_type must be one of {tokenizer_training.MODEL_TYPES}")
  if stages.langid:
    check_languages(stages.languages)
  tokenizer_training.check_special_tokens(list(stages.special_tokens))


def check_languages(languages: tuple[str, ...]) -> None:
  if not languages:
    raise ValueError("--languages is empty, so language ID would drop every document; name "
                     "the codes to keep (e.g. en,de) or pass --no_langid")
  if unknown := [code for code in languages if code not in langid.LANGUAGES]:
    raise ValueError(f"--languages has {', '.join(map(repr, unknown))}, which language ID "
                     "never returns; use ISO 639-1 codes such as en,de,fr (all of them: "
                     "beam_pipelines.langid.LANGUAGES)")


def check_sample_budget(spm_sample_docs: int, spm_sample_bytes: int) -> None:
  """A budget that fits at least one document (HashSample cuts each to 1/8 of the bytes)."""
  if spm_sample_docs < 1 or spm_sample_bytes < 8:
    raise ValueError(f"--spm_sample_docs {spm_sample_docs} and --spm_sample_bytes "
                     f"{spm_sample_bytes} leave the tokenizer nothing to train on; raise them")


def as_sources(inputs: list[str] | list[Source]) -> list[Source]:
  """Plain globs form one source named `default`."""
  if all(isinstance(i, Source) for i in inputs):
    return list(inputs)
  return [Source(sources_lib.DEFAULT_SOURCE, tuple(inputs))]


def run_pipeline(config: PrepareConfig, units, beam_args: list[str] | None):
  """Builds and runs the pipeline to completion; the language model is unpacked for the
  workers while the pipeline is being built and the workers start."""
  unpacking = langid.unpacked_model() if config.stages.langid else contextlib.nullcontext()
  with unpacking as langid_model:
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    build_pipeline(pipeline, dataclasses.replace(config, langid_model=langid_model), units)
    result = pipeline.run()
    try:
      result.wait_until_finish()
    except BaseException:
      cancel(result)
      raise
  return result


def cancel(result) -> None:
  """Stops a pipeline that runs on after the launcher gave up on it (a remote runner); the
  local runner has finished or failed by the time pipeline.run() returns."""
  try:
    result.cancel()
  except Exception as err:  # pylint: disable=broad-except  # runners raise many kinds, or none
    logger.warning("could not cancel the pipeline: %s", err)


def given_tokenizer(path: str) -> tuple[dataset_manifest.TokenizerFile, int]:
  """--tokenizer: a run, data or Hugging Face model dir (its tokenizer.model, else
  tokenizer.json with tokenizer_config.json), or such a file; and its vocabulary size."""
  file = Path(path) if Path(path).is_file() else tokenizer_lib.find(path)
  if not file.is_file():
    raise ValueError(f"--tokenizer {path} holds no {' or '.join(tokenizer_lib.TOKENIZER_FILES)}"
                     "; pass a run dir, a data dir or a Hugging Face model dir")
  given = dataset_manifest.TokenizerFile(file.name, file.read_bytes(),
                                         tokenizer_lib.sibling_config(file))
  try:
    loaded = given.load()
  except Exception as err:  # noqa: BLE001  # SentencePiece and tokenizers raise many kinds
    raise ValueError(f"--tokenizer {file} does not load ({err})") from None
  if loaded.eos_id() < 0:
    raise ValueError(f"--tokenizer {file} has no eos token to end documents with; name it as "
                     f"eos_token in {tokenizer_lib.HF_TOKENIZER_CONFIG} beside it")
  return given, loaded.vocab_size()


def run(inputs: list[str] | list[Source], output_dir: str, *, vocab_size: int, seq_len: int,
        validation_fraction: float = 0.01, seed: int = 0, num_shards: int = 0,
        spm_sample_docs: int = 100_000, spm_sample_bytes: int = 5_000_000,
        overwrite: bool = False, stages: StageFlags = StageFlags(),
        beam_args: list[str] | None = None, remove_stale_staging: bool = False,
        tokenizer: str | None = None) -> dict:
  """Runs the pipeline to completion and returns the manifest it wrote.

  `inputs` are globs (one source) or Sources. num_shards=0 picks one train shard per 256 MiB of
  each source's input. `tokenizer` (a dir or file, see `given_tokenizer`) tokenizes with that
  tokenizer unchanged instead of training one; `vocab_size` is then its own.
  """
  start = time.perf_counter()
  given = None
  if tokenizer:
    given, vocab_size = given_tokenizer(tokenizer)
  check_settings(vocab_size, seq_len, validation_fraction, stages, trains_tokenizer=not given,
                 seed=seed)
  if not given:
    check_sample_budget(spm_sample_docs, spm_sample_bytes)
  report_stale_staging(output_dir, remove_stale_staging)
  source_list = as_sources(inputs)
  resolved = sources_lib.resolve(source_list)
  check_output_dir(output_dir, overwrite)
  total_bytes = sum(resolved.bytes_by_source.values())
  with staging.staged(output_dir) as staged:
    config = PrepareConfig(
        sources=source_list, output_dir=staged, vocab_size=vocab_size, seq_len=seq_len,
        validation_fraction=validation_fraction, seed=seed,
        train_shards={name: num_shards or shards_for_bytes(size)
                      for name, size in resolved.bytes_by_source.items()},
        validation_shards=max(1, math.ceil(shards_for_bytes(total_bytes) * validation_fraction)),
        spm_sample_docs=spm_sample_docs, spm_sample_bytes=spm_sample_bytes, stages=stages,
        tokenizer=given)
    logger.info("%d sources, %d read units (%.1f MB of files); staging in %s",
                len(source_list), len(resolved.units), total_bytes / 1e6, staged)
    result = run_pipeline(config, resolved.units, beam_args)
    manifest, table = finish_staged(staged, output_dir, result, total_bytes, start)
    check_output_dir(output_dir, overwrite)  # another run may have finished meanwhile
  print(f"prepared {output_dir}\n{table}", flush=True)
  return manifest


def finish_staged(staged: str, output_dir: str, result, read_bytes: int, started: float
                  ) -> tuple[dict, str]:
  """After the pipeline has run into `staged`: empty line files where no line went, the
  report in the manifest and `report.md`. Returns (manifest, the report's table), or raises
  `stage_report.no_train_sequences` when the train split is empty."""
  for name in (stage_report.DEAD_LETTER_NAME, stage_report.DUPLICATES_NAME):
    if not FileSystems.exists(FileSystems.join(staged, name)):  # nothing went there
      dataset_manifest.write_atomically(FileSystems.join(staged, name), b"")
  manifest = dataset_manifest.read_manifest(staged)
  totals = stage_report.counter_totals(result)
  manifest["report"] = stage_report.build_report(manifest, totals, read_bytes,
                                                 time.perf_counter() - started)
  dataset_manifest.write_manifest(staged, manifest)
  table = stage_report.report_markdown(manifest)
  dataset_manifest.write_atomically(FileSystems.join(staged, stage_report.REPORT_NAME),
                                    table.encode("utf-8"))
  if not manifest["splits"]["train"]["sequences"]:
    raise stage_report.no_train_sequences(staged, output_dir, stage_report.intake_summary(
        "document", documents_read(manifest["report"]), totals))
  return manifest, table


def documents_read(report: dict) -> int:
  return sum(row["docs_in"] for row in report["stages"] if row["stage"] == "read")


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--input", help="comma-separated globs forming one source, `default`")
  parser.add_argument("--source", action="append", default=[],
                      help="NAME[:WEIGHT[:PROFILE]]=GLOB_OR_TFDS,... (repeatable); PROFILE is "
                           "auto (default: code for source files by suffix, else prose), prose, "
                           "or code (no language ID or prose heuristics); "
                           "TFDS inputs look like tfds:NAME[/CONFIG][:SPLIT]")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--vocab_size", type=int, default=4096)
  parser.add_argument("--tokenizer", default=None,
                      help="tokenize with this run, data or Hugging Face model dir's tokenizer "
                           "(tokenizer.model or tokenizer.json) instead of training one")
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--validation_fraction", type=float, default=0.01)
  parser.add_argument("--num_shards", type=int, default=0,
                      help="train shards per source; 0 = one per 256 MiB of input")
  parser.add_argument("--spm_sample_docs", type=int, default=100_000)
  parser.add_argument("--spm_sample_bytes", type=int, default=5_000_000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --output_dir whole")
  parser.add_argument("--remove_stale_staging", action="store_true",
                      help="remove the staging dirs (--output_dir.tmp-*) of earlier runs whose "
                           "process is gone")
  defaults = StageFlags()
  for stage in ("normalize", "langid", "quality", "pii", "exact_dedup", "near_dedup"):
    parser.add_argument(f"--no_{stage}", dest=stage, action="store_false",
                        help=f"skip the {stage} stage")
  parser.add_argument("--near_dup_threshold", type=float, default=defaults.near_dup_threshold,
                      help="MinHash Jaccard similarity of word 5-grams above which documents "
                           "are near duplicates")
  parser.add_argument("--languages", default=",".join(defaults.languages),
                      help="comma-separated ISO 639-1 codes that language ID keeps")
  parser.add_argument("--min_language_score", type=float, default=defaults.min_language_score)
  parser.add_argument("--quality_thresholds", default="",
                      help="changes to the Gopher/C4 thresholds, e.g. 'min_words=20,"
                           "max_symbol_word_ratio=0.2' (see quality.QualityThresholds)")
  parser.add_argument("--max_document_bytes", type=int, default=defaults.max_document_bytes,
                      help="longer documents or JSONL lines go to the dead letters as too_long")
  parser.add_argument("--tokenizer_type", default=defaults.tokenizer_type,
                      choices=tokenizer_training.MODEL_TYPES)
  parser.add_argument("--special_tokens", default="",
                      help="comma-separated pieces never split, e.g. '<|user|>,<|image|>'")
  return staging.parse_flags(parser, argv, "prepare_text")


def sources_from_flags(flags: argparse.Namespace) -> list[Source]:
  sources = [sources_lib.parse_source(flag) for flag in flags.source]
  if flags.input:
    inputs = tuple(glob.strip() for glob in flags.input.split(",") if glob.strip())
    sources.insert(0, Source(sources_lib.DEFAULT_SOURCE, inputs))
  if not sources:
    raise ValueError("pass --input=GLOB,... or at least one --source=NAME=GLOB,...")
  return sources


def stages_from_flags(flags: argparse.Namespace) -> StageFlags:
  split = lambda value: tuple(v.strip() for v in value.split(",") if v.strip())
  return StageFlags(
      normalize=flags.normalize, quality=flags.quality, langid=flags.langid, pii=flags.pii,
      exact_dedup=flags.exact_dedup, near_dedup=flags.near_dedup,
      near_dup_threshold=flags.near_dup_threshold, languages=split(flags.languages),
      min_language_score=flags.min_language_score,
      max_document_bytes=flags.max_document_bytes,
      quality_thresholds=quality.thresholds_from_flag(flags.quality_thresholds),
      tokenizer_type=flags.tokenizer_type,
      special_tokens=split(flags.special_tokens))


def main(argv: list[str] | None = None) -> None:
  flags, beam_args = parse_flags(argv)
  staging.log_to_stderr()
  staging.run_until_stopped("prepare_text", flags.output_dir, lambda: run(
      sources_from_flags(flags), flags.output_dir, vocab_size=flags.vocab_size,
      seq_len=flags.seq_len, validation_fraction=flags.validation_fraction, seed=flags.seed,
      num_shards=flags.num_shards, spm_sample_docs=flags.spm_sample_docs,
      spm_sample_bytes=flags.spm_sample_bytes, overwrite=flags.overwrite,
      stages=stages_from_flags(flags), beam_args=beam_args,
      remove_stale_staging=flags.remove_stale_staging, tokenizer=flags.tokenizer))


if __name__ == "__main__":
  main()
