"""One trainer per run directory: an OS lock on WORKDIR/.lock, held while the trainer runs.

`fcntl.flock` is released by the kernel when its holder exits however it exits, so a crashed
trainer never blocks the next one. The file records who holds it (pid, host, start time) for
the refusal message; a clean exit empties it, so a file naming a holder whose lock is free was
left by a process that died, and the message says that it was taken over.

In a multi-process run only JAX process 0 takes the lock (maxlm.train does this): the
processes of one run share the workdir, and a second run's process 0 is refused. Across hosts
the lock holds where the shared filesystem implements flock (local disks, NFSv4, Lustre
mounted with `flock`); FUSE mounts of object stores do not, and there it guards one host only.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from maxlm.errors import UserError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, log: Callable[[str], None] = print) -> Iterator[Path]:
  """Holds WORKDIR/.lock for the `with` block; a second holder gets a UserError at once."""
  path = Path(workdir) / LOCK_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+", encoding="utf-8") as lock_file:
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(
          f"{workdir} is in use by another trainer ({_describe(_read_holder(lock_file))}; "
          f"lock file {path}); wait for it to finish, stop it, or pass another --workdir"
      ) from None
    stale = _read_holder(lock_file)
    if stale:
      log(f"took over a stale lock from {_describe(stale)}, which is gone ({path})")
    _write_holder(lock_file)
    try:
      yield path
    finally:
      lock_file.truncate(0)  # closing the file at the end of `with open` releases the lock


def _read_holder(lock_file) -> dict:
  lock_file.seek(0)
  try:
    holder = json.loads(lock_file.read())
  except ValueError:  # empty (released cleanly), or cut short by a crash while writing
    return {}
  return holder if isinstance(holder, dict) else {}


def _write_holder(lock_file) -> None:
  lock_file.truncate(0)
  lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
  lock_file.flush()
  os.fsync(lock_file.fileno())


def _describe(holder: dict) -> str:
  if "pid" not in holder:
    return "holder not recorded yet"
  return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
