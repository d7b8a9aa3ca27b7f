"""maxlm.tokenizer and its export (maxlm.convert.hf_tokenizer): our SentencePiece ids against
Hugging Face's from the exported files; piece bytes against the text they came from."""

import io
import json

import pytest
import sentencepiece as spm

from beam_pipelines import chat_template, tokenizer_training
from maxlm import tokenizer as tokenizer_lib
from maxlm.convert import hf_tokenizer
from serving.detokenize import TextStream

tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["The quick brown fox jumps over the lazy dog.",
          "Packed documents never see each other; 12345 digits split.",
          "def f(x):\n    return x  # indented", "Äpfel und Birnen"]
# Whitespace runs, characters the tokenizer never saw (byte fallback), reserved tokens.
TEXT = ("Hello  world,\n\n   indented    runs\t\ttabs 2024 \u20ac 漢字 🙂 "
        "<|user|>Hi<|end|>\n<|assistant|>Sure.<|end|>\n")


def train_sentencepiece(model_type: str, **overrides) -> bytes:
  model = io.BytesIO()
  # 256 byte pieces come first; the small corpus may not fill the rest (no hard limit).
  options = {**tokenizer_training.TRAINER_OPTIONS, "num_threads": 1, "hard_vocab_limit": False,
             **overrides}
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 30), model_writer=model, vocab_size=360,
      model_type=model_type, user_defined_symbols=["\n", *chat_template.RESERVED_TOKENS],
      **options)
  return model.getvalue()


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sentencepiece_model(request) -> bytes:
  return train_sentencepiece(request.param)


@pytest.fixture(scope="module")
def byte_level_json() -> str:
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(CORPUS * 10, trainer)
  return tokenizer.to_str()


