"""The tokenizer protocol that training, serving and checkpoints go through, and its two kinds:
SentencePiece (`tokenizer.model`, what `beam_pipelines.prepare_text` trains) and Hugging Face
`tokenizers` (`tokenizer.json`, e.g. Llama 3's byte-level BPE).

The protocol keeps SentencePiece's method names, so a `SentencePieceTokenizer` is still a
`spm.SentencePieceProcessor` everywhere one was expected. `encode` adds no bos or eos: callers
put the bos in front themselves, as they did before.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

from maxlm.errors import UserError

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"  # where transformers >= 4.50 saves the template
# Its eos_token_id (one id or a list): every id generation ends at, as transformers and vLLM
# read it. Llama 3's instruct models list <|eot_id|> (and <|eom_id|>) beside <|end_of_text|>.
HF_GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE)  # a run dir holds one, looked up in order
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
METASPACE = "\u2581"
# Names Hugging Face tokenizers give their bos / eos when tokenizer_config.json does not say.
KNOWN_BOS = ("<s>", "<|begin_of_text|>", "<bos>")
KNOWN_EOS = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


@runtime_checkable
class Tokenizer(Protocol):
  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...

  def piece_to_id(self, piece: str) -> int: ...

  def id_to_piece(self, token_id: int) -> str: ...

  def piece_bytes(self, token_id: int) -> bytes: ...

  def is_control(self, token_id: int) -> bool: ...

  def vocab_size(self) -> int: ...

  def bos_id(self) -> int: ...

  def eos_id(self) -> int: ...

  def pad_id(self) -> int: ...  # -1 when the tokenizer has none

  def stop_ids(self) -> tuple[int, ...]: ...  # every id that ends a generation, eos first


class SentencePieceTokenizer(spm.SentencePieceProcessor):
  """A SentencePiece model; `piece_bytes` added to its own methods."""

  def piece_bytes(self, token_id: int) -> bytes:
    """The bytes one piece stands for: a byte-fallback piece is its raw byte, a control none."""
    piece = self.id_to_piece(token_id)
    if byte := BYTE_PIECE.fullmatch(piece):
      return bytes([int(byte.group(1), 16)])
    if self.is_control(token_id):
      return b""
    return piece.replace(METASPACE, " ").encode()

  _extra_stops: tuple[int, ...] = ()

  def stop_ids(self) -> tuple[int, ...]:
    return _stop_ids(self.eos_id(), self._extra_stops)

  def add_stops(self, token_ids: tuple[int, ...]) -> None:
    self._extra_stops = (*self._extra_stops, *token_ids)


def _stop_ids(eos_id: int, extra_stops: tuple[int, ...]) -> tuple[int, ...]:
  """eos (when the tokenizer has one) first, then the further stop ids, each once."""
  return tuple(dict.fromkeys(((eos_id,) if eos_id >= 0 else ()) + extra_stops))


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer.json, with bos/eos/pad from its tokenizer_config.json (and,
  through `load`, the further ids generation stops at from its generation_config.json)."""

  def __init__(self, tokenizer_json: str, config: dict | None = None):
    import tokenizers  # pylint: disable=import-outside-toplevel
    self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    spec = json.loads(tokenizer_json)
    self._special = {token["id"] for token in spec.get("added_tokens", []) if token["special"]}
    self._byte_level = _has_byte_level_decoder(spec.get("decoder"))
    config = config or {}
    self._bos = self._special_id(config.get("bos_token"), KNOWN_BOS)
    self._eos = self._special_id(config.get("eos_token"), KNOWN_EOS)
    self._pad = self._special_id(config.get("pad_token"), ())
    self.chat_template = _default_template(config.get("chat_template"))
    self._extra_stops: tuple[int, ...] = ()

  def _special_id(self, named, known: tuple[str, ...]) -> int:
    name = named.get("content") if isinstance(named, dict) else named
    for candidate in ([name] if name else list(known)):
      token_id = self._tokenizer.token_to_id(candidate)
      if token_id is not None:
        return token_id
    return -1

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=True)

  def piece_to_id(self, piece: str) -> int:
    token_id = self._tokenizer.token_to_id(piece)
    return self.unk_id() if token_id is None else token_id

  def id_to_piece(self, token_id: int) -> str:
    return self._tokenizer.id_to_token(token_id)

  def piece_bytes(self, token_id: int) -> bytes:
    piece = self.id_to_piece(token_id)
    if piece is None or token_id in self._special:
      return b""
    if self._byte_level:
      return bytes(_UNICODE_TO_BYTE.get(char, 0) for char in piece)
    if byte := BYTE_PIECE.fullmatch(piece):
      return bytes([int(byte.group(1), 16)])
    return piece.replace(METASPACE, " ").encode()

  def is_control(self, token_id: int) -> bool:
    return token_id in self._special

  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def unk_id(self) -> int:
    return self._special_id(None, ("<unk>",))

  def bos_id(self) -> int:
    return self._bos

  def eos_id(self) -> int:
    return self._eos

  def pad_id(self) -> int:
    return self._pad

  def stop_ids(self) -> tuple[int, ...]:
    return _stop_ids(self._eos, self._extra_stops)

  def add_stops(self, token_ids: tuple[int, ...]) -> None:
    self._extra_stops = (*self._extra_stops, *token_ids)


def _has_byte_level_decoder(decoder: dict | None) -> bool:
  if not decoder:
    return False
  if decoder.get("type") == "ByteLevel":
    return True
  return any(_has_byte_level_decoder(step) for step in decoder.get("decoders") or [])


