"""benchmarks/vision_accuracy.py's questions and scoring: the validation rows it reads, the
request it sends (an image_url data URL part the server decodes back to the PNG's bytes), and
the four fractions, against hand-counted replies."""

import base64
import dataclasses
import json

import pytest

from benchmarks import vision_accuracy
from maxlm.default_vision import DIGIT_QUESTION, SHAPE_QUESTION
from maxlm.model import ModelConfig
from maxlm.model.vit import VisionConfig


def question(text: str, answer: str) -> dict:
  return {"image": None, "question": text, "answer": answer}


def test_a_digit_is_right_only_when_the_reply_is_the_digit_and_a_shape_needs_both_words():
  questions = [question(DIGIT_QUESTION, "7"), question(DIGIT_QUESTION, "1"),
               question(SHAPE_QUESTION, "a red circle"), question(SHAPE_QUESTION, "a blue square"),
               question(SHAPE_QUESTION, "a green triangle"),
               question(SHAPE_QUESTION, "a purple circle")]
  replies = ["7", "7", "a red circle", "a blue circle", "a red triangle", "a purple circle."]
  assert vision_accuracy.scores(questions, replies) == {
      "digit": 1 / 2, "shape": 2 / 4, "shape_color": 3 / 4, "shape_kind": 3 / 4}


def test_the_validation_rows_become_questions_with_their_image_files(tmp_path):
  rows = [{"image": "images/d0000.png", "messages": [
      {"role": "user", "content": DIGIT_QUESTION}, {"role": "assistant", "content": "0"}]}]
  (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  [asked] = vision_accuracy.held_out_questions(tmp_path / "validation.jsonl")
  assert asked == {"image": tmp_path / "images/d0000.png", "question": DIGIT_QUESTION,
                   "answer": "0"}


def test_the_image_travels_as_a_base64_png_data_url(tmp_path):
  png = tmp_path / "a.png"
  png.write_bytes(b"\x89PNG not really")
  url = vision_accuracy.data_url(png)
  assert url.startswith("data:image/png;base64,")
  assert base64.b64decode(url.split(",", 1)[1]) == png.read_bytes()


@pytest.mark.parametrize("reply, said", [("A Red circle.", ["a", "red", "circle"]), ("", [])])
def test_words_are_lowercase_without_the_full_stop(reply, said):
  assert vision_accuracy.words(reply) == said


def run_meta(vision, data_dir) -> dict:
  config = ModelConfig(vocab_size=64, vision=vision)
  return {"model_config": dataclasses.asdict(config), "data_dir": str(data_dir)}


@pytest.mark.parametrize("case, message", [
    ("missing", "--run_dir: {tmp}/run holds no checkpoints/ directory"),
    ("text-only", "--run_dir {tmp}/run is a text-only run (no ModelConfig.vision)"),
    ("no held-out rows", "--run_dir {tmp}/run was trained on {tmp}/data/records, which has no "
     "validation.jsonl beside it"),
])
def test_a_run_it_cannot_ask_is_one_line_and_exit_2_before_a_server_starts(
    case, message, tmp_path, monkeypatch, capsys):
  (tmp_path / "data" / "records").mkdir(parents=True)
  if case != "no held-out rows":
    (tmp_path / "data" / "validation.jsonl").write_text("")
  if case != "missing":
    meta = run_meta(None if case == "text-only" else VisionConfig(), tmp_path / "data/records")
    monkeypatch.setattr(vision_accuracy.checkpoint, "read_meta", lambda run_dir: (1, meta))
  def started(*args):
    raise AssertionError("a server started")
  monkeypatch.setattr(vision_accuracy, "Server", started)
  with pytest.raises(SystemExit) as exited:
    vision_accuracy.main([f"--run_dir={tmp_path}/run"])
  error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert exited.value.code == 2
  assert len(error_lines) == 1 and message.format(tmp=tmp_path) in error_lines[0], error_lines
