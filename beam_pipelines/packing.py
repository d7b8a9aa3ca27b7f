"""Greedy packing of tokenized documents into fixed-length sequences."""

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

PAD_ID = 0

PackedSequence = tuple[np.ndarray, np.ndarray, np.ndarray]


def _empty_sequence(seq_len: int) -> PackedSequence:
  return (np.full(seq_len, PAD_ID, np.int32), np.zeros(seq_len, np.int32),
          np.zeros(seq_len, np.int32))


def pack_documents(docs: Iterable[Sequence[int] | np.ndarray], seq_len: int) -> Iterator[PackedSequence]:
  """Concatenates documents into [seq_len] (tokens, segment_ids, positions) triples.

  A document that does not fit continues in the next sequence as a new segment, so no token
  is lost. Segments are numbered from 1 within each sequence and their positions restart at 0;
  only the last sequence yielded is padded (token PAD_ID, segment 0, position 0).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  positions_template = np.arange(seq_len, dtype=np.int32)
  tokens, segment_ids, positions = _empty_sequence(seq_len)
  filled = segment = 0
  for doc in docs:
    doc = np.asarray(doc, dtype=np.int32)
    start = 0
    while start < len(doc):
      take = min(seq_len - filled, len(doc) - start)
      segment += 1
      tokens[filled:filled + take] = doc[start:start + take]
      segment_ids[filled:filled + take] = segment
      positions[filled:filled + take] = positions_template[:take]
      filled += take
      start += take
      if filled == seq_len:
        yield tokens, segment_ids, positions
        tokens, segment_ids, positions = _empty_sequence(seq_len)
        filled = segment = 0
  if filled:
    yield tokens, segment_ids, positions
