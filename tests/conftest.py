"""What several test files share: eight fake CPU devices, one compilation cache per session, one
prepared pretraining corpus and one tiny trained run per session (each costs a pipeline run or a
training run's compiles), and a uvicorn server in a thread with an app to serve.

The shared directories are read by many tests: a test that changes one works on a copy."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest

# Tests compile hundreds of small programs and run each a few times, so XLA's CPU backend would
# spend much of the run optimizing machine code with LLVM that gains nothing at these sizes: these
# flags cut the suite from 21 to 14.6 minutes on an AVX2 host. The XLA programs stay the same,
# with no fast-math either way: float results may differ from an optimized build in the last bits.
QUICK_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILE_FLAGS}"


# Eight fake CPU devices for the sharding tests (the README's command sets the same count); must
# be set before JAX initializes.
os.environ["XLA_FLAGS"] = (f"{os.environ['XLA_FLAGS']} {QUICK_COMPILE_FLAGS}"
                           if "XLA_FLAGS" in os.environ else xla_flags(8))

# The tiny model on a 2x2x2 mesh, as gin lines (a subprocess gets them as --gin_param flags).
TINY_MODEL = """
ModelConfig.num_layers = 2
ModelConfig.embed_dim = 64
ModelConfig.num_heads = 4
ModelConfig.num_kv_heads = 2
ModelConfig.head_dim = 16
ModelConfig.mlp_dim = 128
ModelConfig.max_seq_len = 256
make_mesh.data = 2
make_mesh.fsdp = 2
make_mesh.tensor = 2
train.global_batch_size = 8
"""
# A short pretraining run of it: a checkpoint at step 1 and every 4th, an eval every 4th.
TINY_RUN = TINY_MODEL + """
train.checkpoint_every = 4
train.eval_every = 4
train.eval_batches = 2
train.log_every = 2
train.sample_tokens = 8
learning_rate_schedule.peak_learning_rate = 3e-3
learning_rate_schedule.warmup_steps = 2
"""
TINY_RUN_STEPS = 4
TINY_RUN_PEAK_FLOPS = 1e9  # per device, so that the run's metrics carry mfu
STDLIB_MODULES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "colorsys.py",
                  "fnmatch.py")


_own_cache_dirs = []


def pytest_configure(config):
  """A JAX compilation cache for this session, in this process and the `python -m` children it
  starts: the many tiny runs compile the same train and eval steps again and again. Made here
  and removed at the end, so that it is never shared between users or sessions."""
  del config
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _own_cache_dirs.append(tempfile.mkdtemp(prefix="maxlm-tests-jax-cache-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _own_cache_dirs[-1]
  # Every program, however quick to compile: a cache read is quicker still (13:53 -> 12:32).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  del config
  while _own_cache_dirs:
    shutil.rmtree(_own_cache_dirs.pop(), ignore_errors=True)


def train_subprocess(workdir, data_dir, bindings: list[str], *flags: str,
                     devices: int = 8) -> subprocess.Popen:
  """A real `python -m maxlm.train` with gin `bindings` (lines) and `flags`, on `devices` fake
  CPU devices, its output merged into one text pipe."""
  command = [sys.executable, "-m", "maxlm.train", f"--workdir={workdir}",
             f"--data_dir={data_dir}", *[f"--gin_param={line}" for line in bindings], *flags]
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
         "PYTHONFAULTHANDLER": "1"}  # a SIGABRT (`outputs_within`) prints every thread's stack
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=Path(__file__).parent.parent)


def outputs_within(processes: list[subprocess.Popen], timeout: float) -> list[str]:
  """Each `train_subprocess`'s whole output once all have exited. Any still running after
  `timeout` seconds gets SIGABRT, which prints its Python threads' stacks, and the test fails
  showing every output: a multi-process run that hangs says where."""
  deadline = time.monotonic() + timeout
  outputs = []
  for process in processes:
    try:
      outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
    except subprocess.TimeoutExpired:
      break
  else:
    return outputs
  for process in processes:
    if process.poll() is None:
      process.send_signal(signal.SIGABRT)
  dumps = []
  for index, process in enumerate(processes):
    if index < len(outputs):  # exited in time: its output is read already
      output = outputs[index]
    else:
      try:
        output = process.communicate(timeout=30)[0]
      except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
    dumps.append(f"--- process {index} (exit {process.returncode}) ---\n{output}")
  raise AssertionError(f"still running after {timeout} s; their stacks:\n" + "\n".join(dumps))


def kill_after_step(process: subprocess.Popen, step: int) -> list[str]:
  """Reads a `train_subprocess`'s output up to step `step`'s line (flushed as the step ends),
  then SIGKILLs it; its output so far."""
  output = []
  for line in process.stdout:
    output.append(line)
    if line.startswith(f"step {step}/"):
      break
  process.kill()
  process.wait()
  assert any(line.startswith(f"step {step}/") for line in output), "".join(output)
  return output


@contextlib.contextmanager
def gin_config(bindings: str):
  """Only `bindings` are bound inside the block; nothing is, after it."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin.parse_config(bindings)
  try:
    yield
  finally:
    gin.clear_config()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """Six stdlib modules prepared for pretraining: a 400-piece vocabulary, 64-token rows, a
  fifth held out."""
  from beam_pipelines import prepare_text  # pylint: disable=import-outside-toplevel
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  out = tmp_path_factory.mktemp("data")
  prepare_text.run([str(stdlib / name) for name in STDLIB_MODULES], str(out), vocab_size=400,
                   seq_len=64, validation_fraction=0.2)
  return str(out)


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory) -> Path:
  """The run directory of TINY_RUN_STEPS steps of TINY_RUN on data_dir: checkpoints 1 and 4,
  an eval at step 4, mfu in every row, no sample."""
  from maxlm import train as train_module  # pylint: disable=import-outside-toplevel
  run = tmp_path_factory.mktemp("tiny_run")
  with gin_config(TINY_RUN):
    train_module.train(workdir=str(run), data_dir=data_dir, steps=TINY_RUN_STEPS,
                       sample_prompt=None, peak_flops_per_device=TINY_RUN_PEAK_FLOPS)
  return run


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
  """A copy of tiny_run of this test's own, to resume, damage or refuse."""
  return Path(shutil.copytree(tiny_run, tmp_path / "tiny_run"))


def run_in_thread(server) -> threading.Thread:
  """Runs a uvicorn.Server in a daemon thread; returns the thread once the server accepts
  connections."""
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 10
  while not server.started:
    assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
    time.sleep(0.01)
  return thread


async def body_length_app(scope, receive, send):
  """An ASGI app that reads the whole request body and answers 200 with its length."""
  length, more = 0, True
  while more:
    message = await receive()
    if message["type"] == "http.disconnect":
      return
    length, more = length + len(message["body"]), message["more_body"]
  await send({"type": "http.response.start", "status": 200, "headers": []})
  await send({"type": "http.response.body", "body": str(length).encode()})
