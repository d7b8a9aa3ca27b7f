"""Tokenizing one split's documents, packing them, and writing ArrayRecord shards."""

import logging
import os
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows
from array_record.beam.arrayrecordio import WriteToArrayRecord

from beam_pipelines import dataset_manifest
from beam_pipelines import packing
from beam_pipelines import records
from beam_pipelines import stage_report
from beam_pipelines import tokenizer_training
from beam_pipelines.documents import Document

logger = logging.getLogger(__name__)

SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
SHARD_SUFFIX = ".array_record"
STATS = "stats"


class TokenizeDocuments(beam.DoFn):
  """Document -> (pack bucket, int32 bytes of [bos] + ids + [eos]).

  Encodes in batches so SentencePiece can use every core; each batch also emits its
  `dataset_manifest.TokenStats` to the STATS output.
  """

  def __init__(self, num_buckets: int, vocab_size: int, batch_chars: int = 1 << 20):
    self._num_buckets = num_buckets
    self._vocab_size = vocab_size
    self._batch_chars = batch_chars

  def setup(self):
    self._model_proto = self._processor = None
    self._chars_done = self._chars_logged = 0

  def start_bundle(self):
    self._batch, self._pending_chars = [], 0

  def process(self, document: Document, model_proto: bytes):
    if model_proto is not self._model_proto and model_proto != self._model_proto:
      self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
      self._model_proto = model_proto
    self._batch.append(document)
    self._pending_chars += len(document.text)
    if self._pending_chars >= self._batch_chars:
      yield from self._flush()

  def finish_bundle(self):
    for output in self._flush():
      if isinstance(output, beam.pvalue.TaggedOutput):
        yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
      else:
        yield GlobalWindows.windowed_value(output)

  def _flush(self) -> Iterator:
    if not self._batch:
      return
    keys = [doc.key for doc in self._batch]
    texts = [doc.text for doc in self._batch]
    with stage_report.timed("tokenize"):
      ids = self._processor.encode(texts, num_threads=os.cpu_count() or 1)
      token_arrays = [with_bos_eos(doc_ids) for doc_ids in ids]
    for key, tokens in zip(keys, token_arrays):
      yield key % self._num_buckets, tokens.tobytes()
    all_tokens = np.concatenate(token_arrays)
    histogram = np.bincount(all_tokens, minlength=self._vocab_size)
    yield beam.pvalue.TaggedOutput(
        STATS, dataset_manifest.TokenStats(len(token_arrays), len(all_tokens), histogram))
    self._log_progress(self._pending_chars)
    self._batch, self._pending_chars = [], 0

  def _log_progress(self, chars: int):
    self._chars_done += chars
    if self._chars_done - self._chars_logged >= 32e6:
      self._chars_logged = self._chars_done
      logger.info("tokenized %.0f MB of text so far", self._chars_done / 1e6)


def with_bos_eos(ids: list[int]) -> np.ndarray:
  tokens = np.empty(len(ids) + 2, np.int32)
  tokens[0] = tokenizer_training.BOS_ID
  tokens[1:-1] = ids
  tokens[-1] = tokenizer_training.EOS_ID
  return tokens


def pack_bucket(bucket: tuple[int, Iterable[bytes]], seq_len: int) -> Iterator[bytes]:
  docs = (np.frombuffer(tokens, np.int32) for tokens in bucket[1])
  for sequence in packing.pack_documents(docs, seq_len):
    yield records.encode_packed(*sequence)


def split_summary(unused_element, *, part: str, stats, sequences: int, shards: list[str]):
  del unused_element
  return part, stats, sequences, shards


class TokenizePackWrite(beam.PTransform):
  """Documents -> `{part}-SSSSS-of-NNNNN.array_record` shards; part is a split, or a split and
  a source (`train-code`).

  Documents are packed within num_shards hash buckets. Returns one element
  (part, TokenStats, sequence count, shard paths).
  """

  def __init__(self, part: str, *, model_proto, output_dir: str, seq_len: int,
               vocab_size: int, num_shards: int):
    super().__init__()
    self._part = part
    self._model_proto = model_proto
    self._output_dir = output_dir
    self._seq_len = seq_len
    self._vocab_size = vocab_size
    self._num_shards = num_shards

  def expand(self, docs):
    tokenized = docs | "Tokenize" >> beam.ParDo(
        TokenizeDocuments(self._num_shards, self._vocab_size),
        self._model_proto).with_outputs(STATS, main="documents")
    packed = (tokenized.documents
              | "GroupIntoBuckets" >> beam.GroupByKey()
              | "Pack" >> beam.FlatMap(pack_bucket, self._seq_len))
    write = WriteToArrayRecord(
        FileSystems.join(self._output_dir, self._part), file_name_suffix=SHARD_SUFFIX,
        num_shards=self._num_shards, shard_name_template=SHARD_TEMPLATE)
    stats = tokenized[STATS] | "SumStats" >> beam.CombineGlobally(
        dataset_manifest.SumTokenStats(self._vocab_size))
    sequences = packed | "CountSequences" >> beam.combiners.Count.Globally()
    shards = packed | "Write" >> write
    return (docs.pipeline
            | "Once" >> beam.Create([None])
            | "Summary" >> beam.Map(
                split_summary, part=self._part, stats=beam.pvalue.AsSingleton(stats),
                sequences=beam.pvalue.AsSingleton(sequences),
                shards=beam.pvalue.AsList(shards)))
