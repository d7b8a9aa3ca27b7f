"""Orbax checkpoints of a training run: save, restore, reshard on restore, and refuse corrupt ones.

Layout of a run directory (what `--workdir` names and what serving loads):
  WORKDIR/tokenizer.model             copied from the data dir (an imported Hugging Face
                                       model's may be tokenizer.json instead)
  WORKDIR/checkpoints/<step>/state     TrainState: step, params, opt_state (StandardSave)
  WORKDIR/checkpoints/<step>/data_iter Grain iterator position
  WORKDIR/checkpoints/<step>/meta      JSON: model_config, seq_len, tokenizer sha256, data_dir
  WORKDIR/checkpoints/<step>/checksums JSON: a checksum of every array of `state`
  WORKDIR/corrupt_checkpoints/<step>   where training moves a step that failed to restore
Restoring with a target whose shardings differ from the saved ones reshards on the fly. A
restore verifies every array against its checksum and refuses non-finite values.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from maxlm import array_digest, config_checks
from maxlm import tokenizer as tokenizer_lib
from maxlm.errors import UserError
from maxlm.model import ModelConfig

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CORRUPT_CHECKPOINTS = "corrupt_checkpoints"
TOKENIZER = "tokenizer.model"
CHECKSUMS = "checksums"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes <step>.orbax-checkpoint-tmp, then renames it
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
STATE_METADATA = "state/_METADATA"
REQUIRED_FILES = (STATE_METADATA, "meta/metadata")
# A failed save's other writes land for a while after its error (see `remove_partial_saves`).
STRAGGLER_QUIET_S = 0.5
STRAGGLER_WAIT_LIMIT_S = 10.0


class CorruptCheckpointError(ValueError):
  """A checkpoint whose files are missing or unreadable, or whose arrays fail verification."""

  def __init__(self, checkpoints: Path, step: int, reason: str):
    super().__init__(f"checkpoint step {step} in {checkpoints} is corrupt: {reason}")
    self.step, self.reason = step, reason


def run_paths(directory: str | os.PathLike) -> tuple[Path, Path]:
  """(checkpoints dir, tokenizer file) for a run dir, or for its checkpoints dir itself."""
  directory = Path(directory).resolve()
  if directory.name == CHECKPOINTS:
    directory = directory.parent
  return directory / CHECKPOINTS, tokenizer_lib.find(directory)


class Checkpointer:
  """Owns the Orbax CheckpointManager of one run directory."""

  def __init__(self, workdir: str | os.PathLike, *, save_every: int, max_to_keep: int = 3,
               keep_period: int | None = None, verify: bool = True):
    """Keeps the latest `max_to_keep` checkpoints, plus each step divisible by `keep_period`.
    `verify` writes a checksum of every array with each save and checks it on restore."""
    self._checkpoints, _ = run_paths(workdir)
    self._verify = verify
    for logger in ("absl", "asyncio"):
      logging.getLogger(logger).addFilter(_DROP_DISK_FULL_LOGS)
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
      sys.unraisablehook = _dropping_closed_loop_callbacks(sys.unraisablehook)
    self._manager = ocp.CheckpointManager(
        self._checkpoints,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep, keep_period=keep_period,
            create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iter_args, meta: dict, *, force: bool = False) -> bool:
    """Starts an async save when `step` is on the period (or `force`); returns whether it did."""
    if not (force or self._manager.should_save(step)):
      return False
    items = {"state": ocp.args.StandardSave(state), "data_iter": data_iter_args,
             "meta": ocp.args.JsonSave(meta)}
    if self._verify:
      items[CHECKSUMS] = ocp.args.JsonSave(array_digest.checksums(state))
    with self._one_line_when_disk_full():
      return self._manager.save(step, force=True, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state, data_iter_args) -> tuple[object, dict]:
    """Restores into `abstract_state`'s shardings and advances the data iterator in place;
    raises CorruptCheckpointError if the step does not restore or fails verification."""
    _require_files(self._checkpoints, step, *REQUIRED_FILES)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data_iter=data_iter_args, meta=ocp.args.JsonRestore()))
    except Exception as error:  # a damaged file surfaces as any of Orbax's or tensorstore's
      raise CorruptCheckpointError(self._checkpoints, step, _first_line(error)) from error
    if self._verify:
      verify(self._checkpoints, step, restored.state)
    return restored.state, restored.meta

  def set_aside(self, step: int) -> Path:
    """Moves a corrupt step to WORKDIR/corrupt_checkpoints/, so that training can write that
    step again; returns where it went."""
    destination = _unused_path(self._checkpoints.parent / CORRUPT_CHECKPOINTS / str(step))
    if jax.process_index() == 0:
      destination.parent.mkdir(exist_ok=True)
      shutil.move(self._checkpoints / str(step), destination)
    if jax.process_count() > 1:
      jax.experimental.multihost_utils.sync_global_devices(f"maxlm set aside step {step}")
    self._manager.reload()
    return destination

  def wait(self):
    with self._one_line_when_disk_full():
      self._manager.wait_until_finished()

  def close(self):
    with self._one_line_when_disk_full():
      self._manager.close()

  @contextlib.contextmanager
  def _one_line_when_disk_full(self):
    """Orbax reports a full disk at the save or wait after the one that failed."""
    try:
      yield
    except Exception as error:
      if not is_disk_full(error):
        raise
      if jax.process_index() == 0:
        remove_partial_saves(self._checkpoints)
      free_mib = shutil.disk_usage(self._checkpoints).free / 2**20
      raise UserError(f"the disk of {self._checkpoints.parent} is full ({free_mib:.1f} MiB free) "
                      "so a checkpoint could not be written (its partial save is removed); free "
                      "space there or pass a --workdir on a larger disk") from None


def remove_partial_saves(checkpoints: Path, *, quiet_s: float = STRAGGLER_QUIET_S,
                         limit_s: float = STRAGGLER_WAIT_LIMIT_S):
  """Removes every unfinished save under `checkpoints`, until none has come back for `quiet_s`.

  When one write of a save fails, Orbax raises at once, while tensorstore finishes the save's
  other writes in its own threads (which create their directories again) and gives no handle to
  wait on them. So removal repeats until the directory stays clean for `quiet_s`, `limit_s` at
  most; a write that lands later still is removed when the next run opens its Checkpointer
  (Orbax's `cleanup_tmp_directories`), and Orbax never lists a partial save as a step."""
  deadline = time.monotonic() + limit_s
  last_removal = time.monotonic()
  while True:
    partials = list(checkpoints.glob(f"*{TMP_SUFFIX}*"))
    for partial in partials:
      shutil.rmtree(partial, ignore_errors=True)
    now = time.monotonic()
    if partials:
      last_removal = now
    if now - last_removal >= quiet_s or now >= deadline:
      return
    time.sleep(quiet_s / 10)


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or one it was raised from, is a full disk or quota (tensorstore reports
  it as a ValueError that carries the errno as text)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
      return True
    if _names_disk_full(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _names_disk_full(text: str) -> bool:
  return any(os.strerror(code) in text or f"os_error_code='{code}'" in text
             for code in DISK_FULL_ERRNOS)


class _DropDiskFullLogs(logging.Filter):
  """Orbax logs a failed background save with its traceback, then raises the same error at the
  next save or wait, where a full disk becomes one line: only that line is shown. asyncio logs
  the same error again for each of a save's fragment writes that failed unawaited ("Task
  exception was never retrieved"), when the machine is busy enough that several fail."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (_names_disk_full(record.getMessage()) or (error and is_disk_full(error)))


_DROP_DISK_FULL_LOGS = _DropDiskFullLogs()


def _dropping_closed_loop_callbacks(previous):
  """After a failed save or restore, Orbax closes its event loop while tensorstore still
  finishes the other reads or writes; their callbacks then fail on the closed loop. That
  traceback says nothing the one-line error does not, so it is not printed."""

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)
  hook.drops_closed_loop_callbacks = True
  return hook


def verify(checkpoints: Path, step: int, tree):
  """Raises CorruptCheckpointError unless every array of `tree` (restored from `step`) matches
  the checksum saved with it and is finite. Checkpoints saved without checksums are only
  checked for non-finite values, with a warning."""
  saved = read_checksums(checkpoints, step)
  if saved is None:
    logger.warning("checkpoint step %d in %s has no %s/ (saved without them or since removed): "
                   "its arrays are checked only for non-finite values", step, checkpoints,
                   CHECKSUMS)
  for name, (checksum, nonfinite) in array_digest.digests(tree).items():
    if saved is not None and saved.get(name) != checksum:
      reason = "does not match its checksum" if name in saved else "has no saved checksum"
      raise CorruptCheckpointError(checkpoints, step, f"{name} {reason}")
    if nonfinite:
      raise CorruptCheckpointError(checkpoints, step, f"{name} holds {nonfinite} non-finite "
                                   "values")


def read_checksums(checkpoints: Path, step: int) -> dict[str, str] | None:
  checksum_file = checkpoints / str(step) / CHECKSUMS / "metadata"
  if not (checkpoints / str(step) / CHECKSUMS).is_dir():
    return None
  saved = _read_json(checkpoints, step, checksum_file)
  if saved.get("format") != array_digest.FORMAT:
    raise CorruptCheckpointError(checkpoints, step, f"{checksum_file} is not in the checksum "
                                 f"format {array_digest.FORMAT!r}")
  return saved["arrays"]


def model_meta(config: ModelConfig, **extra) -> dict:
  return {"model_config": dataclasses.asdict(config), **extra}


def config_from_meta(meta: dict) -> ModelConfig:
  """Fields added to ModelConfig since the run was written take their defaults."""
  return config_checks.saved_model_config(meta["model_config"])


def all_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
  """The complete checkpoints of a run directory, oldest first."""
  checkpoints, _ = run_paths(checkpoint_dir)
  if not checkpoints.is_dir():
    raise FileNotFoundError(f"{checkpoint_dir} holds no {CHECKPOINTS}/ directory; pass the "
                            "--workdir of a `python -m maxlm.train` run")
  with ocp.CheckpointManager(checkpoints) as manager:
    return sorted(manager.all_steps())


def read_meta(checkpoint_dir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of the latest (or given) checkpoint of a run directory."""
  checkpoints, _ = run_paths(checkpoint_dir)
  if step is None:
    steps = all_steps(checkpoint_dir)
    if not steps:
      raise FileNotFoundError(f"{checkpoints} has no complete checkpoint yet")
    step = steps[-1]
  return step, _read_json(checkpoints, step, checkpoints / str(step) / "meta" / "metadata")


def _read_json(checkpoints: Path, step: int, path: Path) -> dict:
  if not (checkpoints / str(step)).is_dir():
    steps = sorted(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
    raise FileNotFoundError(f"{checkpoints} has no checkpoint of step {step}; its steps: "
                            f"{', '.join(map(str, steps)) or 'none'}")
  _require_files(checkpoints, step, path.relative_to(checkpoints / str(step)))
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise CorruptCheckpointError(checkpoints, step, _first_line(error)) from error


def _require_files(checkpoints: Path, step: int, *names: str | Path):
  """Names the first missing file, which Orbax would report as some other error."""
  for name in names:
    if not (checkpoints / str(step) / name).is_file():
      raise CorruptCheckpointError(checkpoints, step, f"{name} is missing")


def restore_params(checkpoint_dir: str | os.PathLike, abstract_params, step: int | None = None,
                   *, verify_arrays: bool = True):
  """Only the parameters of a training checkpoint, laid out as `abstract_params` says
  (ShapeDtypeStructs with shardings: any mesh, one device included). Raises
  CorruptCheckpointError if they do not restore or fail verification."""
  checkpoints, _ = run_paths(checkpoint_dir)
  if step is None:
    step, _ = read_meta(checkpoint_dir)
  _require_files(checkpoints, step, STATE_METADATA)
  target = {"params": abstract_params}
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
      target)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        checkpoints / str(step) / "state",
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True))
  except Exception as error:  # a damaged file surfaces as any of Orbax's or tensorstore's
    raise CorruptCheckpointError(checkpoints, step, _first_line(error)) from error
  if verify_arrays:
    verify(checkpoints, step, restored)
  return restored["params"]


def newest_intact(steps, load):
  """(step, load(step)) of the newest of `steps` that loads without CorruptCheckpointError, or
  (None, None); plus the errors of the newer steps that did not, newest first."""
  errors = []
  for step in sorted(steps, reverse=True):
    try:
      return step, load(step), errors
    except CorruptCheckpointError as error:
      errors.append(error)
  return None, None, errors


def _unused_path(path: Path) -> Path:
  candidate, n = path, 1
  while candidate.exists():
    candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
  return candidate


def _first_line(error: BaseException, limit: int = 300) -> str:
  lines = str(error).strip().splitlines() or [type(error).__name__]
  # TensorStore follows its reason with the repr of a bound method, which helps nobody
  line = lines[0].split(" See full TensorStore details:")[0].rstrip(". ")
  return line if len(line) <= limit else line[:limit] + "…"
