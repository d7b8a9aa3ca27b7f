"""Split statistics, the manifest that marks an output directory complete, and its summary."""

import datetime
import hashlib
import json
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import records
from beam_pipelines import tokenizer_training


class TokenStats(NamedTuple):
  """Non-pad token counts of one split; histogram[i] counts token id i."""
  documents: int
  tokens: int
  histogram: np.ndarray


def empty_token_stats(vocab_size: int) -> TokenStats:
  return TokenStats(0, 0, np.zeros(vocab_size, np.int64))


def add_token_stats(a: TokenStats, b: TokenStats) -> TokenStats:
  size = max(len(a.histogram), len(b.histogram))
  histogram = np.zeros(size, np.int64)
  histogram[:len(a.histogram)] += a.histogram
  histogram[:len(b.histogram)] += b.histogram
  return TokenStats(a.documents + b.documents, a.tokens + b.tokens, histogram)


class SumTokenStats(beam.CombineFn):

  def __init__(self, vocab_size: int):
    self._vocab_size = vocab_size

  def create_accumulator(self):
    return empty_token_stats(self._vocab_size)

  def add_input(self, accumulator, stats):
    return add_token_stats(accumulator, stats)

  def merge_accumulators(self, accumulators):
    total = self.create_accumulator()
    for stats in accumulators:
      total = add_token_stats(total, stats)
    return total

  def extract_output(self, accumulator):
    return accumulator


def unigram_entropy(histogram: np.ndarray) -> float:
  """Entropy in nats of the distribution histogram / histogram.sum()."""
  counts = histogram[histogram > 0].astype(np.float64)
  if not counts.size:
    return 0.0
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def tokenizer_entry(model_proto: bytes) -> dict:
  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  return {"file": records.TOKENIZER_NAME, "sha256": hashlib.sha256(model_proto).hexdigest(),
          "vocab_size": sp.get_piece_size(), "model_type": tokenizer_training.MODEL_TYPE,
          "pad_id": sp.pad_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
          "unk_id": sp.unk_id()}


def split_entry(stats: TokenStats, sequences: int, shard_paths: list[str]) -> dict:
  shards = sorted(FileSystems.split(path)[1] for path in shard_paths)
  return {"documents": stats.documents, "tokens": stats.tokens, "sequences": sequences,
          "shards": shards}


def build_manifest(*, seq_len: int, model_proto: bytes, splits: dict[str, dict],
                   train_histogram: np.ndarray, inputs: list[str]) -> dict:
  return {
      "format": records.RECORD_FORMAT,
      "seq_len": seq_len,
      "fields": list(records.RECORD_FIELDS),
      "tokenizer": tokenizer_entry(model_proto),
      "splits": splits,
      "unigram_entropy_nats": unigram_entropy(train_histogram),
      "inputs": list(inputs),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def write_atomically(path: str, data: bytes) -> None:
  """Readers never see a partial file: write a temp name, then rename over `path`."""
  temp_path = path + ".tmp"
  with FileSystems.create(temp_path) as f:
    f.write(data)
  FileSystems.rename([temp_path], [path])


def write_tokenizer_and_manifest(unused_element, *, output_dir: str, seq_len: int,
                                 inputs: list[str], model_proto: bytes,
                                 train_stats: TokenStats, validation_stats: TokenStats,
                                 train_sequences: int, validation_sequences: int,
                                 train_shards: list[str], validation_shards: list[str]) -> None:
  """The pipeline's last step; the manifest goes last so its presence means complete."""
  del unused_element
  write_atomically(FileSystems.join(output_dir, records.TOKENIZER_NAME), model_proto)
  splits = {"train": split_entry(train_stats, train_sequences, train_shards),
            "validation": split_entry(validation_stats, validation_sequences, validation_shards)}
  manifest = build_manifest(seq_len=seq_len, model_proto=model_proto, splits=splits,
                            train_histogram=train_stats.histogram, inputs=inputs)
  write_atomically(FileSystems.join(output_dir, records.MANIFEST_NAME),
                   json.dumps(manifest, indent=2).encode("utf-8"))


def read_manifest(output_dir: str) -> dict:
  with FileSystems.open(FileSystems.join(output_dir, records.MANIFEST_NAME)) as f:
    return json.loads(f.read())


def summary_table(manifest: dict, seconds: float, skipped: dict[str, int]) -> str:
  rows = [f"{'split':<12}{'documents':>12}{'tokens':>14}{'sequences':>12}{'shards':>8}"]
  for name, split in manifest["splits"].items():
    rows.append(f"{name:<12}{split['documents']:>12,}{split['tokens']:>14,}"
                f"{split['sequences']:>12,}{len(split['shards']):>8}")
  rows.append(f"seq_len {manifest['seq_len']}, vocab {manifest['tokenizer']['vocab_size']}, "
              f"train unigram entropy {manifest['unigram_entropy_nats']:.3f} nats, "
              f"{seconds:.1f}s")
  skipped_text = ", ".join(f"{count:,} {name.replace('_', ' ')}"
                           for name, count in skipped.items() if count)
  if skipped_text:
    rows.append(f"skipped: {skipped_text}")
  return "\n".join(rows)
