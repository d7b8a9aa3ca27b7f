"""Split statistics, the manifest that marks an output directory complete, and its summary."""

import datetime
import hashlib
import json
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import records
from maxlm import tokenizer as tokenizer_lib


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


class TokenizerFile(NamedTuple):
  """A tokenizer as the pipeline carries it: its file name (tokenizer.model, SentencePiece, or
  tokenizer.json, Hugging Face `tokenizers`), the file's bytes, and for a .json the dict of
  the tokenizer_config.json beside it (naming bos/eos/pad)."""
  name: str
  content: bytes
  config: dict | None = None

  def load(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.from_bytes(self.name, self.content, self.config)


def tokenizer_entry(model_proto: bytes, model_type: str, special_tokens: list[str],
                    name: str = records.TOKENIZER_NAME, config: dict | None = None) -> dict:
  """The manifest's block for a tokenizer file: where it is, its hash and its ids. Special
  tokens a given (not trained) tokenizer lacks are left out."""
  tokenizer = TokenizerFile(name, model_proto, config).load()
  ids = {token: tokenizer.piece_to_id(token) for token in special_tokens}
  ids = {token: i for token, i in ids.items() if i >= 0 and tokenizer.id_to_piece(i) == token}
  return {"file": name, "sha256": hashlib.sha256(model_proto).hexdigest(),
          "vocab_size": tokenizer.vocab_size(), "model_type": model_type,
          "pad_id": tokenizer.pad_id(), "bos_id": tokenizer.bos_id(),
          "eos_id": tokenizer.eos_id(), "unk_id": tokenizer.unk_id(), "special_tokens": ids}


def part_entry(stats: TokenStats | None, shards: list[tuple[str, int]]) -> dict:
  """shards: (file name, sequences) of one part."""
  stats = stats or TokenStats(0, 0, np.zeros(0, np.int64))
  return {"documents": stats.documents, "tokens": stats.tokens,
          "sequences": sum(count for _, count in shards),
          "shards": sorted(name for name, _ in shards)}


def split_entries(parts: list[str], stats: dict[str, TokenStats], shards: list[tuple],
                  weights: dict[str, float]) -> dict:
  """{split: entry} from each part's stats and (part, shard name, sequences) shards.

  A part named `train-SOURCE` is one source's train shards: the train entry sums them and
  lists them under `sources` with their mixture weight.
  """
  splits = {}
  for part in parts:
    entry = part_entry(stats.get(part), [(name, count) for p, name, count in shards if p == part])
    split, _, source = part.partition("-")
    if not source:
      splits[split] = entry
      continue
    whole = splits.setdefault(split, {"documents": 0, "tokens": 0, "sequences": 0, "shards": [],
                                      "sources": {}})
    for field in ("documents", "tokens", "sequences", "shards"):
      whole[field] += entry[field]
    whole["sources"][source] = {"weight": weights[source], **entry}
  return {name: splits[name] for name in records.SPLITS if name in splits}


def train_histogram(parts: list[str], stats: dict[str, TokenStats]) -> np.ndarray:
  total = empty_token_stats(0)
  for part in parts:
    if part.startswith("train") and part in stats:
      total = add_token_stats(total, stats[part])
  return total.histogram


def write_atomically(path: str, data: bytes) -> None:
  """Readers never see a partial file: write a temp name, then rename over `path`."""
  temp_path = path + ".tmp"
  with FileSystems.create(temp_path) as f:
    f.write(data)
  FileSystems.rename([temp_path], [path])


def write_tokenizer(output_dir: str, tokenizer: TokenizerFile) -> None:
  write_atomically(FileSystems.join(output_dir, tokenizer.name), tokenizer.content)
  if tokenizer.config is not None:
    write_atomically(FileSystems.join(output_dir, tokenizer_lib.HF_TOKENIZER_CONFIG),
                     json.dumps(tokenizer.config, indent=2).encode("utf-8"))


def write_tokenizer_and_manifest(unused_element, *, output_dir: str, seq_len: int,
                                 settings: dict, tokenizer: TokenizerFile | None,
                                 parts: list[str], stats: dict[str, TokenStats],
                                 shards: list[tuple], weights: dict[str, float]) -> None:
  """The pipeline's last step: the tokenizer, then manifest.json (without its report, which
  the driver adds from the run's metrics). No tokenizer (none could be trained: no train
  documents) leaves the manifest's `tokenizer` null, for a run the driver refuses."""
  del unused_element
  if tokenizer is not None:
    write_tokenizer(output_dir, tokenizer)
  manifest = {
      "format": records.RECORD_FORMAT,
      "seq_len": seq_len,
      "fields": records.manifest_fields(records.text_fields(seq_len)),
      "tokenizer": tokenizer_entry(
          tokenizer.content, settings["tokenizer_type"], settings["special_tokens"],
          tokenizer.name, tokenizer.config) if tokenizer else None,
      "splits": split_entries(parts, stats, shards, weights),
      "unigram_entropy_nats": unigram_entropy(train_histogram(parts, stats)),
      "settings": settings,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  write_manifest(output_dir, manifest)


def write_manifest(output_dir: str, manifest: dict) -> None:
  write_atomically(FileSystems.join(output_dir, records.MANIFEST_NAME),
                   json.dumps(manifest, indent=2).encode("utf-8"))


def read_manifest(output_dir: str) -> dict:
  with FileSystems.open(FileSystems.join(output_dir, records.MANIFEST_NAME)) as f:
    return json.loads(f.read())
