"""Entry point: gin -> mesh -> state -> loop.

  python -m maxlm.train                              # embedded default: stdlib corpus, tiny.gin
  python -m maxlm.train --gin_file=sft_tiny.gin      # SFT of runs/tiny on the embedded chat set
  python -m maxlm.train --gin_file=dpo_tiny.gin      # DPO of runs/sft_tiny on its preferences
  python -m maxlm.train --gin_file=1b.gin --data_dir=DIR --workdir=DIR [--steps=N]
                        [--checkpoint_every=N] [--gin_param='ModelConfig.num_layers=2' ...]

Bare gin file names resolve under `configs/`. Rerunning the same command resumes from the
latest checkpoint in WORKDIR. One trainer at a time holds WORKDIR (WORKDIR/.lock); a second is
refused while the first runs.
"""

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import tokenize
from collections.abc import Callable
from pathlib import Path

import gin
import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils

from beam_pipelines import chat_examples
from beam_pipelines.records import MANIFEST_NAME, fields_of_manifest
from maxlm import checkpoint, data, metrics, optim, runs, sampling, sharding, tasks, workdir_lock
from maxlm import compilation_cache
from maxlm import default_chat  # noqa: F401  (registers ensure_default_chat with gin)
from maxlm import default_vision  # noqa: F401  (registers ensure_default_vision with gin)
from maxlm import post_training  # noqa: F401  (registers SFT and DPO with gin)
from maxlm import vision_tasks  # noqa: F401  (registers VisionSFT with gin)
from maxlm.evals import generation, heldout, multiple_choice, perplexity  # noqa: F401 (gin)
from maxlm.evals import report as eval_report
from maxlm.evals import scoring
from maxlm import steps as train_steps
from maxlm import tokenizer as tokenizer_lib
from maxlm.config_checks import (UserError, build_model_config, changed_numerics,
                                 check_compatible, check_run_configuration, check_same_model,
                                 ignored_moe_settings, resolve_model_config)
from maxlm.default_corpus import ensure_default_corpus
from maxlm.model import ModelConfig, attention

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
LORA_TRAINABLE = ".*lora.*"  # the adapters' parameter paths (`blocks/0/attention/q_lora_a`)

_GIN_FILE = flags.DEFINE_multi_string("gin_file", ["tiny.gin"], "Gin files; bare names resolve "
                                      "under configs/.")
_GIN_PARAM = flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'train.seed=1'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); "
                               "default runs/<first gin file name>.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output of beam_pipelines.prepare_text; "
                                "default: build the stdlib corpus into the cache.")
_STEPS = flags.DEFINE_integer("steps", None, "Total training steps (overrides train.steps).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints "
                                         "(overrides train.checkpoint_every).")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Run dir whose parameters (not its "
                                 "optimizer state or step) start a new run (overrides "
                                 "train.init_from).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", compilation_cache.default_dir(), "Where compiled steps are kept, "
    "so that a restarted run skips their compile; empty: no cache.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a "
                                   "multi-process run without a cluster that JAX detects.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, "
                                   "num_processes).")


def _checked_and_locked(train_fn):
  """`train`'s boundary: its arguments and the gin bindings of what it builds are checked
  before anything is built, then one trainer at a time holds the workdir."""
  signature = inspect.signature(train_fn)

  @functools.wraps(train_fn)
  def checked_and_locked(*args, **kwargs):
    arguments = signature.bind(*args, **kwargs)
    arguments.apply_defaults()
    try:
      check_run_configuration(arguments.arguments)
    except ValueError as error:  # a constructor gin runs to read a binding (VisionConfig's own)
      raise UserError(str(error).splitlines()[0]) from None
    if warning := ignored_moe_settings({configurable.__name__: gin.get_bindings(configurable)
                                        for configurable in (ModelConfig, optim.make_optimizer)}):
      _log(warning)
    workdir = Path(arguments.arguments["workdir"])
    new_workdir = not workdir.exists()
    try:
      with _workdir_held_by_process_0(workdir):
        return train_fn(*args, **kwargs)
    except UserError:
      if new_workdir and jax.process_index() == 0:
        _remove_untrained(workdir)
      raise
  return checked_and_locked


