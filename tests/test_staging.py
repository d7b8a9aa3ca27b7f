"""beam_pipelines.staging: a staged dir is published whole or not at all, and the command lines'
stops and bad input end in one line and their exit codes (the runs: tests/test_prepare_*.py)."""

import os
import signal
import time

import pytest

from beam_pipelines import staging


def test_a_staged_dir_replaces_the_output_whole_when_its_body_returns(tmp_path):
  output_dir = tmp_path / "out"
  output_dir.mkdir()
  (output_dir / "old.txt").write_text("the run before")
  with staging.staged(str(output_dir)) as staged:
    assert os.path.dirname(staged) == str(tmp_path) and staged != str(output_dir)
    (tmp_path / os.path.basename(staged) / "new.txt").write_text("this run")
    assert (output_dir / "old.txt").exists(), "nothing is published before the body returns"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert sorted(p.name for p in output_dir.iterdir()) == ["new.txt"]


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyboardInterrupt()])
def test_a_staged_dir_whose_body_raises_is_deleted_and_the_output_left_as_it_was(tmp_path, error):
  output_dir = tmp_path / "out"
  output_dir.mkdir()
  (output_dir / "old.txt").write_text("the run before")
  with pytest.raises(type(error)), staging.staged(str(output_dir)) as staged:
    (tmp_path / os.path.basename(staged) / "half.txt").write_text("half of a run")
    raise error
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert sorted(p.name for p in output_dir.iterdir()) == ["old.txt"]


def test_an_unpublished_run_keeps_only_its_named_files_and_leaves_the_output(tmp_path):
  output_dir = tmp_path / "out"
  output_dir.mkdir()
  (output_dir / "old.txt").write_text("the run before")
  with pytest.raises(staging.Unpublished, match="nothing to train on"):
    with staging.staged(str(output_dir)) as staged:
      for name in ("report.md", "manifest.json", "train-00000-of-00001.array_record"):
        (tmp_path / os.path.basename(staged) / name).write_text(name)
      raise staging.Unpublished("nothing to train on", ("report.md", "dead_letter.jsonl"))
  assert sorted(p.name for p in output_dir.iterdir()) == ["old.txt"]
  assert (output_dir / "old.txt").read_text() == "the run before"
  kept = tmp_path / os.path.basename(staged)
  assert sorted(p.name for p in kept.iterdir()) == ["report.md"]  # no owner file either
  assert staging.stale_dirs(str(output_dir)) == [str(kept)]


@pytest.mark.parametrize("error", [ValueError("--seq_len must be at least 2, got 1"),
                                   FileExistsError("--output_dir x already exists")])
def test_bad_input_exits_2_with_one_line_naming_the_program(capsys, error):
  def run():
    raise error
  with pytest.raises(SystemExit) as exit_info:
    staging.run_until_stopped("prepare_chat", "x", run)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == f"prepare_chat: {error}\n"


def test_other_errors_keep_their_traceback():
  def run():
    raise KeyError("a bug")
  with pytest.raises(KeyError, match="a bug"):
    staging.run_until_stopped("prepare_text", "x", run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_exits_128_plus_its_number_saying_the_output_is_untouched(capsys, signum):
  def run():
    os.kill(os.getpid(), signum)
    time.sleep(10)  # the handler's Stopped ends this sleep
    raise AssertionError("the signal did not stop the run")
  before = signal.getsignal(signum)
  with pytest.raises(SystemExit) as exit_info:
    staging.run_until_stopped("prepare_chat", "/data/chat", run)
  assert exit_info.value.code == 128 + signum
  assert capsys.readouterr().err == (
      f"prepare_chat: stopped by {signal.Signals(signum).name} before finishing; --output_dir "
      "/data/chat is as it was and no staging dir is left\n")
  assert signal.getsignal(signum) == before


@pytest.mark.parametrize("error, logged", [(ValueError("--vocab_size too high"), False),
                                           (KeyError("a bug"), True)])
def test_beam_logs_no_traceback_of_bad_input_that_the_one_line_says(caplog, error, logged):
  import apache_beam as beam

  def fail(_):
    raise error
  staging.log_to_stderr()
  with pytest.raises(type(error)):
    with beam.Pipeline(runner="DirectRunner") as pipeline:
      _ = pipeline | beam.Create([1]) | beam.Map(fail)
  tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("apache_beam")]
  assert bool(tracebacks) == logged


@pytest.mark.parametrize("program", ["prepare_text", "prepare_images", "prepare_chat"])
def test_each_pipeline_exits_2_on_a_flag_neither_it_nor_beam_knows(capsys, program, tmp_path):
  import importlib
  module = importlib.import_module(f"beam_pipelines.{program}")
  argv = ["--input=x", f"--output_dir={tmp_path}/out", "--tokenizer=t", "--seq_len=64",
          *(["--image_size=32"] if program == "prepare_images" else []), "--direct_num_workers=2"]
  _, beam_args = module.parse_flags(argv)
  assert beam_args == ["--direct_num_workers=2"]  # Beam's own options pass through
  with pytest.raises(SystemExit) as exit_info:
    module.parse_flags(argv + ["--seq-len=64"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1].endswith(
      f"error: unrecognized flag --seq-len: neither {program}'s nor a Beam pipeline option; "
      "did you mean --seq_len?")