def _byte_level_alphabet() -> dict[int, str]:
  """The byte -> character table of byte-level BPE: printable Latin-1 bytes stand for
  themselves, every other byte for the next unused code point from 256 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  table, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + extra)
      extra += 1
  return table


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_UNICODE_TO_BYTE = {char: byte for byte, char in BYTE_LEVEL_ALPHABET.items()}


def as_tokenizer(tokenizer) -> Tokenizer:
  """A plain `spm.SentencePieceProcessor` becomes a SentencePieceTokenizer; others pass."""
  if isinstance(tokenizer, spm.SentencePieceProcessor) and not isinstance(
      tokenizer, SentencePieceTokenizer):
    return SentencePieceTokenizer(model_proto=tokenizer.serialized_model_proto())
  return tokenizer


def from_bytes(name: str, content: bytes, config: dict | None = None) -> Tokenizer:
  """The tokenizer a file called `name` (tokenizer.model or *.json) holding `content` is."""
  if name.endswith(".json"):
    return HuggingFaceTokenizer(content.decode(), config)
  return SentencePieceTokenizer(model_proto=content)


def load(path: str | os.PathLike) -> Tokenizer:
  """A tokenizer file: SentencePiece's .model, or tokenizer.json with the
  tokenizer_config.json beside it (if any) naming bos/eos/pad; either with the
  generation_config.json beside it (if any: an imported model's) naming the ids generation
  stops at."""
  path = Path(path)
  tokenizer = from_bytes(path.name, path.read_bytes(), sibling_config(path))
  tokenizer.add_stops(generation_stops(path.with_name(HF_GENERATION_CONFIG),
                                       tokenizer.vocab_size()))
  return tokenizer


def generation_stops(path: Path, vocab_size: int) -> tuple[int, ...]:
  """generation_config.json's eos_token_id as a tuple of ids (none when the file or the field
  is absent); a file that is not JSON, or ids that are not the tokenizer's, raise UserError
  naming the file and the field."""
  return stop_ids(read_generation_config(path).get("eos_token_id"), vocab_size, str(path))


def read_generation_config(path: Path) -> dict:
  """A generation_config.json as a dict ({} when there is none); a file that is not a JSON
  object raises UserError naming it."""
  if not path.is_file():
    return {}
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{path} is not valid JSON ({error}); fix it or delete it (it only names "
                    "the ids generation stops at and default sampling settings)") from None
  if not isinstance(config, dict):
    raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object; fix it or "
                    "delete it")
  return config


def stop_ids(eos_token_id, vocab_size: int, where: str) -> tuple[int, ...]:
  """A Hugging Face config's eos_token_id (an id, a list of them, or None) as a tuple of ids;
  anything else, or an id outside the vocabulary, raises UserError naming `where`."""
  ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
  if ids is None:
    return ()
  if not (isinstance(ids, list) and all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids)):
    raise UserError(f"{where}: eos_token_id={json.dumps(eos_token_id)}; give a token id or a "
                    f"list of them, each in [0, {vocab_size}) (the tokenizer's vocabulary)")
  return tuple(ids)


def _default_template(chat_template) -> str | None:
  """tokenizer_config.json's `chat_template`: one Jinja string, or named ones (the "default")."""
  if isinstance(chat_template, list):
    chat_template = next((t.get("template") for t in chat_template
                          if isinstance(t, dict) and t.get("name") == "default"), None)
  return chat_template if isinstance(chat_template, str) else None


def sibling_config(path: Path) -> dict | None:
  """The tokenizer_config.json beside a tokenizer.json, as a dict, with the chat_template.jinja
  beside it as its `chat_template`; None for others."""
  if path.suffix != ".json":
    return None
  config_file = path.with_name(HF_TOKENIZER_CONFIG)
  template_file = path.with_name(HF_CHAT_TEMPLATE)
  config = json.loads(config_file.read_text()) if config_file.is_file() else None
  if template_file.is_file():
    config = {**(config or {}), "chat_template": template_file.read_text()}
  return config


def find(directory: str | os.PathLike) -> Path:
  """The tokenizer file of a run or data dir: tokenizer.model, else tokenizer.json (the
  first name when neither exists, so an error names what to copy there)."""
  directory = Path(directory)
  for name in TOKENIZER_FILES:
    if (directory / name).is_file():
      return directory / name
  return directory / SENTENCEPIECE_FILE


def sha256(path: str | os.PathLike) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()



def copy_into(path: str | os.PathLike, directory: str | os.PathLike) -> Path:
  """Copies a tokenizer file into `directory` as tokenizer.model or tokenizer.json (with the
  generation_config.json beside it, and a .json's tokenizer_config.json and
  chat_template.jinja), where `find` looks; returns the copy."""
  path, directory = Path(path), Path(directory)
  if (generation := path.with_name(HF_GENERATION_CONFIG)).is_file():
    shutil.copy(generation, directory / HF_GENERATION_CONFIG)
  if path.suffix != ".json":
    return Path(shutil.copy(path, directory / SENTENCEPIECE_FILE))
  for sibling in (HF_TOKENIZER_CONFIG, HF_CHAT_TEMPLATE):
    if (source := path.with_name(sibling)).is_file():
      shutil.copy(source, directory / sibling)
  return Path(shutil.copy(path, directory / HF_TOKENIZER_FILE))