def _remove_untrained(workdir: Path) -> None:
  """Removes a workdir this run made and then refused to train in (a bad data dir or
  --init_from): no checkpoint and no logged step, so a rerun starts clean."""
  try:
    trained = bool(checkpoint.all_steps(workdir))
  except FileNotFoundError:
    trained = False
  metrics_file = workdir / "metrics.jsonl"
  if not trained and not (metrics_file.exists() and metrics_file.stat().st_size):
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _workdir_held_by_process_0(workdir):
  """Process 0 holds WORKDIR/.lock for the run (see maxlm.workdir_lock). Every process learns
  whether it got it before touching the workdir: a refused run's other processes would
  otherwise go on to copy the tokenizer and truncate metrics in the running one's workdir."""
  with contextlib.ExitStack() as lock:
    refusal = None
    if jax.process_index() == 0:
      try:
        lock.enter_context(workdir_lock.hold(workdir, log=_log))
      except UserError as error:
        refusal = error
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
        np.int32(refusal is not None)) and refusal is None:
      raise UserError(f"process 0 was refused the lock of {workdir}; its error says by whom")
    if refusal is not None:
      raise refusal
    yield


@gin.configurable(module="maxlm")
@_checked_and_locked
def train(workdir: str, data_dir: str | Callable[[], str] | None = None,
          task: tasks.Task | None = None,
          steps: int = 300, global_batch_size: int = 16, microbatches: int = 1,
          seed: int = 0, init_from: str | None = None, trainable: str | None = None,
          checkpoint_every: int = 100,
          eval_every: int = 100, eval_batches: int = 16, log_every: int = 10,
          sample_prompt: str | None = "def ", sample_tokens: int = 48,
          sample_temperature: float = 0.0, max_bad_steps: int = 10,
          keep_checkpoints: int = 3, keep_checkpoint_every: int | None = None,
          peak_flops_per_device: float | None = None,
          profile_steps: tuple[int, int] | None = None, verify_checkpoints: bool = True,
          evals: tuple = ()) -> dict:
  """Trains (or resumes) a model on `task` (default: pretraining) in `workdir`; returns the
  final summary numbers.

  `data_dir` is a data dir, or a function that makes one (the stage configs' default chat
  sets, `@ensure_default_chat`), called only once the run is known to be able to start;
  None is the stdlib corpus.

  A step with a non-finite loss or gradient is skipped and counted; `max_bad_steps` in a row
  stop the run (the last good checkpoint stays). Checkpoints: the latest `keep_checkpoints`,
  plus every step divisible by `keep_checkpoint_every` if set. `microbatches` splits each
  global batch into slices whose gradients accumulate into one update. `init_from`, a run
  dir of the same model shape and tokenizer, supplies the starting parameters of a new run
  (its optimizer state and step are not taken); a workdir with checkpoints resumes instead.
  `trainable`, a regex over parameter paths (`blocks/0/attention/q`, see
  `steps.split_trainable`), trains only the parameters it matches; the others stay as
  `init_from` (or the seed's initialization) made them, and checkpoints hold only the trained.
  A new run records which checkpoint of `init_from` it started from (its latest then); a
  resume, and a task's reference model (DPO), read that one again, not a newer one.
  With `ModelConfig.lora_rank` > 0 it defaults to the adapters alone; `init_from` supplies
  the base and the adapters start afresh (unless that run has them too).
  `sample_prompt=None` skips the sample at the end. `peak_flops_per_device` turns on the
  `mfu` scalar; `profile_steps=(first, last)` writes a profiler trace of those steps to
  WORKDIR/profile (open it with TensorBoard's profile plugin or Perfetto).
  `verify_checkpoints` saves a checksum of every array with each checkpoint and, on resume,
  falls back from a checkpoint that fails it (or does not restore, or holds non-finite values)
  to the newest intact one.
  `evals` (gin: `train.evals = [@MultipleChoice(), @Perplexity(), @Generation()]`) run with
  each held-out eval; their numbers are the `evals/TASK/METRIC` scalars.
  """
  workdir = Path(workdir)
  task = task or tasks.Pretrain()
  init_from_step = _init_from_step(workdir, init_from)
  init_from = str(Path(init_from).resolve()) if init_from else None  # serving finds it anywhere
  built_by = getattr(data_dir, "__name__", "") if callable(data_dir) else ""
  built_by = built_by if built_by.isidentifier() else None  # a gin configurable's name
  data_dir = _data_dir(data_dir)
  try:
    manifest = data.load_manifest(data_dir)
  except (FileNotFoundError, ValueError) as error:
    raise UserError(str(error)) from None
  check_task_fields(task, manifest, data_dir)
  seq_len = manifest["seq_len"]
  config = resolve_model_config(build_model_config(), manifest)
  vision_tasks.check_image_data(task, config, manifest, data_dir, built_by)
  if config.lora_rank and trainable is None:
    trainable = LORA_TRAINABLE
  try:
    mesh = sharding.make_mesh()
  except ValueError as error:  # the sizes do not fit the devices
    raise UserError(str(error).splitlines()[0]) from None
  if global_batch_size % (microbatches * sharding.batch_divisor(mesh)):
    raise UserError(f"train.global_batch_size={global_batch_size} must be a multiple of "
                    f"train.microbatches={microbatches} times the mesh's data*fsdp size "
                    f"{sharding.batch_divisor(mesh)}")
  schedule = optim.learning_rate_schedule(steps)
  try:
    optimizer = optim.make_optimizer(schedule)
  except ValueError as error:  # settings that exclude each other
    raise UserError(str(error).splitlines()[0]) from None
  graphdef, abstract_state = train_steps.abstract_model(config, seed)
  if trainable is not None:
    check_trainable_matches(nnx.to_pure_dict(abstract_state), trainable, config)
  shardings = train_steps.state_shardings(abstract_state, optimizer, mesh, trainable)
  frozen_shardings = (train_steps.frozen_shardings(abstract_state, mesh, trainable)
                      if trainable else None)
  batch_sharding = sharding.batch_sharding(mesh)
  train_iter = iter(data.make_dataset(data_dir, "train", global_batch_size=global_batch_size,
                                      seed=seed))
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = checkpoint.Checkpointer(workdir, save_every=checkpoint_every,
                                        max_to_keep=keep_checkpoints,
                                        keep_period=keep_checkpoint_every,
                                        verify=verify_checkpoints)
  meta = checkpoint.model_meta(config, seq_len=seq_len, data_dir=str(data_dir),
                               tokenizer_sha256=manifest["tokenizer"]["sha256"],
                               **({"init_from_step": init_from_step} if init_from else {}),
                               **({"trainable": trainable, "init_from": init_from, "seed": seed}
                                  if trainable else {}))
  start = Start(config, meta, abstract_state, optimizer, shardings, seed, init_from,
                init_from_step, trainable)
  starting_params = StartingParams(start)
  state, frozen = _restore_or_init(checkpointer, workdir, start, starting_params, train_iter,
                                   data_dir)
  frozen_args = (frozen,) if trainable else ()  # the steps' extra argument, when there is one
  first_step = int(state.step)
  task = task.bind(tasks.TaskContext(
      graphdef, sharding.param_shardings(abstract_state, mesh), batch_sharding, mesh,
      reference_params=starting_params, reference_from=init_from))
  starting_params.release()  # a task that wants them (DPO's reference) holds them now
  train_step = train_steps.make_train_step(graphdef, task.loss, optimizer, shardings,
                                           batch_sharding, microbatches, frozen_shardings)
  eval_step = train_steps.make_eval_step(graphdef, task.loss, shardings.params, batch_sharding,
                                         frozen_shardings)
  evaluate = lambda params: _evaluate(  # noqa: E731
      task, functools.partial(eval_step, params), frozen_args, data_dir, global_batch_size,
      eval_batches, batch_sharding)
  writer = metrics.create_writer(workdir, is_primary=jax.process_index() == 0)
  writer.write_hparams({"model": meta["model_config"], "global_batch_size": global_batch_size,
                        "steps": steps, "seq_len": seq_len, "mesh": dict(mesh.shape)})
  progress = metrics.ConsoleProgress(steps, first_step, log_every)
  report = metrics.periodic_actions.ReportProgress(num_train_steps=steps, writer=writer,
                                                   every_steps=log_every, every_secs=None)
  row_tokens, row_flops = task.step_cost(config, seq_len)
  tokens_per_step, flops_per_step = global_batch_size * row_tokens, global_batch_size * row_flops
  peak_flops = peak_flops_per_device * jax.device_count() if peak_flops_per_device else None
  attention_used = attention.implementation_for(
      config.attention, dtype=config.dtype, head_dim=config.head_dim, seq_len=seq_len,
      with_branches="branch_ids" in task.batch_fields)
  attention_said = (f"{attention_used} ({config.attention})" if attention_used != config.attention
                    else attention_used)
  _log(f"params {sum(x.size for x in jax.tree.leaves(state.params)):,} | mesh {dict(mesh.shape)}"
       f" | attention {attention_said} | {tokens_per_step:,} tokens/step"
       f" | steps {first_step} -> {steps}")
  last_eval = None
  bad_in_a_row, skipped_total = 0, 0
  router_window = tasks.RouterLoadWindow()
  with (jax.set_mesh(mesh), _sigterm_requests_stop() as preempted,
        _pending_save_finishes_on_user_error(checkpointer)):
    for step in range(first_step + 1, steps + 1):
      if profile_steps and step == profile_steps[0]:
        jax.profiler.start_trace(str(workdir / "profile"))
      started = time.perf_counter()
      batch = task.prepare_batch(_to_global(next(train_iter), batch_sharding))
      state, step_metrics = train_step(state, batch, *frozen_args)
      loss = float(step_metrics["loss"])
      step_s = time.perf_counter() - started
      if profile_steps and step == profile_steps[1]:
        jax.profiler.stop_trace()
      scalars = {"loss": loss, "learning_rate": float(schedule(step - 1)),
                 "grad_norm": float(step_metrics["grad_norm"]),
                 "tokens_per_s": tokens_per_step / step_s,
                 "model_flops_per_s": flops_per_step / step_s}
      if peak_flops:
        scalars["mfu"] = scalars["model_flops_per_s"] / peak_flops
      scalars.update(task.train_scalars(step_metrics))
      router_window.add(scalars)
      if step % log_every == 0:
        scalars.update(router_window.pop())
      if int(step_metrics["skipped"]):
        bad_in_a_row, skipped_total = bad_in_a_row + 1, skipped_total + 1
        scalars["skipped_steps"] = skipped_total
      else:
        bad_in_a_row = 0
      if step % eval_every == 0 or step == steps:
        with report.timed("eval"):
          last_eval = evaluate(state.params)
          if evals:
            scalars.update(_run_evals(evals, graphdef, train_steps.merge_params(
                state.params, frozen), config, data_dir))
        scalars.update(last_eval)
      writer.write_scalars(step, scalars)
      report(step)
      progress.update(step, {k: scalars[k] for k in ("loss", "learning_rate", "tokens_per_s",
                                                     "eval_loss", "mfu") if k in scalars})
      if bad_in_a_row >= max_bad_steps:
        checkpointer.wait()
        writer.close()
        raise UserError(
            f"{bad_in_a_row} steps in a row up to step {step} had a non-finite loss or "
            f"gradient (loss {loss}); the last good checkpoint is kept in {workdir}. Lower "
            "learning_rate_schedule.peak_learning_rate or check the data")
      # Read once: a SIGTERM landing between the save and the break would otherwise stop
      # the run unsaved; one landing after this read is the next step's to save.
      stopping = preempted.is_set()
      if bad_in_a_row == 0:  # never checkpoint in the middle of a run of bad steps
        with report.timed("checkpoint"):
          save_started = time.perf_counter()
          if checkpointer.save(step, state, data.iterator_save_args(train_iter), meta,
                               force=step == steps or stopping):
            blocked_s = time.perf_counter() - save_started
            writer.write_scalars(step, {"checkpoint_blocked_s": blocked_s})
            writer.flush()  # metrics.jsonl holds every step up to each checkpoint
      if stopping:
        break
    checkpointer.wait()
    writer.flush()
    if preempted.is_set():
      _log(f"SIGTERM: checkpoint of step {checkpointer.latest_step()} written; rerun the same "
           "command to resume")
      checkpointer.close()
      writer.close()
      return {"step": int(state.step), "preempted": True}
    if last_eval is None:
      last_eval = evaluate(state.params)
    not_finite = {name: value for name, value in last_eval.items() if not np.isfinite(value)}
    if not_finite:
      checkpointer.close()
      writer.close()
      raise UserError(f"the held-out {', '.join(f'{k}={v}' for k, v in not_finite.items())} "
                      f"after step {int(state.step)}: the model diverged; lower "
                      "learning_rate_schedule.peak_learning_rate or check the data, and resume "
                      f"from an earlier checkpoint in {workdir}")
    summary = task.summary(last_eval, manifest, int(state.step))
    if sample_prompt is None:
      checkpointer.close()
      writer.close()
      return summary
    tokenizer = _tokenizer(data_dir)
    prompt_ids = [manifest["tokenizer"]["bos_id"]] + tokenizer.encode(sample_prompt)
    sample_ids = sampling.generate(graphdef, train_steps.merge_params(state.params, frozen),
                                   prompt_ids,
                                   max_new_tokens=sample_tokens, temperature=sample_temperature,
                                   top_p=0.95, seed=seed, eos_id=manifest["tokenizer"]["eos_id"],
                                   config=config)
  sample = tokenizer.decode(sample_ids)
  how = f"temperature {sample_temperature}, top_p 0.95" if sample_temperature else "greedy"
  print(f"\nsample ({how}) for {sample_prompt!r}:\n{sample_prompt}{sample}\n", flush=True)
  checkpointer.close()
  writer.close()
  return {**summary, "sample": sample_prompt + sample}


