"""One trainer per workdir: a second holder is refused naming the first, and a lock left by a
process that died is taken over with a message saying so."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from maxlm import workdir_lock
from maxlm.errors import UserError

REPO = Path(__file__).parent.parent


def _holder_process(workdir, then: str) -> subprocess.Popen:
  """Another process that takes the lock, says "held", then runs `then`."""
  script = ("import os, signal, sys, time\nfrom maxlm import workdir_lock\n"
            "lock = workdir_lock.hold(sys.argv[1])\nlock.__enter__()\n"
            f"print('held', flush=True)\n{then}\n")
  process = subprocess.Popen([sys.executable, "-c", script, str(workdir)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == "held\n"
  return process


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_file(tmp_path):
  first = _holder_process(tmp_path, "time.sleep(60)")
  try:
    with pytest.raises(UserError) as refused, workdir_lock.hold(tmp_path):
      pass
  finally:
    first.kill()
    first.wait()
  message = str(refused.value)
  assert message.startswith(f"{tmp_path} is in use by another trainer (pid {first.pid} on "
                            f"{socket.gethostname()}, started ")
  assert message.endswith(f"; lock file {tmp_path / '.lock'}); wait for it to finish, stop it, "
                          "or pass another --workdir")


def test_a_lock_left_by_a_killed_process_is_taken_over_saying_so(tmp_path):
  crashed = _holder_process(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
  crashed.wait()
  said = []
  with workdir_lock.hold(tmp_path, log=said.append):
    holder = json.loads((tmp_path / ".lock").read_text())
  assert len(said) == 1
  assert said[0].startswith(f"took over a stale lock from pid {crashed.pid} on ")
  assert said[0].endswith(f", which is gone ({tmp_path / '.lock'})")
  assert holder["pid"] == os.getpid()


def test_a_lock_file_naming_a_dead_pid_is_taken_over(tmp_path):
  exited = subprocess.Popen(["true"])
  exited.wait()
  dead_pid = exited.pid
  (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid, "host": "elsewhere",
                                              "started": "yesterday"}))
  said = []
  with workdir_lock.hold(tmp_path, log=said.append):
    pass
  stale = f"pid {dead_pid} on elsewhere, started yesterday"
  assert said == [f"took over a stale lock from {stale}, which is gone ({tmp_path / '.lock'})"]


def test_a_clean_release_leaves_no_stale_holder(tmp_path):
  said = []
  with workdir_lock.hold(tmp_path / "new" / "run", log=said.append):
    assert json.loads((tmp_path / "new" / "run" / ".lock").read_text())["pid"] == os.getpid()
  with workdir_lock.hold(tmp_path / "new" / "run", log=said.append):
    pass
  assert said == []
  assert (tmp_path / "new" / "run" / ".lock").read_text() == ""
