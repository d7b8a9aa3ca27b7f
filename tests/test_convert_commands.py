"""The commands maxlm.convert.from_hf and to_hf at their boundary: broken input and output dirs
are refused in one line with exit 2, a conversion lands whole or not at all, and it reports its
progress (the conversions' numbers: tests/test_convert.py)."""

import json
import re

import numpy as np
import pytest

from maxlm import checkpoint
from maxlm import progress as console
from maxlm.convert import from_hf, progress, safetensors_file, to_hf

pytest.importorskip("torch")
pytest.importorskip("transformers")
from test_convert import BASE, make_hf_dir  # noqa: E402  pylint: disable=wrong-import-position

PROGRESS_LINE = re.compile(
    r"(from_hf|to_hf): (\d+)/(\d+) tensors \(([\d.]+)/([\d.]+) (GB|MB|kB)\) \[\d+%\] .*")


def one_line_exit_2(main, argv: list[str], capsys) -> str:
  """The one line a command printed to stderr before exiting 2."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


def import_args(hf_dir, output_dir, *flags: str) -> list[str]:
  return [f"--hf_dir={hf_dir}", f"--output_dir={output_dir}", *flags]


def export_args(run_dir, output_dir, *flags: str) -> list[str]:
  return [f"--checkpoint_dir={run_dir}", f"--output_dir={output_dir}", *flags]


def listing(directory) -> list[str]:
  return sorted(path.name for path in directory.iterdir())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf")
  make_hf_dir(directory, "gqa_untied")
  return directory


@pytest.fixture(scope="module")
def run_dir(hf_dir, tmp_path_factory):
  """An imported run, read and never changed by the tests."""
  directory = tmp_path_factory.mktemp("imported") / "run"
  from_hf.import_checkpoint(hf_dir, directory)
  return directory


def copy_of(hf_dir, tmp_path):
  copy = tmp_path / "hf"
  copy.mkdir()
  for path in hf_dir.iterdir():
    (copy / path.name).write_bytes(path.read_bytes())
  return copy


def config_without_hidden_size(hf, _):
  (hf / "config.json").write_text(json.dumps({k: v for k, v in BASE.items()
                                              if k != "hidden_size"}))


def config_with_layers_in_words(hf, _):
  (hf / "config.json").write_text(json.dumps({**BASE, "num_hidden_layers": "four"}))


def config_missing_a_comma_at_line_4_column_3(hf, _):
  (hf / "config.json").write_text('{\n  "vocab_size": 288,\n  "hidden_size": 32\n  "x": 1\n}')


def index_naming_a_second_shard_that_is_not_there(hf, _):
  names = safetensors_file.SafetensorsFile(hf / "model.safetensors").keys()
  (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
  weight_map = {name: f"model-0000{1 + i % 2}-of-00002.safetensors"
                for i, name in enumerate(names)}
  (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def index_placing_lm_head_in_a_shard_without_it(hf, _):
  names = safetensors_file.SafetensorsFile(hf / "model.safetensors").keys()
  safetensors_file.write(hf / "other.safetensors", [("bias", (2,), np.float32)],
                         lambda _: np.zeros(2, np.float32))
  weight_map = {name: "other.safetensors" if name == "lm_head.weight" else "model.safetensors"
                for name in names}
  (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def weights_cut_in_half(hf, _):
  weights = hf / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def output_dir_is_a_file(_, output_dir):
  output_dir.write_text("not a directory")


@pytest.mark.parametrize("breakage, expected", [
    (config_without_hidden_size, r"config.json has no hidden_size field; add it"),
    (config_with_layers_in_words,
     r"config.json field num_hidden_layers='four' should be a positive integer"),
    (config_missing_a_comma_at_line_4_column_3,
     r"{hf}/config.json is not valid JSON \(.* at line 4, column 3\)"),
    (index_naming_a_second_shard_that_is_not_there,
     r"model.safetensors.index.json names the shard model-00002-of-00002.safetensors, "
     r"missing from {hf}; download every shard"),
    (index_placing_lm_head_in_a_shard_without_it,
     r"model.safetensors.index.json places lm_head.weight in other.safetensors, which does not "
     r"hold it; download"),
    (weights_cut_in_half, r"{hf}/model.safetensors is truncated or corrupt \(its tensors end "
                          r"at byte \d+ but it has \d+ bytes\); download or copy it again"),
    (output_dir_is_a_file, r"--output_dir {run} is a file; pass a directory path"),
])
def test_a_broken_hf_dir_or_output_dir_is_refused_naming_what_is_wrong_in_one_line(
    hf_dir, tmp_path, capsys, breakage, expected):
  hf, output_dir = copy_of(hf_dir, tmp_path), tmp_path / "run"
  breakage(hf, output_dir)
  line = one_line_exit_2(from_hf.main, import_args(hf, output_dir), capsys)
  assert re.fullmatch("error: " + expected.format(hf=re.escape(str(hf)),
                                                  run=re.escape(str(output_dir))) + ".*", line)
  assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
      ["hf"] + (["run"] if output_dir.exists() else []))


def test_an_import_into_a_dir_holding_other_files_is_refused_and_leaves_them_alone(
    hf_dir, tmp_path, capsys):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep")
  line = one_line_exit_2(from_hf.main, import_args(hf_dir, foreign), capsys)
  assert line == (f"error: --output_dir {foreign} already holds files (notes.txt); pass a new "
                  "or empty directory, or --overwrite to replace it")
  assert listing(tmp_path) == ["foreign"] and listing(foreign) == ["notes.txt"]


def test_an_import_with_overwrite_replaces_a_dir_whole_with_a_run_that_loads(
    hf_dir, run_dir, tmp_path):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep")
  from_hf.main(import_args(hf_dir, foreign, "--overwrite"))
  assert listing(foreign) == listing(run_dir)
  assert listing(tmp_path) == ["foreign"]
  assert checkpoint.read_meta(foreign)[0] == 0


def test_an_import_without_a_tokenizer_leaves_no_output_dir_nor_its_parents(hf_dir, tmp_path,
                                                                            capsys):
  hf = copy_of(hf_dir, tmp_path)
  (hf / "tokenizer.json").unlink()
  line = one_line_exit_2(from_hf.main, import_args(hf, tmp_path / "new" / "run"), capsys)
  assert "has neither a SentencePiece tokenizer.model nor a tokenizer.json" in line
  assert listing(tmp_path) == ["hf"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_import_failing_while_it_writes_leaves_the_output_dir_as_it_was(
    hf_dir, run_dir, tmp_path, monkeypatch, overwrite):
  output_dir = tmp_path / "run"
  if overwrite:  # an earlier run, which must survive
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("the run before")

  def disk_full(directory, *args, **kwargs):
    (directory / checkpoint.CHECKPOINTS).mkdir()
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(from_hf, "write_run", disk_full)
  with pytest.raises(OSError, match="No space left"):
    from_hf.import_checkpoint(hf_dir, tmp_path / "new" / "run", overwrite=overwrite)
  with pytest.raises(OSError, match="No space left"):
    from_hf.import_checkpoint(hf_dir, output_dir, overwrite=overwrite)
  assert listing(tmp_path) == (["run"] if overwrite else [])
  if overwrite:
    assert listing(output_dir) == ["notes.txt"]


def test_an_export_into_a_dir_holding_another_model_is_refused_and_leaves_it_alone(
    run_dir, tmp_path, capsys):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep")
  (foreign / "pytorch_model.bin").write_bytes(b"another model")
  line = one_line_exit_2(to_hf.main, export_args(run_dir, foreign), capsys)
  assert line == (f"error: --output_dir {foreign} already holds files of no earlier to_hf "
                  "export (notes.txt, pytorch_model.bin); pass a new or empty directory, or "
                  "--overwrite to replace it")
  assert listing(tmp_path) == ["foreign"]
  assert listing(foreign) == ["notes.txt", "pytorch_model.bin"]


def test_an_export_with_overwrite_replaces_a_dir_whole(run_dir, tmp_path):
  to_hf.export(run_dir, tmp_path / "fresh")
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "pytorch_model.bin").write_bytes(b"another model")
  to_hf.main(export_args(run_dir, foreign, "--overwrite"))
  assert listing(foreign) == listing(tmp_path / "fresh")
  assert listing(tmp_path) == ["foreign", "fresh"]


def test_an_export_or_import_into_its_own_input_is_refused_even_with_overwrite(
    hf_dir, run_dir, capsys):
  line = one_line_exit_2(to_hf.main, export_args(run_dir, run_dir.parent, "--overwrite"),
                         capsys)
  assert line.startswith(f"error: --output_dir {run_dir.parent} holds --checkpoint_dir")
  line = one_line_exit_2(from_hf.main, import_args(hf_dir, hf_dir, "--overwrite"), capsys)
  assert line.startswith(f"error: --output_dir {hf_dir} holds --hf_dir")


@pytest.mark.parametrize("max_shard_bytes", [0, -1])
def test_a_shard_size_below_one_byte_is_refused_in_one_line(run_dir, tmp_path, capsys,
                                                             max_shard_bytes):
  line = one_line_exit_2(to_hf.main, export_args(run_dir, tmp_path / "out",
                                                 f"--max_shard_bytes={max_shard_bytes}"), capsys)
  assert line == (f"error: --max_shard_bytes={max_shard_bytes}; pass a positive number of "
                  f"bytes (the default is {to_hf.MAX_SHARD_BYTES})")
  assert listing(tmp_path) == []


def progress_lines(stderr: str, label: str) -> list[tuple[int, int, float, float, str]]:
  return [(int(m[2]), int(m[3]), float(m[4]), float(m[5]), m[6])
          for m in map(PROGRESS_LINE.fullmatch, stderr.splitlines()) if m and m[1] == label]


def test_an_export_reports_its_progress_up_to_every_tensor_and_byte_of_the_index(
    run_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(console, "EVERY_S", 0.0)  # a line per tensor, not one every 5 s
  to_hf.export(run_dir, tmp_path / "out", max_shard_bytes=40_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  tensors, total_kb = len(index["weight_map"]), index["metadata"]["total_size"] / 1000
  lines = progress_lines(capsys.readouterr().err, "to_hf")
  assert lines[0][:2] == (1, tensors)
  assert lines[-1] == (tensors, tensors, round(total_kb, 1), round(total_kb, 1), "kB")


def test_an_import_reports_its_progress_up_to_every_tensor_and_byte_of_the_weights(
    hf_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(console, "EVERY_S", 0.0)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  weights = load_file(hf_dir / "model.safetensors")
  from_hf.import_checkpoint(hf_dir, tmp_path / "run")
  lines = progress_lines(capsys.readouterr().err, "from_hf")
  tensors, total_kb = len(weights), sum(array.nbytes for array in weights.values()) / 1000
  assert lines[0][:2] == (1, tensors)
  assert lines[-1] == (tensors, tensors, round(total_kb, 1), round(total_kb, 1), "kB")


def test_progress_counts_tensors_and_bytes_in_the_unit_of_the_total(capsys):
  now = [0.0]
  report = progress.Progress("to_hf", tensors=6, nbytes=6 * 10**9, every_s=3.0,
                             clock=lambda: now[0])
  for seconds in (0.0, 1.0, 2.9, 3.0, 4.0, 4.5):
    now[0] = seconds
    report.advance(10**9)
  assert capsys.readouterr().err.splitlines() == [
      "to_hf: 4/6 tensors (4.0/6.0 GB) [67%] elapsed 3s ETA 2s",  # 3 s for 4: 1.5 s for 2 more
      "to_hf: 6/6 tensors (6.0/6.0 GB) [100%] elapsed 4s ETA 0s"]
  assert progress.sizes(1500, 40_000) == "1.5/40.0 kB"