@contextlib.contextmanager
def _sigterm_requests_stop():
  """Yields an event that SIGTERM (preemption) sets: the loop finishes its step, saves a
  checkpoint and returns, so the process exits 0."""
  requested = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield requested
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
  try:
    yield requested
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _pending_save_finishes_on_user_error(checkpointer):
  """A user error mid-run (a corrupt shard) exits only after the in-flight async save is
  written, so the checkpoint before the bad batch is complete."""
  try:
    yield
  except UserError:
    checkpointer.wait()
    raise


@dataclasses.dataclass(frozen=True)
class Start:
  """What a run starts or resumes from."""
  config: ModelConfig
  meta: dict
  abstract_state: object
  optimizer: object
  shardings: train_steps.TrainState
  seed: int
  init_from: str | None
  init_from_step: int | None
  trainable: str | None


class StartingParams:
  """The whole parameter set the run starts from (see `_starting_params`), loaded at most
  once: a new run's trained and frozen parameters and a task's reference model (DPO) share
  one load. Call it for the parameters; `release` drops the loop's hold on them."""

  def __init__(self, start: Start):
    self._start, self._params = start, None

  def __call__(self) -> dict:
    if self._params is None:
      self._params = _starting_params(self._start)
    return self._params

  def release(self):
    self._params = None


