"""Training the SentencePiece tokenizer once, on a bounded, deterministic sample of documents."""

import hashlib
import heapq
import io
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator

import apache_beam as beam
import sentencepiece as spm

from beam_pipelines import stage_report

logger = logging.getLogger(__name__)

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
MAX_CHUNK_CHARS = 2048
# Identity normalization and no dummy prefix keep whitespace, newlines and indentation, so
# decode(encode(text)) == text for source code; byte fallback covers any character not learned.
TRAINER_OPTIONS = dict(
    byte_fallback=True,
    pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    split_digits=True, allow_whitespace_only_pieces=True,
    character_coverage=0.9999, max_sentence_length=4 * MAX_CHUNK_CHARS, input_sentence_size=0,
    minloglevel=2)


def sample_priority(text: str) -> int:
  """Deterministic pseudo-random rank; the sample keeps the lowest ranks."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"spm-sample").digest()
  return int.from_bytes(digest, "little")


class HashSample(beam.CombineFn):
  """The lowest-priority texts that fit a document and UTF-8 byte budget.

  The accumulator holds every document seen below `cutoff`, the lowest priority ever evicted;
  that invariant makes the result independent of input order and bundling. Each document
  contributes at most 1/8 of the byte budget, so one huge file cannot crowd out the rest.
  Output: the texts in priority order.
  """

  def __init__(self, max_docs: int, max_bytes: int):
    self._max_docs = max_docs
    self._max_bytes = max_bytes
    self._max_doc_chars = max(1, max_bytes // 8)

  def create_accumulator(self):
    return [], 0, 2**64  # max-heap of (-priority, text, size), total size, cutoff

  def _trim(self, heap, total, cutoff):
    while heap and (len(heap) > self._max_docs or total > self._max_bytes):
      negative_priority, _, size = heapq.heappop(heap)
      total -= size
      cutoff = -negative_priority
    return heap, total, cutoff

  def add_input(self, accumulator, text: str):
    heap, total, cutoff = accumulator
    text = text[:self._max_doc_chars]
    priority = sample_priority(text)
    if priority >= cutoff:
      return accumulator
    size = len(text.encode("utf-8"))
    heapq.heappush(heap, (-priority, text, size))
    return self._trim(heap, total + size, cutoff)

  def merge_accumulators(self, accumulators):
    accumulators = list(accumulators)
    cutoff = min(a[2] for a in accumulators)
    merged = [entry for heap, _, _ in accumulators for entry in heap if -entry[0] < cutoff]
    heapq.heapify(merged)
    return self._trim(merged, sum(entry[2] for entry in merged), cutoff)

  def extract_output(self, accumulator):
    return [text for _, text, _ in sorted(accumulator[0], reverse=True)]


def training_chunks(texts: Iterable[str], max_chars: int = MAX_CHUNK_CHARS) -> Iterator[str]:
  """Splits texts at line ends into pieces the trainer accepts (it drops over-long sentences)."""
  for text in texts:
    chunk = ""
    for line in text.splitlines(keepends=True):
      if chunk and len(chunk) + len(line) > max_chars:
        yield chunk
        chunk = ""
      while len(line) > max_chars:
        yield line[:max_chars]
        line = line[max_chars:]
      chunk += line
    if chunk:
      yield chunk


def check_special_tokens(special_tokens: list[str]) -> None:
  for token in special_tokens:
    if not token or token != token.strip() or "\n" in token:
      raise ValueError(f"--special_tokens entry {token!r} must be non-empty with no surrounding "
                       "whitespace or newline")


def train_tokenizer(sample: list[str], vocab_size: int, model_type: str = "bpe",
                    special_tokens: tuple[str, ...] = ()) -> bytes:
  """Trains a SentencePiece model (bpe or unigram) with byte fallback on the sample texts;
  each special token becomes one piece that is never split. Returns the serialized proto."""
  if not sample:
    raise ValueError("no documents survived cleaning to train the tokenizer on; check --input "
                     "and the filter flags")
  start = time.perf_counter()
  model = io.BytesIO()
  try:
    with stage_report.timed("train_tokenizer"):
      spm.SentencePieceTrainer.train(
          sentence_iterator=training_chunks(sample), model_writer=model, vocab_size=vocab_size,
          model_type=model_type, user_defined_symbols=["\n", *special_tokens],
          num_threads=os.cpu_count() or 1, **TRAINER_OPTIONS)
  except RuntimeError as err:
    raise ValueError(untrainable_sentence(err, vocab_size, len(sample))) from None
  sample_mb = sum(len(text) for text in sample) / 1e6
  logger.info("trained %d-piece %s tokenizer on %d sampled documents (%.1f MB) in %.1fs",
              vocab_size, model_type, len(sample), sample_mb, time.perf_counter() - start)
  return model.getvalue()


def untrainable_sentence(err: RuntimeError, vocab_size: int, documents: int) -> str:
  """What SentencePiece's refusal means for the flags: the most pieces the sample allows when
  it says so (`Vocabulary size too high (8000). Please set it to a value <= 2395.`)."""
  most = re.search(r"value <= (\d+)", str(err))
  if most:
    return (f"the sampled text ({documents} documents) gives at most {most[1]} tokenizer "
            f"pieces, not --vocab_size {vocab_size}: pass --vocab_size={most[1]} or less, or "
            "add input text")
  return (f"SentencePiece could not train a {vocab_size}-piece tokenizer on the sample "
          f"({err}); lower --vocab_size or add input text")
