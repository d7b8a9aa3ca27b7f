"""maxlm.default_vision: digit rows name sklearn's labels, shapes are drawn in the color their
answer names, validation images are ones no training row shows, and the set prepares."""

import json

import gin
import numpy as np
import pytest
from sklearn.datasets import load_digits

from beam_pipelines import records
from maxlm import default_vision
from maxlm import train as train_module
from maxlm.default_vision import COLORS, Sizes


def test_digit_answers_are_sklearns_labels_and_held_out_writers_stay_out_of_training():
  targets = load_digits().target
  train, held_out = default_vision.digit_samples(False), default_vision.digit_samples(True)
  assert len(train) + len(held_out) == len(targets)
  assert not {s.name for s in train} & {s.name for s in held_out}
  for sample in train[:50] + held_out[:50]:
    assert sample.answer == str(targets[int(sample.name[1:5])])


def test_each_shape_is_drawn_in_the_color_its_answer_names():
  for sample in default_vision.shape_samples(30, seed=3, prefix="t"):
    _, color, shape = sample.answer.split()
    pixels = np.asarray(sample.image).reshape(-1, 3)
    painted = (pixels == COLORS[color]).all(axis=1).sum()
    assert painted >= (40 if shape == "triangle" else 64), sample.answer


def test_the_jsonl_holds_chat_rows_and_training_captions(tmp_path):
  paths = default_vision.write_default_set(tmp_path, Sizes(6, 3))
  train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
  validation = [json.loads(line) for line in paths["validation"].read_text().splitlines()]
  assert sum("caption" in row for row in train) == len(train) // 2
  assert all("messages" in row for row in validation)
  assert all((tmp_path / row["image"]).is_file() for row in train + validation)


@pytest.mark.slow
def test_the_default_set_prepares_every_row_with_the_default_corpus_tokenizer(tmp_path, capsys):
  older = tmp_path / "vision-t000000000000-i32-p8-s64-n42-r0"
  older.mkdir()
  (older / "records").write_bytes(bytes(3 * 2**19))
  data = default_vision.ensure_default_vision(cache_dir=str(tmp_path), sizes=Sizes(30, 12))
  manifest = json.loads((tmp_path / data / records.MANIFEST_NAME).read_text())
  assert manifest["report"]["dead_letters"] == 0
  assert "1 other build(s) of this kind (1.5 MiB)" in capsys.readouterr().out
  assert older.exists()


@pytest.mark.parametrize("gin_file,source", [("vision_tiny_projector.gin", "tiny.gin"),
                                             ("vision_tiny_sft.gin", "vision_tiny_projector.gin")])
def test_a_vision_stage_defaults_to_the_embedded_set_and_the_run_the_stage_before_writes(
    gin_file, source):
  gin.clear_config()
  try:
    gin.parse_config_file(train_module.resolve_gin_file(gin_file))
    assert gin.query_parameter("train.init_from") == train_module.default_workdir(source)
    data_dir = gin.query_parameter("train.data_dir")
    assert data_dir.configurable.wrapper is default_vision.ensure_default_vision
    assert not data_dir.evaluate, "built only when train calls it, after checking init_from"
  finally:
    gin.clear_config()