def _init_from_step(workdir: Path, init_from: str | None) -> int | None:
  """The checkpoint of `init_from` the run starts from: the one its checkpoints' meta
  recorded at the first start, else (a new run, or one written before the record) the
  latest. A source run without a checkpoint names the command that trains it."""
  if not init_from:
    return None
  recorded = _recorded_init_from_step(workdir)
  if recorded is not None:
    return recorded
  if not Path(init_from).is_dir():
    raise UserError(f"--init_from {init_from} does not exist yet; train it first: "
                    f"{train_command(init_from)}")
  if (Path(init_from) / MANIFEST_NAME).exists():
    raise UserError(f"--init_from {init_from} is a data dir (it has {MANIFEST_NAME}); "
                    "pass it as --data_dir, and as --init_from the --workdir of a run")
  try:
    return checkpoint.read_meta(init_from)[0]
  except FileNotFoundError:
    raise UserError(f"--init_from {init_from} has no checkpoint; train it first: "
                    f"{train_command(init_from)}") from None
  except checkpoint.CorruptCheckpointError as error:
    raise UserError(f"--init_from: {error}") from None


def _recorded_init_from_step(workdir: Path) -> int | None:
  try:
    steps = checkpoint.all_steps(workdir)
  except FileNotFoundError:
    return None
  for step in reversed(steps):
    try:
      return checkpoint.read_meta(workdir, step)[1].get("init_from_step")
    except checkpoint.CorruptCheckpointError:
      continue  # resume falls back past it too
  return None


