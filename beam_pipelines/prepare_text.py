"""Raw text -> SentencePiece tokenizer + packed ArrayRecord shards + manifest.json.

  python -m beam_pipelines.prepare_text --input='data/**/*.py,more/*.jsonl.gz' \\
      --output_dir=/tmp/dataset --vocab_size=4096 --seq_len=256

Plain files are one document each; JSONL(.gz) lines contribute their `text` field. Flags this
module does not know are Beam pipeline options (e.g. --runner=DataflowRunner --project=...).
"""

import argparse
import dataclasses
import logging
import math
import time

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import dataset_manifest
from beam_pipelines import documents
from beam_pipelines import records
from beam_pipelines import tokenized_split
from beam_pipelines import tokenizer_training

logger = logging.getLogger(__name__)

BYTES_PER_TRAIN_SHARD = 256 << 20
MAX_AUTO_SHARDS = 1024


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  inputs: list[str]
  patterns: list[str]
  output_dir: str
  vocab_size: int
  seq_len: int
  validation_fraction: float
  seed: int
  train_shards: int
  validation_shards: int
  spm_sample_docs: int
  spm_sample_bytes: int


def file_path(metadata) -> str:
  return metadata.path


def build_pipeline(pipeline: beam.Pipeline, config: PrepareConfig) -> None:
  docs = (pipeline
          | "Patterns" >> beam.Create(config.patterns)
          | "Match" >> fileio.MatchAll()
          | "Paths" >> beam.Map(file_path)
          | "DistinctPaths" >> beam.Distinct()
          | "Read" >> beam.ParDo(documents.ReadDocuments(config.seed)))
  bounds = docs | "KeyBounds" >> beam.CombineGlobally(documents.KeyBounds())
  train, validation = docs | "Split" >> beam.Partition(
      documents.partition_by_split, 2, config.validation_fraction,
      beam.pvalue.AsSingleton(bounds))
  model_proto = beam.pvalue.AsSingleton(
      train
      | "SampleForTokenizer" >> beam.CombineGlobally(tokenizer_training.HashSample(
          config.spm_sample_docs, config.spm_sample_bytes))
      | "TrainTokenizer" >> beam.Map(tokenizer_training.train_tokenizer, config.vocab_size))
  split_settings = dict(model_proto=model_proto, output_dir=config.output_dir,
                        seq_len=config.seq_len, vocab_size=config.vocab_size)
  train_out = train | "Train" >> tokenized_split.TokenizePackWrite(
      "train", num_shards=config.train_shards, **split_settings)
  validation_out = validation | "Validation" >> tokenized_split.TokenizePackWrite(
      "validation", num_shards=config.validation_shards, **split_settings)
  singleton, as_list = beam.pvalue.AsSingleton, beam.pvalue.AsList
  _ = (pipeline
       | "Once" >> beam.Create([None])
       | "WriteManifest" >> beam.Map(
           dataset_manifest.write_tokenizer_and_manifest,
           output_dir=config.output_dir, seq_len=config.seq_len, inputs=config.inputs,
           model_proto=model_proto,
           train_stats=singleton(train_out["stats"]),
           validation_stats=singleton(validation_out["stats"]),
           train_sequences=singleton(train_out["sequences"]),
           validation_sequences=singleton(validation_out["sequences"]),
           train_shards=as_list(train_out["shards"]),
           validation_shards=as_list(validation_out["shards"])))


def pipeline_options(beam_args: list[str] | None) -> PipelineOptions:
  """Beam's own default runner downloads Prism; run in-process unless told otherwise."""
  args = list(beam_args or [])
  if not any(arg == "--runner" or arg.startswith("--runner=") for arg in args):
    args.append("--runner=DirectRunner")
  return PipelineOptions(args)


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
  manifest_path = FileSystems.join(output_dir, records.MANIFEST_NAME)
  if FileSystems.exists(manifest_path):
    if not overwrite:
      raise FileExistsError(f"--output_dir {output_dir} already holds a prepared dataset; "
                            "pass --overwrite or choose another directory")
    FileSystems.delete([manifest_path])  # first, so a failed rerun never looks complete
    stale = [m.path for split in records.SPLITS
             for m in FileSystems.match([FileSystems.join(
                 output_dir, f"{split}-*{tokenized_split.SHARD_SUFFIX}")])[0].metadata_list]
    if stale:
      FileSystems.delete(stale)
  if not FileSystems.exists(output_dir):
    FileSystems.mkdirs(output_dir)


