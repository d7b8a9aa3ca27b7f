"""Where training numbers go: TensorBoard events, `metrics.jsonl`, and a console line.

The writers implement clu's `MetricWriter` interface. clu's own TensorBoard writer needs
TensorFlow, so TensorBoard events are written with tensorboardX (protobuf only).
"""

import importlib.util
import json
import math
import os
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _import_clu_writers():
  """clu.metric_writers' package __init__ imports TensorFlow for its SummaryWriter, which we
  replace; without TensorFlow, stand in a module for that one import."""
  if importlib.util.find_spec("tensorflow") is None:
    stub = types.ModuleType("clu.metric_writers.summary_writer")

    class SummaryWriter:  # pylint: disable=too-few-public-methods
      def __init__(self, *args, **kwargs):
        raise ImportError("clu's SummaryWriter needs TensorFlow; use maxlm.metrics.TensorBoardWriter")

    stub.SummaryWriter = SummaryWriter
    sys.modules.setdefault("clu.metric_writers.summary_writer", stub)
  from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel
  return metric_writers, periodic_actions


metric_writers, periodic_actions = _import_clu_writers()


class TensorBoardWriter(metric_writers.MetricWriter):
  """Scalars, texts and hparams as TensorBoard event files, without TensorFlow or torch."""

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._writer = SummaryWriter(str(logdir), flush_secs=30)

  def write_summaries(self, step, values, metadata=None):
    for key, value in values.items():
      self._writer.add_scalar(key, float(value), step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), step)

  def write_images(self, step, images):
    for key, value in images.items():
      self._writer.add_images(key, value, step, dataformats="NHWC")

  def write_videos(self, step, videos):
    raise NotImplementedError("maxlm writes no videos")

  def write_audios(self, step, audios, *, sample_rate):
    raise NotImplementedError("maxlm writes no audio")

  def write_texts(self, step, texts):
    for key, value in texts.items():
      self._writer.add_text(key, value, step)

  def write_histograms(self, step, arrays, num_buckets=None):
    for key, value in arrays.items():
      self._writer.add_histogram(key, value, step)

  def write_hparams(self, hparams):
    self._writer.add_text("hparams", json.dumps(dict(hparams), default=str, indent=1), 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON object per step in `path`: the scalars written for that step, merged.

  Steps arrive in order; a step's line is written when a later step (or flush) arrives, and
  the file is line-buffered so `tail -f` sees each step as it ends.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = Path(path)
    self._file = open(self._path, "a", encoding="utf-8",  # pylint: disable=consider-using-with
                      buffering=1)
    self._pending: dict[str, Any] = {}

  @staticmethod
  def truncate_after(path: str | os.PathLike, step: int):
    """Drops lines past `step`: after a restore from `step`, those steps will run again."""
    path = Path(path)
    if not path.exists():
      return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if self._pending and self._pending["step"] != step:
      self._write_pending()
    self._pending.setdefault("step", int(step))
    self._pending.update({k: _json_number(v) for k, v in scalars.items()})

  def _write_pending(self):
    self._file.write(json.dumps(self._pending) + "\n")
    self._pending = {}

  def flush(self):
    if self._pending:
      self._write_pending()
    self._file.flush()

  def close(self):
    self.flush()
    self._file.close()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass


def _json_number(value) -> float | int | None:
  value = float(value)
  if math.isfinite(value):
    return int(value) if value.is_integer() and abs(value) < 2**53 else value
  return None


def create_writer(workdir: str | os.PathLike, *, is_primary: bool = True):
  """TensorBoard (WORKDIR/tensorboard) + WORKDIR/metrics.jsonl on the primary process."""
  if not is_primary:
    return metric_writers.MultiWriter([])
  workdir = Path(workdir)
  return metric_writers.MultiWriter([TensorBoardWriter(workdir / "tensorboard"),
                                     JsonlWriter(workdir / "metrics.jsonl")])


class ConsoleProgress:
  """A progress line every `every` steps: step, percent, loss, throughput and ETA."""

  def __init__(self, total_steps: int, first_step: int, every: int, stream=sys.stdout):
    self._total, self._first, self._every, self._stream = total_steps, first_step, every, stream
    self._start = time.perf_counter()

  def update(self, step: int, scalars: Mapping[str, float], force: bool = False):
    if not force and step % self._every and step != self._total:
      return
    elapsed = time.perf_counter() - self._start
    done = step - self._first
    eta = elapsed / done * (self._total - step) if done > 0 else float("nan")
    parts = [f"step {step}/{self._total} [{100 * step / max(self._total, 1):3.0f}%]"]
    parts += [f"{name} {value:.4g}" for name, value in scalars.items()]
    parts.append(f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}")
    print(" | ".join(parts), file=self._stream, flush=True)


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