def train_command(run_dir: str) -> str:
  """The command that trains `run_dir`: configs/NAME.gin's for a run dir named NAME (with
  --workdir unless it is that config's default, runs/NAME)."""
  config = CONFIGS_DIR / f"{Path(run_dir).name}.gin"
  command = "python -m maxlm.train" + (f" --gin_file={config.name}" if config.exists() else "")
  if not config.exists() or Path(run_dir) != Path(default_workdir(config.name)):
    command += f" --workdir={run_dir}"
  return command


def default_workdir(gin_file: str) -> str:
  return os.path.join("runs", Path(gin_file).stem)


def _data_dir(data_dir: str | Callable[[], str] | None) -> str:
  if data_dir is None:
    return ensure_default_corpus()
  return data_dir() if callable(data_dir) else data_dir


def _restore_or_init(checkpointer, workdir, start: Start, starting_params: StartingParams,
                     train_iter, data_dir):
  """(train state, frozen parameters) to start from: the newest intact checkpoint (a newer
  corrupt one is moved aside with a warning line, and none intact stops the run), else
  `init_from`'s parameters or fresh ones."""
  steps = checkpointer.all_steps()
  if not steps:
    tokenizer_lib.copy_into(data.tokenizer_path(data_dir), workdir)
    if not (start.init_from or start.trainable):
      return train_steps.init_train_state(start.config, start.optimizer, start.shardings,
                                          start.seed), {}
    trained, frozen = train_steps.split_trainable(starting_params(), start.trainable)
    if start.init_from:
      _log(f"parameters from {start.init_from}; optimizer state and step start afresh")
      source_meta = checkpoint.read_meta(start.init_from, start.init_from_step)[1]
      if start.config.vision and not checkpoint.config_from_meta(source_meta).vision:
        _log(f"vision tower and projector initialized fresh: {start.init_from} is text-only")
      if warning := changed_numerics(source_meta, start.config, start.init_from):
        _log(warning)
    return train_steps.train_state_from_params(trained, start.optimizer, start.shardings), frozen
  target = train_steps.abstract_train_state(start.abstract_state, start.optimizer,
                                            start.shardings, start.trainable)

  def restore(step):
    _, saved_meta = checkpoint.read_meta(workdir, step)
    check_compatible(saved_meta, start.meta, workdir)
    return checkpointer.restore(step, target, data.iterator_restore_args(train_iter))[0]

  step, state, corrupt = checkpoint.newest_intact(steps, restore)
  if step is None:
    raise UserError(f"{corrupt[0]}; no checkpoint there is intact ({len(corrupt)} tried): start "
                    "a new --workdir")
  for error in corrupt:
    moved = checkpointer.set_aside(error.step)
    if jax.process_index() == 0:
      print(f"warning: {error}; moved it to {moved} and resumed from step {step}",
            file=sys.stderr, flush=True)
  metrics.JsonlWriter.truncate_after(workdir / "metrics.jsonl", step)
  _log(f"resumed from {workdir / checkpoint.CHECKPOINTS / str(step)} (step {step})"
       + (f"; --init_from {start.init_from} gave only the first start's parameters"
          if start.init_from else ""))
  if not start.trainable:
    return state, {}
  return state, train_steps.split_trainable(starting_params(), start.trainable)[1]


