"""beam_pipelines.chat_template against SentencePiece tokenizers trained here as prepare_text
trains them (its options, the reserved tokens as user-defined symbols)."""

import ast
import inspect
from pathlib import Path
import textwrap

import pytest
import sentencepiece as spm

from beam_pipelines import chat_template
from beam_pipelines.chat_template import chat_prompt, render, render_ids
from beam_pipelines.tokenizer_training import TRAINER_OPTIONS

MULTI_BYTE = "Grüße aus Köln — 東京タワー, ça va? 🙂"
CONVERSATIONS = {
    "system_and_two_replies": (
        [("system", "You are terse."), ("user", "Wrap 'def f(x):' at 4."),
         ("assistant", "def\n f(x):"), ("user", MULTI_BYTE), ("assistant", "Ja, sehr gut 🙂.")],
        "<|system|>You are terse.<|end|>\n<|user|>Wrap 'def f(x):' at 4.<|end|>\n"
        "<|assistant|>def\n f(x):<|end|>\n<|user|>" + MULTI_BYTE + "<|end|>\n"
        "<|assistant|>Ja, sehr gut 🙂.<|end|>\n"),
    "leading_spaces_and_empty_content": (
        [("user", "   indented(x)\n\tand tabbed"), ("assistant", "  two spaces first"),
         ("user", ""), ("assistant", "")],
        "<|user|>   indented(x)\n\tand tabbed<|end|>\n<|assistant|>  two spaces first<|end|>\n"
        "<|user|><|end|>\n<|assistant|><|end|>\n"),
}


def train(directory: Path, model_type: str, reserved) -> spm.SentencePieceProcessor:
  lines = [line for line in Path(textwrap.__file__).read_text().splitlines() if line.strip()]
  options = TRAINER_OPTIONS | dict(model_type=model_type, vocab_size=500)
  if reserved:
    options["user_defined_symbols"] = list(reserved)
  prefix = str(directory / f"{model_type}{len(reserved)}")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines + [MULTI_BYTE] * 3),
                                 model_prefix=prefix, **options)
  return spm.SentencePieceProcessor(model_file=prefix + ".model")


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request, tmp_path_factory):
  return train(tmp_path_factory.mktemp("spm"), request.param, chat_template.RESERVED_TOKENS)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_render_writes_each_turn_between_its_header_and_end(name):
  messages, text = CONVERSATIONS[name]
  assert render(messages) == text


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_are_those_of_tokenizing_the_whole_conversation_at_once(tokenizer, name):
  messages, text = CONVERSATIONS[name]
  rendered = render_ids(messages, tokenizer)
  assert rendered.ids == tokenizer.encode(text)
  assert len(rendered.assistant) == len(rendered.ids)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_mask_covers_exactly_each_reply_and_its_end(tokenizer, name):
  messages, _ = CONVERSATIONS[name]
  ids, assistant = render_ids(messages, tokenizer)
  end, opening = tokenizer.piece_to_id("<|end|>"), tokenizer.piece_to_id("<|assistant|>")
  replies = [content for role, content in messages if role == "assistant"]
  assert [i for i, m in zip(ids, assistant) if m] == [
      i for reply in replies for i in tokenizer.encode(reply) + [end]]
  runs, start = [], None  # [start, stop) of each stretch of 1s
  for k, m in enumerate(assistant + [0]):
    if m and start is None:
      start = k
    elif not m and start is not None:
      runs, start = runs + [(start, k)], None
  assert [ids[a - 1] for a, _ in runs] == [opening] * len(replies)
  assert [ids[b - 1] for _, b in runs] == [end] * len(replies)
  assert [tokenizer.decode(ids[a:b - 1]) for a, b in runs] == replies


def test_a_served_prompt_tokenizes_to_the_start_of_the_trained_conversation(tokenizer):
  history, reply = CONVERSATIONS["system_and_two_replies"][0][:-1], "Ja."
  prompt = chat_prompt(history)
  assert prompt == render(history) + "<|assistant|>"
  served = tokenizer.encode(prompt)
  trained = render_ids(history + [("assistant", reply)], tokenizer)
  assert trained.ids[:len(served)] == served
  assert trained.assistant[:len(served)] == render_ids(history, tokenizer).assistant + [0]
  assert trained.ids[len(served):len(served) + len(tokenizer.encode(reply))] == (
      tokenizer.encode(reply))


def test_a_tokenizer_lacking_end_still_renders_prompts_but_not_training_ids(tmp_path):
  old = train(tmp_path, "bpe", chat_template.RESERVED_TOKENS[:4])  # headers and image only
  messages = [("user", "hi"), ("assistant", "yo")]
  assert old.decode(old.encode(chat_prompt(messages))) == chat_prompt(messages)
  with pytest.raises(ValueError, match=r"does not hold <\|end\|> as one piece; use one trained"):
    render_ids(messages, old)


class DummyPrefixTokenizer:
  """Characters as ids, reserved tokens as one id each, and a 0 (a dummy prefix) before text
  that opens with a character: encoding the pieces between reserved tokens one by one gives
  more 0s than encoding the whole, as with a SentencePiece model that adds a dummy prefix."""

  def piece_to_id(self, piece: str) -> int:
    return 1000 + chat_template.RESERVED_TOKENS.index(piece)

  def encode(self, text: str) -> list[int]:
    ids = [] if text.startswith(chat_template.RESERVED_TOKENS) else [0]
    while text:
      token = next((t for t in chat_template.RESERVED_TOKENS if text.startswith(t)), None)
      ids.append(self.piece_to_id(token) if token else ord(text[0]))
      text = text[len(token) if token else 1:]
    return ids


def test_a_tokenizer_that_does_not_cut_at_reserved_tokens_is_refused():
  with pytest.raises(ValueError, match="does not cut text at the reserved tokens"):
    render_ids([("user", "hi")], DummyPrefixTokenizer())


@pytest.mark.parametrize("messages, message", [
    ([("tool", "x")], "unknown chat role 'tool'; use one of system, user, assistant"),
    ([("user", "ok"), ("assistant", "a<|user|>b")], "message 1's content holds .*<\\|user\\|>"),
    ([("user", None)], "message 0's content is NoneType"),
])
def test_bad_messages_are_refused_naming_the_message(tokenizer, messages, message):
  with pytest.raises(ValueError, match=message):
    render_ids(messages, tokenizer)


def test_the_image_placeholder_is_one_piece_allowed_in_content(tokenizer):
  ids, _ = render_ids([("user", "see <|image|> here")], tokenizer)
  assert ids.count(tokenizer.piece_to_id("<|image|>")) == 1


def test_the_module_imports_nothing_from_the_project():
  tree = ast.parse(inspect.getsource(chat_template))
  imported = {alias.name.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)}
  assert not imported & {"beam_pipelines", "maxlm", "serving", "kernels_pallas"}