def default_train_shards(input_bytes: int) -> int:
  return min(MAX_AUTO_SHARDS, max(1, math.ceil(input_bytes / BYTES_PER_TRAIN_SHARD)))


def check_settings(vocab_size: int, seq_len: int, validation_fraction: float) -> None:
  if seq_len < 1:
    raise ValueError(f"--seq_len must be at least 1, got {seq_len}")
  if vocab_size < 300:
    raise ValueError(f"--vocab_size must be at least 300 (256 byte pieces + specials), "
                     f"got {vocab_size}")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")


def skipped_counts(result) -> dict[str, int]:
  query = result.metrics().query(MetricsFilter().with_namespace(documents.METRICS_NAMESPACE))
  totals = {}
  for counter in query["counters"]:
    value = counter.committed if counter.committed is not None else counter.attempted
    totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
  return {name: totals.get(name, 0)
          for name in ("empty_documents", "malformed_json_lines", "missing_text_lines")}


def run(inputs: list[str], output_dir: str, *, vocab_size: int, seq_len: int,
        validation_fraction: float = 0.01, seed: int = 0, num_shards: int = 0,
        spm_sample_docs: int = 100_000, spm_sample_bytes: int = 5_000_000,
        overwrite: bool = False, beam_args: list[str] | None = None) -> dict:
  """Runs the pipeline to completion and returns the manifest it wrote.

  num_shards=0 picks one train shard per 256 MiB of input.
  """
  start = time.perf_counter()
  check_settings(vocab_size, seq_len, validation_fraction)
  matched = documents.resolve_inputs(inputs)
  prepare_output_dir(output_dir, overwrite)
  train_shards = num_shards or default_train_shards(matched.total_bytes)
  config = PrepareConfig(
      inputs=list(inputs), patterns=matched.patterns, output_dir=output_dir,
      vocab_size=vocab_size, seq_len=seq_len, validation_fraction=validation_fraction,
      seed=seed, train_shards=train_shards,
      validation_shards=max(1, math.ceil(train_shards * validation_fraction)),
      spm_sample_docs=spm_sample_docs, spm_sample_bytes=spm_sample_bytes)
  logger.info("matched %d files (%.1f MB); writing %d train + %d validation shards to %s",
              matched.files, matched.total_bytes / 1e6, config.train_shards,
              config.validation_shards, output_dir)
  pipeline = beam.Pipeline(options=pipeline_options(beam_args))
  build_pipeline(pipeline, config)
  result = pipeline.run()
  result.wait_until_finish()
  manifest = dataset_manifest.read_manifest(output_dir)
  logger.info("prepared %s\n%s", output_dir, dataset_manifest.summary_table(
      manifest, time.perf_counter() - start, skipped_counts(result)))
  return manifest


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--input", required=True, help="comma-separated globs")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--vocab_size", type=int, default=4096)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--validation_fraction", type=float, default=0.01)
  parser.add_argument("--num_shards", type=int, default=0,
                      help="train shards; 0 = one per 256 MiB of input")
  parser.add_argument("--spm_sample_docs", type=int, default=100_000)
  parser.add_argument("--spm_sample_bytes", type=int, default=5_000_000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overwrite", action="store_true")
  return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
  flags, beam_args = parse_flags(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      force=True)
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  inputs = [glob.strip() for glob in flags.input.split(",") if glob.strip()]
  try:
    run(inputs, flags.output_dir, vocab_size=flags.vocab_size, seq_len=flags.seq_len,
        validation_fraction=flags.validation_fraction, seed=flags.seed,
        num_shards=flags.num_shards, spm_sample_docs=flags.spm_sample_docs,
        spm_sample_bytes=flags.spm_sample_bytes, overwrite=flags.overwrite,
        beam_args=beam_args)
  except (ValueError, FileExistsError) as err:
    raise SystemExit(f"prepare_text: {err}") from None


if __name__ == "__main__":
  main()