def _starting_params(start: Start) -> dict:
  """The whole parameter set a new run starts from (frozen ones are reloaded on resume):
  `init_from`'s (of `init_from_step`) where its model has them (a partly trained run's
  merged over its own start), the seed's initialization for the rest (new adapters), laid
  out for this run's mesh."""
  param_shardings = sharding.param_shardings(start.abstract_state, start.shardings.step.mesh)
  abstract_params = jax.tree.map(
      lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where),
      nnx.to_pure_dict(start.abstract_state), param_shardings)
  try:
    if start.init_from:
      _, source_meta = checkpoint.read_meta(start.init_from, start.init_from_step)
      check_same_model(source_meta, start.meta, start.init_from, start.config)
    return runs.starting_params(start.init_from, start.config, start.seed, abstract_params,
                                start.init_from_step)
  except (FileNotFoundError, checkpoint.CorruptCheckpointError) as error:
    raise UserError(f"--init_from: {error}") from None


def _to_global(local_batch: dict, batch_sharding) -> dict:
  return {name: jax.make_array_from_process_local_data(batch_sharding, array)
          for name, array in local_batch.items()}


def _evaluate(task: tasks.Task, eval_step, frozen_args: tuple, data_dir, global_batch_size,
              max_batches, batch_sharding) -> dict[str, float]:
  """The task's eval scalars over (up to `max_batches` of) the validation split."""
  sums = heldout.split_sums(
      data_dir, lambda batch: eval_step(task.prepare_batch(_to_global(batch, batch_sharding)),
                                        *frozen_args), global_batch_size, max_batches)
  return task.eval_scalars(sums)


