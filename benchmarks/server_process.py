"""Waiting for a benchmark's server subprocess (ours or vLLM's) to answer /health."""

import subprocess
import time
from pathlib import Path

import httpx


def wait_until_healthy(process: subprocess.Popen, url: str, log_file: Path, seconds: float,
                       name: str = "the server") -> None:
  """Returns once `url`/health answers 200; raises with the log's tail if the process exits,
  or after `seconds`."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"{name} exited: {log_file.read_text(errors='replace')[-3000:]}")
    try:
      if httpx.get(f"{url}/health", timeout=1).status_code == 200:
        return
    except httpx.TransportError:
      time.sleep(0.3)
  raise RuntimeError(f"{name} did not become healthy in {seconds:.0f} s; see {log_file}")
