"""A SentencePiece model as Hugging Face's tokenizer.json and tokenizer_config.json, giving the
same ids, plus the chat template that renders what `beam_pipelines.chat_template` renders.

The pieces, their scores and types come from the model file's protobuf, read field by field
(SentencePiece's generated protobuf module pins a protobuf runtime the rest of the stack may
not have). A BPE model becomes a `tokenizers` BPE whose merges are ranked by the merged
piece's score, which is the order SentencePiece merges in; a unigram model keeps its scores.
"""

import json
import struct

from beam_pipelines import chat_template

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe"}
METASPACE = "\u2581"


def _fields(data: bytes):
  """(field number, value) of a protobuf message: ints for varints, bytes when delimited."""
  at = 0
  while at < len(data):
    key, at = _varint(data, at)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, at = _varint(data, at)
    elif wire == 2:
      length, at = _varint(data, at)
      value, at = data[at:at + length], at + length
    elif wire == 5:
      value, at = data[at:at + 4], at + 4
    elif wire == 1:
      value, at = data[at:at + 8], at + 8
    else:
      raise ValueError(f"the SentencePiece model has protobuf wire type {wire}; is it one?")
    yield field, value


def _varint(data: bytes, at: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = data[at]
    value |= (byte & 0x7F) << shift
    at, shift = at + 1, shift + 7
    if not byte & 0x80:
      return value, at


def read_model(model_proto: bytes) -> dict:
  """{pieces: [(piece, score, type)], model_type, add_dummy_prefix, normalization} of a
  serialized SentencePiece ModelProto."""
  pieces, model_type, normalizer = [], 1, {}
  for field, value in _fields(model_proto):
    if field == 1:
      piece = dict(_fields(value))
      score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
      pieces.append((piece[1].decode(), score, piece.get(3, NORMAL)))
    elif field == 2:
      model_type = dict(_fields(value)).get(3, 1)
    elif field == 3:
      normalizer = dict(_fields(value))
  return {"pieces": pieces, "model_type": MODEL_TYPES.get(model_type, str(model_type)),
          "add_dummy_prefix": bool(normalizer.get(3, 1)),
          "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
          "normalization": normalizer.get(1, b"nmt_nfkc").decode()}


def tokenizer_json(model_proto: bytes) -> dict:
  """tokenizer.json of a SentencePiece model; refuses what `tokenizers` cannot reproduce."""
  model = read_model(model_proto)
  if model["normalization"] != "identity" or model["remove_extra_whitespaces"]:
    raise ValueError(f"the SentencePiece model normalizes text ({model['normalization']}, "
                     f"remove_extra_whitespaces={model['remove_extra_whitespaces']}), which "
                     "tokenizer.json would not reproduce id for id; export it with "
                     "tokenizer.model alone")
  pieces = model["pieces"]
  unk = next((piece for piece, _, kind in pieces if kind == UNKNOWN), None)
  added = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": kind != USER_DEFINED}
           for i, (piece, _, kind) in enumerate(pieces)
           if kind in (CONTROL, UNKNOWN, USER_DEFINED)]
  normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}]
  decoders = [{"type": "Replace", "pattern": {"String": METASPACE}, "content": " "},
              {"type": "ByteFallback"}, {"type": "Fuse"}]
  if model["add_dummy_prefix"]:
    normalizers.insert(0, {"type": "Prepend", "prepend": METASPACE})
    decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  if model["model_type"] == "bpe":
    body = _bpe(pieces, unk)
  elif model["model_type"] == "unigram":
    body = {"type": "Unigram", "unk_id": next(i for i, p in enumerate(pieces) if p[2] == UNKNOWN),
            "vocab": [[piece, score] for piece, score, _ in pieces], "byte_fallback": True}
  else:
    raise ValueError(f"the SentencePiece model is of type {model['model_type']}; tokenizer.json "
                     "export supports bpe and unigram")
  return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": {"type": "Sequence", "normalizers": normalizers},
          "pre_tokenizer": None, "post_processor": _bos_first(pieces),
          "decoder": {"type": "Sequence", "decoders": decoders}, "model": body}


def _bpe(pieces: list[tuple[str, float, int]], unk: str | None) -> dict:
  """Every way to cut a normal piece in two vocabulary pieces is a merge, ranked by the
  merged piece's score (highest first), then by its halves' ids."""
  vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
  mergeable = {piece for piece, _, kind in pieces if kind in (NORMAL, UNUSED)}
  merges = []
  for piece, score, kind in pieces:
    if kind != NORMAL:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in mergeable and right in mergeable:
        merges.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
  merges.sort()
  return {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
          "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
          "ignore_merges": False, "vocab": vocab,
          "merges": [[left, right] for *_, left, right in merges]}


def _bos_first(pieces: list[tuple[str, float, int]]) -> dict | None:
  """The post-processor that puts the bos in front, as `serving.engine` does."""
  bos = next((i for i, (piece, _, _) in enumerate(pieces) if piece == "<s>"), None)
  if bos is None:
    return None
  return {"type": "TemplateProcessing",
          "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}}],
          "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"Sequence": {"id": "B", "type_id": 1}}],
          "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}}


def chat_template_jinja() -> str:
  """Jinja that renders the bos, then `chat_template.render(messages)`, plus the assistant's
  header when `add_generation_prompt` (what `chat_template.chat_prompt` renders). The bos is
  the template's, as in Llama's: transformers tokenizes the text without special tokens, and
  SFT trained (and serving reads) each conversation after a bos."""
  headers = json.dumps(chat_template.CHAT_TURN_TOKENS)
  end = json.dumps(chat_template.END_TOKEN + chat_template.TURN_SEPARATOR)
  return ("{% if bos_token %}{{ bos_token }}{% endif %}"
          "{% set headers = " + headers + " %}"
          "{% for message in messages %}"
          "{% if message['role'] not in headers %}"
          "{{ raise_exception('unknown chat role ' + message['role'] + '; use one of "
          + ", ".join(chat_template.ROLES) + "') }}{% endif %}"
          "{{ headers[message['role']] + message['content'] + " + end + " }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ headers['assistant'] }}{% endif %}")


def tokenizer_config(bos: str | None, eos: str | None, pad: str | None, unk: str | None,
                     max_len: int) -> dict:
  """tokenizer_config.json: `tokenizers` pipeline as stored (no class of transformers' own
  rebuilds it), the special tokens, and our chat template."""
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "clean_up_tokenization_spaces": False, "chat_template": chat_template_jinja()}
  for name, token in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad),
                      ("unk_token", unk)):
    if token is not None:
      config[name] = token
  return config