def _run_evals(evals, graphdef, params, config: ModelConfig, data_dir) -> dict[str, float]:
  """`train.evals`' numbers on the current parameters, as `evals/TASK/METRIC` scalars."""
  model = scoring.EvalModel(graphdef, params, _tokenizer(data_dir), config.max_seq_len)
  model = dataclasses.replace(model, generate=generation.sampling_generate(model, config))
  return eval_report.writer_scalars(eval_report.run_all(evals, model)[0])


def check_task_fields(task: tasks.Task, manifest: dict, data_dir) -> None:
  """The data must hold every field the task's loss reads."""
  available = [field.name for field in fields_of_manifest(manifest)]
  missing = [name for name in task.batch_fields if name not in available]
  if missing and "chosen_tokens" in available:  # written before pairs shared their prompt
    raise UserError(f"--data_dir {data_dir} holds preference pairs in the old two-halves "
                    "layout; re-run python -m beam_pipelines.prepare_chat on its inputs")
  if missing:
    raise UserError(f"--data_dir {data_dir} has no {', '.join(missing)} field (it has "
                    f"{', '.join(available)}), which the {type(task).__name__} task reads; "
                    "prepare the data with the pipeline for that task")
  branches = chat_examples.BRANCH_FIELD
  if branches in available and branches not in task.batch_fields:
    # Without branch_ids each rejected reply attends to its chosen one, and both train.
    raise UserError(f"--data_dir {data_dir} holds preference pairs ({branches}), which only "
                    f"the DPO task reads, not {type(task).__name__}; train on it with "
                    "train.task=@DPO() (dpo_tiny.gin), or prepare SFT rows for SFT")