def test_the_exported_tokenizer_json_gives_our_ids_on_whitespace_bytes_and_reserved_tokens(
    sentencepiece_model):
  ours = tokenizer_lib.SentencePieceTokenizer(model_proto=sentencepiece_model)
  exported = tokenizers.Tokenizer.from_str(
      json.dumps(hf_tokenizer.tokenizer_json(sentencepiece_model)))
  ids = ours.encode(TEXT)
  assert any(ours.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback exercised
  assert exported.encode(TEXT, add_special_tokens=False).ids == ids
  assert exported.decode(ids, skip_special_tokens=True) == ours.decode(ids) == TEXT


def test_transformers_loads_the_exported_files_with_our_ids_and_chat_template(
    sentencepiece_model, tmp_path):
  transformers = pytest.importorskip("transformers")
  from maxlm.convert import to_hf  # pylint: disable=import-outside-toplevel
  (tmp_path / "spm").mkdir()
  (tmp_path / "spm" / "tokenizer.model").write_bytes(sentencepiece_model)
  (tmp_path / "out").mkdir()
  to_hf.write_tokenizer(tmp_path / "out", tmp_path / "spm" / "tokenizer.model", 128)
  loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  ours = tokenizer_lib.SentencePieceTokenizer(model_proto=sentencepiece_model)
  assert loaded(TEXT, add_special_tokens=False).input_ids == ours.encode(TEXT)
  assert loaded(TEXT).input_ids == [ours.bos_id(), *ours.encode(TEXT)]  # as serving encodes
  assert (loaded.bos_token_id, loaded.eos_token_id) == (ours.bos_id(), ours.eos_id())
  messages = [("system", "Be  terse."), ("user", "Hi 🙂"), ("assistant", "Hello.")]
  as_dicts = [{"role": role, "content": content} for role, content in messages]
  assert loaded.apply_chat_template(as_dicts, tokenize=False) == (
      loaded.bos_token + chat_template.render(messages))
  prompt = chat_template.chat_prompt(messages[:2])
  assert loaded.apply_chat_template(as_dicts[:2], tokenize=False, add_generation_prompt=True) == (
      loaded.bos_token + prompt)
  # transformers tokenizes the rendered text without adding special tokens: the template's bos
  # makes the ids SFT trained on and the server reads.
  ids = loaded.apply_chat_template(as_dicts[:2], add_generation_prompt=True, return_dict=True)
  assert ids["input_ids"] == [ours.bos_id(), *ours.encode(prompt)]


def test_a_sentencepiece_model_that_normalizes_text_is_not_exported_as_tokenizer_json():
  model = train_sentencepiece("bpe", normalization_rule_name="nmt_nfkc")
  with pytest.raises(ValueError, match="normalizes text"):
    hf_tokenizer.tokenizer_json(model)


def test_byte_level_piece_bytes_rebuild_the_text_and_stream_it_incrementally(byte_level_json):
  tokenizer = tokenizer_lib.HuggingFaceTokenizer(
      byte_level_json, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
  ids = tokenizer.encode(TEXT)
  assert b"".join(tokenizer.piece_bytes(i) for i in ids) == TEXT.encode()
  assert (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()) == (0, 1, -1)
  assert tokenizer.piece_bytes(tokenizer.bos_id()) == b""
  stream = TextStream(tokenizer.decode)
  streamed = "".join(stream.push(i)[0] for i in ids) + stream.flush()
  assert streamed == TEXT


def test_bos_and_eos_fall_back_to_the_usual_names_without_a_tokenizer_config(byte_level_json):
  tokenizer = tokenizer_lib.HuggingFaceTokenizer(byte_level_json)
  assert (tokenizer.bos_id(), tokenizer.eos_id()) == (0, 1)


def test_sentencepiece_piece_bytes_are_raw_bytes_for_byte_fallback_and_none_for_control(
    sentencepiece_model):
  tokenizer = tokenizer_lib.SentencePieceTokenizer(model_proto=sentencepiece_model)
  assert b"".join(tokenizer.piece_bytes(i) for i in tokenizer.encode(TEXT)) == TEXT.encode()
  assert tokenizer.piece_bytes(tokenizer.bos_id()) == b""


def test_load_and_find_pick_the_kind_by_file(sentencepiece_model, byte_level_json, tmp_path):
  (tmp_path / "tokenizer.json").write_text(byte_level_json)
  assert tokenizer_lib.find(tmp_path).name == "tokenizer.json"
  assert isinstance(tokenizer_lib.load(tokenizer_lib.find(tmp_path)),
                    tokenizer_lib.HuggingFaceTokenizer)
  (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model)
  assert isinstance(tokenizer_lib.load(tokenizer_lib.find(tmp_path)),
                    tokenizer_lib.SentencePieceTokenizer)
  plain = spm.SentencePieceProcessor(model_proto=sentencepiece_model)
  assert isinstance(tokenizer_lib.as_tokenizer(plain), tokenizer_lib.Tokenizer)


def test_a_vocab_size_past_what_the_sample_gives_names_the_most_it_gives():
  sample = ["the quick brown fox jumps over the lazy dog"] * 20
  with pytest.raises(ValueError) as error:
    tokenizer_training.train_tokenizer(sample, vocab_size=5000)
  most = int(str(error.value).split("gives at most ")[1].split()[0])
  assert f"pass --vocab_size={most} or less" in str(error.value)
  assert spm.SentencePieceProcessor(model_proto=tokenizer_training.train_tokenizer(
      sample, vocab_size=most)).get_piece_size() == most  # the number it names trains


@pytest.mark.parametrize("chat_template, kept", [
    ("{{ messages }}", "{{ messages }}"),
    ([{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}], "d"),
    ([{"name": "tool_use", "template": "t"}], None), (None, None)])
def test_a_tokenizer_config_s_chat_template_is_its_string_or_the_one_named_default(
    byte_level_json, chat_template, kept):
  config = {} if chat_template is None else {"chat_template": chat_template}
  assert tokenizer_lib.HuggingFaceTokenizer(byte_level_json, config).chat_template == kept
