"""maxlm.default_chat: the stdlib instruction and preference sets, and their data dirs."""

import ast
import json
import random
from pathlib import Path
import textwrap

import pytest
import sentencepiece as spm

from beam_pipelines import chat_template
from beam_pipelines import dataset_manifest
from beam_pipelines import records
from beam_pipelines.tokenizer_training import TRAINER_OPTIONS
from maxlm import default_chat
from maxlm.default_chat import Item, Sizes

SMALL = Sizes(chat_train=300, chat_validation=60, preference_train=200,
              preference_validation=40)


@pytest.fixture(scope="module")
def items():
  return default_chat.stdlib_items()


@pytest.fixture(scope="module")
def sets(tmp_path_factory, items):
  return default_chat.write_default_sets(tmp_path_factory.mktemp("sets"), items, SMALL)


def read_jsonl(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def statement(user_content: str) -> str:
  return user_content.rsplit("\n", 1)[1]


@pytest.mark.parametrize("line, item", [
    ("def join(a, *p):", Item("def", "def join(a, *p):", ("join", "a, *p"))),
    ("async def read(self, n=-1) -> bytes:",
     Item("def", "async def read(self, n=-1) -> bytes:", ("read", "self, n=-1"))),
    ("class Popen(object):", Item("class", "class Popen(object):", ("Popen", "object"))),
    ("import os.path", Item("import", "import os.path", ("os.path",))),
    ("from io import StringIO, BytesIO",
     Item("from", "from io import StringIO, BytesIO", ("io", "StringIO, BytesIO"))),
    ("def f():", None),  # nothing to ask about parameters
    ("class Plain:", None),
    ("import numpy as np", None),
    ("from a import b as c", None),
    ("def grüße(x):", None),
    ("def f(" + "x, " * 30 + "y):", None),
    ("x = 1", None),
])
def test_item_of_line_takes_the_parts_each_question_asks_for(line, item):
  assert default_chat.item_of_line(line) == item


def reference_answer(question_text: str, line: str) -> str | None:
  """What Python's own parser says the question asks for; None for source text answers."""
  node = ast.parse(line + ("\n  pass" if line.endswith(":") else "")).body[0]
  if question_text.startswith("What is the name"):
    return node.name
  if question_text == "Which module does this line import?":
    return node.names[0].name
  if question_text == "Which module does this line import from?":
    return "." * node.level + (node.module or "")
  if question_text == "Which names does this line import?":
    return ", ".join(alias.name for alias in node.names)
  return None


def test_every_answer_is_read_off_the_line_in_the_question(sets):
  for split in ("train", "validation"):
    for messages, answer in default_chat.questions_and_answers(sets[f"chat_{split}"]):
      user = [m["content"] for m in messages if m["role"] == "user"]
      line = statement(user[0])
      assert answer in line
      expected = reference_answer(user[-1].split("\n")[0], line)
      assert expected is None or answer == expected


def test_validation_rows_ask_about_lines_no_training_row_shows(sets):
  def lines(name):
    rows = read_jsonl(sets[name])
    firsts = [next(m["content"] for m in r["messages"] if m["role"] == "user")
              if "messages" in r else r["prompt"] if isinstance(r["prompt"], str)
              else r["prompt"][-1]["content"] for r in rows]
    return {statement(text) for text in firsts}
  for stem in ("chat", "preference"):
    train, validation = lines(f"{stem}_train"), lines(f"{stem}_validation")
    assert validation and not train & validation


def reply(value) -> str:
  return value if isinstance(value, str) else value[0]["content"]


def test_preference_pairs_prefer_the_answer_read_off_the_line(sets):
  for split in ("train", "validation"):
    for row in read_jsonl(sets[f"preference_{split}"]):
      prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
      chosen, rejected = reply(row["chosen"]), reply(row["rejected"])
      assert chosen != rejected and chosen in statement(prompt)
      expected = reference_answer(prompt.split("\n")[0], statement(prompt))
      assert expected is None or chosen == expected


def test_the_sets_have_the_requested_sizes_every_kind_and_are_reproducible(tmp_path, items, sets):
  again = default_chat.write_default_sets(tmp_path, items, SMALL)
  for name, path in sets.items():
    assert len(read_jsonl(path)) == getattr(SMALL, name)
    assert Path(path).read_bytes() == again[name].read_bytes()
  questions = {m["content"].split("\n")[0] for row in read_jsonl(sets["chat_train"])
               for m in row.get("messages", [{"role": "user", "content": row.get("prompt")}])
               if m["role"] == "user"}
  assert {q for _, q, _ in default_chat.QUESTIONS} | {default_chat.FOLLOW_UP} <= questions


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
  """A data dir with a tokenizer trained as prepare_text trains one."""
  directory = tmp_path_factory.mktemp("tokenizer")
  lines = [line for line in Path(textwrap.__file__).read_text().splitlines() if line.strip()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"),
      **(TRAINER_OPTIONS | {"model_type": "bpe", "vocab_size": 500,
                            "user_defined_symbols": ["\n", *chat_template.RESERVED_TOKENS]}))
  proto = (directory / records.TOKENIZER_NAME).read_bytes()
  entry = dataset_manifest.tokenizer_entry(proto, "bpe", list(records.RESERVED_TOKENS))
  (directory / records.MANIFEST_NAME).write_text(json.dumps({"seq_len": 256, "tokenizer": entry}))
  return directory


def test_ensure_default_chat_prepares_both_sets_once(tmp_path, tokenizer_dir, items,
                                                     monkeypatch):
  few = Sizes(chat_train=40, chat_validation=10, preference_train=30, preference_validation=8)
  build = lambda kind: default_chat.ensure_default_chat(
      kind, str(tokenizer_dir), cache_dir=str(tmp_path), sizes=few, items=items[::50])
  sft, preference = build("sft"), build("preference")
  for directory, kind, train, validation in ((sft, "sft", 40, 10),
                                             (preference, "preference", 30, 8)):
    manifest = json.loads((Path(directory) / records.MANIFEST_NAME).read_text())
    assert manifest["kind"] == kind and manifest["seq_len"] == 256
    assert manifest["report"]["dead_letters"] == 0
    assert (manifest["splits"]["train"]["documents"],
            manifest["splits"]["validation"]["documents"]) == (train, validation)
  assert (Path(sft).parent / "chat_validation.jsonl").exists()
  monkeypatch.setattr(default_chat, "build", lambda *args: pytest.fail("rebuilt a cached set"))
  assert build("sft") == sft


def test_a_renamed_line_is_valid_python_asking_for_the_spans_of_its_own_line(items):
  rng, pieces = random.Random(0), default_chat.identifier_pieces(items)
  renamed = [(item, default_chat.renamed(item, pieces, rng)) for item in items[::20]]
  assert sum(new.line != item.line for item, new in renamed) > 0.8 * len(renamed)
  for item, new in [(item, new) for item, new in renamed if new.line != item.line]:
    node = ast.parse(new.line + ("\n  pass" if new.line.endswith(":") else "")).body[0]
    assert new.kind == item.kind and new.parts[0] in new.line
    if new.kind in ("def", "class"):
      assert new.parts[0] == node.name
    else:
      assert new.parts[0] == (node.names[0].name if new.kind == "import"
                              else "." * node.level + (node.module or ""))


def test_training_rows_mostly_ask_about_renamed_lines_and_validation_rows_about_real_ones(sets,
                                                                                         items):
  def lines(name):
    return [statement(next(m["content"] for m in messages if m["role"] == "user"))
            for messages, _ in default_chat.questions_and_answers(sets[name])]
  real = {item.line for item in items}
  train = lines("chat_train")
  assert 0.75 * len(train) < sum(line not in real for line in train) < len(train)
  assert set(lines("chat_validation")) <= real