def check_trainable_matches(params: dict, trainable: str, config: ModelConfig) -> None:
  """A `trainable` matching no parameter path would run and train nothing."""
  if train_steps.split_trainable(params, trainable)[0]:
    return
  if trainable == LORA_TRAINABLE and config.lora_rank and not config.lora_targets:
    why = "ModelConfig.lora_targets=() names no projection to put an adapter beside"
  elif "lora" in trainable and not config.lora_rank:
    why = "ModelConfig.lora_rank=0 adds no adapters"
  else:
    paths = ["/".join(str(key.key) for key in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    why = f"paths read like {paths[0]} or {paths[-1]}"
  raise UserError(f"train.trainable={trainable!r} matches no parameter, so nothing would "
                  f"train: {why}")


def _tokenizer(data_dir) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.load(data.tokenizer_path(data_dir))


def _log(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def resolve_gin_file(name: str) -> str:
  """A path as given if it exists, else the bare name under configs/."""
  if os.path.exists(name):
    return name
  candidate = CONFIGS_DIR / name
  if candidate.exists():
    return str(candidate)
  known = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.gin")))
  raise UserError(f"--gin_file {name} is neither a file nor one of configs/: {known}")


def parse_gin(gin_files: list[str], bindings: list[str]) -> None:
  """gin's parse of the files, then the bindings, one at a time: an error names which."""
  sources = [(f"--gin_file {name}", functools.partial(gin.parse_config_file, name))
             for name in gin_files]
  sources += [(f"--gin_param {binding}", functools.partial(gin.parse_config, binding))
              for binding in bindings]
  for source, parse in sources:
    try:
      parse()
    except (ValueError, KeyError, SyntaxError, OSError, tokenize.TokenError) as error:
      raise UserError(f"gin configuration error in {source}: {gin_error_sentence(error)}"
                      ) from None
  try:
    gin.finalize()
  except ValueError as error:  # a %NAME no file or binding defines; gin appends every binding
    first = str(error).splitlines()[0].strip().removesuffix(" in config string:")
    if macro := re.fullmatch(r"No bindings specified for '(.+)/gin\.macro'", first):
      first = (f"%{macro[1]} names no macro; bind it ({macro[1]} = value) or drop the "
               "reference")
    raise UserError(f"gin configuration error: {first}") from None


def gin_error_sentence(error: Exception) -> str:
  """gin's multi-line error as one line that keeps where it happened: `Configurable 'train'
  doesn't have a parameter named 'stepz' (file "x.gin", line 3: train.stepz = 3)`."""
  if isinstance(error, tokenize.TokenError):
    message, (line, _) = error.args
    return f"{message} (line {line})"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  # Python's own parse error says nothing gin's "Failed to parse token" line does not.
  lines = [line for line in lines if not line.startswith("malformed node or string")]
  head, rest = lines[0], lines[1:]
  location = next((i for i, line in enumerate(rest) if line.startswith("In ")), None)
  if location is None:
    return " ".join(lines)
  where = rest[location].removeprefix("In ")
  code = rest[location + 1] if location + 1 < len(rest) else ""
  if where.startswith("bindings string"):  # the source the caller names is that binding
    return head
  return f"{head.rstrip('.')} ({where}{': ' + code if code else ''})"


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None):
  """Joins a multi-process run when told so by flags, or by a cluster JAX detects itself
  (a multi-host TPU slice, SLURM); a single process does nothing."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise UserError("--coordinator_address, --num_processes and --process_id go together; "
                      "pass all three")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts talk via gloo
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or int(
      os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def main(argv):
  del argv
  train_steps.keep_freed_host_memory()  # before JAX starts its CPU client
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every save at INFO
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  compilation_cache.enable(_COMPILATION_CACHE.value)
  gin.add_config_file_search_path(str(CONFIGS_DIR))
  gin_files = [resolve_gin_file(name) for name in _GIN_FILE.value]
  parse_gin(gin_files, _GIN_PARAM.value)
  overrides = {"workdir": _WORKDIR.value, "data_dir": _DATA_DIR.value, "steps": _STEPS.value,
               "checkpoint_every": _CHECKPOINT_EVERY.value, "init_from": _INIT_FROM.value}
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if "workdir" not in overrides and not _has_binding("train.workdir"):
    overrides["workdir"] = default_workdir(gin_files[0])
  summary = train(**overrides)
  logging.info("summary: %s", json.dumps(summary))


def _has_binding(name: str) -> bool:
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad flag raising UserError (one `error:` line, exit 2, as every
  other mistake in the command is) where absl's own prints FATAL and exits 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    raise UserError(f"{error}; `python -m maxlm.train --helpshort` lists the flags") from None


def run():
  """Console entry: user errors print one line instead of a traceback."""
  try:
    app.run(main, flags_parser=parse_flags)
  except UserError as error:
    # gin appends "In call to configurable ..." lines; the first line says what to fix.
    print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("\ninterrupted: rerun the same command to resume from the last complete checkpoint",
          file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  run()
