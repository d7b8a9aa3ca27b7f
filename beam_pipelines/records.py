"""The on-disk format shared by the pipeline (writer) and `maxlm.data` (reader).

One ArrayRecord record is one packed sequence: the raw bytes of an int32 array of shape
[3, seq_len] whose rows are `tokens`, `segment_ids` and `positions`. `segment_ids` numbers
the documents inside a sequence from 1; 0 marks padding. `positions` restarts at 0 at each
segment start. Pure NumPy, so readers need no Beam.
"""

import numpy as np

RECORD_FORMAT = "maxlm.packed_int32.v1"
RECORD_FIELDS = ("tokens", "segment_ids", "positions")
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.model"
SPLITS = ("train", "validation")
# Pieces every tokenizer reserves: the chat template's turn headers (serving.chat) and the
# placeholder an image's embeddings will replace.
CHAT_TURN_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
IMAGE_TOKEN = "<|image|>"
RESERVED_TOKENS = (*CHAT_TURN_TOKENS.values(), IMAGE_TOKEN)


def encode_packed(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> bytes:
  """Serializes one packed sequence; each argument is [seq_len] integers."""
  return np.stack([tokens, segment_ids, positions]).astype(np.int32).tobytes()


def decode_packed(record: bytes, seq_len: int) -> dict[str, np.ndarray]:
  """Inverse of `encode_packed`: returns {field: int32 [seq_len]}."""
  rows = np.frombuffer(record, dtype=np.int32)
  if rows.size != len(RECORD_FIELDS) * seq_len:
    raise ValueError(
        f"packed record has {rows.size} int32 values, expected {len(RECORD_FIELDS)}x{seq_len}; "
        "was it written with a different --seq_len?")
  rows = rows.reshape(len(RECORD_FIELDS), seq_len)
  return {name: rows[i] for i, name in enumerate(RECORD_FIELDS)}


def read_shard(path: str, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Every packed record of one ArrayRecord shard, decoded, in file order."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
  reader = ArrayRecordReader(path)
  try:
    return [decode_packed(record, seq_len) for record in reader.read_all()]
  finally:
    reader.close()
