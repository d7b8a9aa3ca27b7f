"""The evaluators' input files (maxlm.evals.files and the readers of multiple_choice,
generation and perplexity): a field of the wrong type, a missing path, a directory or bytes
that are not UTF-8 are each one UserError naming the file, the line and the field; no model
is loaded."""

import json
import re

import pytest

from maxlm.errors import UserError
from maxlm.evals import generation, multiple_choice
from maxlm.evals.generation import Generation
from maxlm.evals.multiple_choice import MultipleChoice
from maxlm.evals.perplexity import Perplexity

GOOD_ITEM = {"context": "The sky is", "choices": ["blue", "green"], "gold": 0}
THREE_CHOICES = {"context": "The answer is", "choices": [" yes", " no", " maybe"], "gold": 2}


def jsonl(tmp_path, *records, name="items.jsonl"):
  path = tmp_path / name
  path.write_text("".join(json.dumps(record) + "\n" for record in records))
  return path


@pytest.mark.parametrize("field, value", [
    ("choices", " yes"),  # a string, not a list: was scored as the choices " ", "y", "e", "s"
    ("choices", []),
    ("choices", ["blue", 7]),
    ("gold", 1.7),  # was truncated to 1
    ("gold", 1.0),
    ("gold", "0"),  # was read as 0
    ("gold", True),
    ("context", 5),  # was read as "5"
    ("context", None),
])
def test_a_multiple_choice_field_of_the_wrong_type_is_refused_naming_the_line_and_field(
    tmp_path, field, value):
  path = jsonl(tmp_path, GOOD_ITEM, {**THREE_CHOICES, field: value})
  with pytest.raises(UserError, match="^" + re.escape(f'{path}:2: "{field}" is '
                                                      f"{json.dumps(value)}; write ")):
    multiple_choice.read_items(path)


def test_well_typed_multiple_choice_items_read_as_written(tmp_path):
  second = {"context": "", "choices": ["x"], "gold": 0}
  items = multiple_choice.read_items(jsonl(tmp_path, GOOD_ITEM, second))
  assert items == [multiple_choice.Item("The sky is", ["blue", "green"], 0),
                   multiple_choice.Item("", ["x"], 0)]


@pytest.mark.parametrize("line", ['["context", "choices", "gold"]', '{"context": "x"}',
                                  '{"context": "x", "choices": ["a"], "gold": 0'])
def test_a_line_that_is_not_a_multiple_choice_object_is_refused_naming_it(tmp_path, line):
  path = tmp_path / "items.jsonl"
  path.write_text(json.dumps(GOOD_ITEM) + "\n\n" + line + "\n")
  with pytest.raises(UserError, match=rf"^{path}:3 is not a multiple-choice item \("):
    multiple_choice.read_items(path)


@pytest.mark.parametrize("field", ["prompt", "target"])
@pytest.mark.parametrize("value", [4, None, ["4"]])
def test_a_generation_prompt_or_target_that_is_not_a_string_is_refused(tmp_path, field, value):
  path = jsonl(tmp_path, {"prompt": "2 + 2 =", "target": "4"},
               {"prompt": "2 + 2 =", "target": "4", field: value})
  with pytest.raises(UserError, match="^" + re.escape(f'{path}:2: "{field}" is '
                                                      f"{json.dumps(value)}; write a string")):
    generation.read_items(path, None)


def test_a_missing_items_file_is_one_line_not_a_traceback(tmp_path):
  with pytest.raises(UserError, match=rf"^{tmp_path}/nope.jsonl does not exist; pass an "):
    multiple_choice.read_items(tmp_path / "nope.jsonl")
  with pytest.raises(UserError, match=rf"^{tmp_path} is a directory; pass a JSONL file"):
    generation.read_items(tmp_path, None)


def test_bytes_that_are_not_utf8_are_refused_naming_the_file_and_line(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(json.dumps(GOOD_ITEM).encode() + b"\n" +
                   json.dumps({**GOOD_ITEM, "context": "caf\xe9"}, ensure_ascii=False
                              ).encode("latin-1") + b"\n")
  with pytest.raises(UserError, match=rf"^{path}:2 is not UTF-8 \(byte 0xe9\); save the file"):
    multiple_choice.read_items(path)


def test_perplexity_inputs_are_checked_before_a_model_is_needed(tmp_path):
  (tmp_path / "latin1.txt").write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(UserError, match=rf"^{tmp_path}/latin1.txt:2 is not UTF-8"):
    Perplexity(str(tmp_path / "*.txt")).check_inputs()
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="is a directory without manifest.json; pass a data dir"):
    Perplexity(str(tmp_path / "empty")).check_inputs()
  with pytest.raises(UserError, match="nor a glob that matches text files"):
    Perplexity(str(tmp_path / "*.md")).check_inputs()


@pytest.mark.parametrize("task, name", [
    (Perplexity("/data/stdlib-py3.12-v4096-s256-h0.03-r5"), "stdlib-py3.12-v4096-s256-h0.03-r5"),
    (Perplexity("/data/stdlib-py3.12-v4096-s256-h0.03-r5/"), "stdlib-py3.12-v4096-s256-h0.03-r5"),
    (Perplexity("/data/held_out/*.py"), "held_out"),
    (Perplexity("/data/book.txt"), "book"),
    (Perplexity("*.txt"), "perplexity"),
    (MultipleChoice("/data/arc.easy.jsonl"), "arc.easy"),
    (MultipleChoice("/data/arc", name="mine"), "mine"),
    (Generation("/data/gsm8k.json"), "gsm8k"),
])
def test_a_tasks_default_name_is_its_paths_last_part_less_a_known_suffix(task, name):
  assert task.task_name == name


def test_a_file_of_no_items_is_refused_by_either_reader(tmp_path):
  path = tmp_path / "blank.jsonl"
  path.write_text("\n  \n")
  for read in (multiple_choice.read_items, lambda p: generation.read_items(p, None)):
    with pytest.raises(UserError, match=f"^{re.escape(str(path))} holds no items$"):
      read(path)
