"""Tokenizing documents, packing them, and writing ArrayRecord shards, for every output part
(`train-SOURCE` per source, and `validation`) in one set of transforms.

Documents of a part are packed within hash buckets, one bucket per shard; each bucket is
packed and written by one worker to `{part}-BBBBB-of-NNNNN.array_record`.
"""

import logging
import os
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
import sentencepiece as spm
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows
from array_record.python.array_record_module import ArrayRecordWriter

from beam_pipelines import dataset_manifest
from beam_pipelines import packing
from beam_pipelines import records
from beam_pipelines import stage_report
from beam_pipelines import tokenizer_training

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for Grain
STATS = "stats"


def shard_name(part: str, bucket: int, num_shards: int) -> str:
  return f"{part}-{bucket:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


class TokenizeDocuments(beam.DoFn):
  """(part, Document) -> ((part, bucket), (document key, int32 bytes of [bos] + ids + [eos])).

  Encodes in batches so SentencePiece can use every core; each batch also emits
  (part, `dataset_manifest.TokenStats`) per part to the STATS output. The tokenizer (a
  `dataset_manifest.TokenizerFile`) is a side input: trained in the same pipeline, or given.
  """

  def __init__(self, num_shards: dict[str, int], vocab_size: int, batch_chars: int = 1 << 20):
    self._num_shards = num_shards
    self._vocab_size = vocab_size
    self._batch_chars = batch_chars

  def setup(self):
    self._tokenizer_file = self._processor = None
    self._chars_done = self._chars_logged = 0

  def start_bundle(self):
    self._batch, self._pending_chars = [], 0

  def process(self, part_and_document, tokenizer_file: dataset_manifest.TokenizerFile | None):
    if tokenizer_file is None:  # none was trained: no train documents, and the run is refused
      return
    if tokenizer_file is not self._tokenizer_file and tokenizer_file != self._tokenizer_file:
      self._processor = tokenizer_file.load()
      self._tokenizer_file = tokenizer_file
    self._batch.append(part_and_document)
    self._pending_chars += len(part_and_document[1].text)
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
    with stage_report.timed("tokenize"):
      ids = encode_all(self._processor, [doc.text for _, doc in self._batch])
      token_arrays = [with_bos_eos(doc_ids, self._processor.bos_id(), self._processor.eos_id())
                      for doc_ids in ids]
    by_part = {}
    for (part, doc), tokens in zip(self._batch, token_arrays):
      by_part.setdefault(part, []).append(tokens)
      yield (part, doc.key % self._num_shards[part]), (doc.key, tokens.tobytes())
    for part, arrays in by_part.items():
      all_tokens = np.concatenate(arrays)
      histogram = np.bincount(all_tokens, minlength=self._vocab_size)
      yield beam.pvalue.TaggedOutput(
          STATS, (part, dataset_manifest.TokenStats(len(arrays), len(all_tokens), histogram)))
    self._log_progress(self._pending_chars)
    self._batch, self._pending_chars = [], 0

  def _log_progress(self, chars: int):
    self._chars_done += chars
    if self._chars_done - self._chars_logged >= 32e6:
      self._chars_logged = self._chars_done
      logger.info("tokenized %.0f MB of text so far", self._chars_done / 1e6)


def encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
  if isinstance(tokenizer, spm.SentencePieceProcessor):
    return tokenizer.encode(texts, num_threads=os.cpu_count() or 1)
  return [tokenizer.encode(text) for text in texts]


def with_bos_eos(ids: list[int], bos_id: int = tokenizer_training.BOS_ID,
                 eos_id: int = tokenizer_training.EOS_ID) -> np.ndarray:
  """[bos] + ids + [eos]; no bos when the tokenizer has none (bos_id < 0)."""
  head = [bos_id] if bos_id >= 0 else []
  return np.asarray(head + list(ids) + [eos_id], np.int32)


def in_key_order(keyed: Iterable[tuple[int, object]]) -> list:
  """A bucket's (key, value) pairs -> the values by key: the order a runner hands a bucket
  over in varies (with the input paths' sort order, and between attempts), the key order
  does not, so the same elements always make the same shard."""
  return [value for _, value in sorted(keyed, key=lambda key_and_value: key_and_value[0])]


def pack_and_write(bucket: tuple[tuple[str, int], Iterable[tuple[int, bytes]]],
                   output_dir: str, seq_len: int, num_shards: dict[str, int]):
  """Packs one bucket's documents `in_key_order` and writes them as one shard; yields (part,
  shard, count). A retried bundle rewrites the same shard whole."""
  (part, index), keyed = bucket
  docs = in_key_order(keyed)
  name = shard_name(part, index, num_shards[part])
  writer = ArrayRecordWriter(FileSystems.join(output_dir, name), WRITER_OPTIONS)
  count = 0
  with stage_report.timed("pack"):
    for sequence in packing.pack_documents((np.frombuffer(d, np.int32) for d in docs), seq_len):
      writer.write(records.encode_packed(*sequence))
      count += 1
    writer.close()
  yield part, name, count


class TokenizePackWrite(beam.PTransform):
  """(part, Document) pairs -> shards; returns {"stats": (part, TokenStats) per part,
  "shards": (part, shard file name, sequences) per shard}."""

  def __init__(self, *, tokenizer, output_dir: str, seq_len: int, vocab_size: int,
               num_shards: dict[str, int]):
    super().__init__()
    self._tokenizer = tokenizer
    self._output_dir = output_dir
    self._seq_len = seq_len
    self._vocab_size = vocab_size
    self._num_shards = num_shards

  def expand(self, parts_and_docs):
    tokenized = parts_and_docs | "Tokenize" >> beam.ParDo(
        TokenizeDocuments(self._num_shards, self._vocab_size),
        self._tokenizer).with_outputs(STATS, main="documents")
    shards = (tokenized.documents
              | "GroupIntoBuckets" >> beam.GroupByKey()
              | "PackAndWrite" >> beam.FlatMap(pack_and_write, self._output_dir, self._seq_len,
                                               self._num_shards))
    stats = tokenized[STATS] | "SumStats" >> beam.CombinePerKey(
        dataset_manifest.SumTokenStats(self._vocab_size))
    return {"stats": stats, "shards": shards}
