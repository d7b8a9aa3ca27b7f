"""The staging directory a prepare_text run fills beside --output_dir and renames into place when
complete, the owner file that says which process it belongs to, and the stale ones left by runs
killed before they could remove theirs."""

import glob
import os
import socket
import uuid

from apache_beam.io.filesystems import FileSystems

from beam_pipelines import reading

STAGING_MARK = ".tmp-"
OWNER_NAME = ".owner"  # "HOST PID"; removed before the rename, so never published


def create(output_dir: str) -> str:
  """A fresh directory beside output_dir, owned by this process."""
  path = f"{output_dir.rstrip('/')}{STAGING_MARK}{uuid.uuid4().hex[:8]}"
  FileSystems.mkdirs(path)
  with FileSystems.create(FileSystems.join(path, OWNER_NAME)) as f:
    f.write(f"{socket.gethostname()} {os.getpid()}\n".encode())
  return path


def publish(staged: str, output_dir: str) -> None:
  """Replaces output_dir with the staged run whole; a reader sees the old run, no directory
  for an instant, or the new run, never a mix."""
  FileSystems.delete([FileSystems.join(staged, OWNER_NAME)])
  if FileSystems.exists(output_dir):
    retired = f"{output_dir.rstrip('/')}.old-{uuid.uuid4().hex[:8]}"
    FileSystems.rename([output_dir], [retired])
    FileSystems.rename([staged], [output_dir])
    FileSystems.delete([retired])
  else:
    FileSystems.rename([staged], [output_dir])


def owner_alive(path: str) -> bool:
  """Whether the process named in the staging dir's owner file still runs. A dir without one
  (from a run older than owner files) has no owner; another host's process cannot be checked
  and counts as alive."""
  try:
    with open(os.path.join(path, OWNER_NAME), encoding="utf-8") as f:
      host, pid = f.read().split()
    pid = int(pid)
  except (OSError, ValueError):
    return False
  if host != socket.gethostname():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def stale_dirs(output_dir: str) -> list[str]:
  """Staging dirs of output_dir whose owner is gone. Local filesystems only: elsewhere no
  process can be checked."""
  if not reading.is_local(output_dir):
    return []
  pattern = glob.escape(output_dir.rstrip("/")) + STAGING_MARK + "*"
  return sorted(path for path in glob.glob(pattern)
                if os.path.isdir(path) and not owner_alive(path))
