"""The staging directory a prepare_text or prepare_chat run fills beside --output_dir and renames
into place when complete, the owner file that says which process it belongs to, the stale ones
left by runs killed before they could remove theirs (or kept by runs that made nothing, for
their reports), and the stop signals that remove a run's own before it exits."""

import argparse
import contextlib
import difflib
import glob
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import reading

STAGING_MARK = ".tmp-"
OWNER_NAME = ".owner"  # "HOST PID"; removed before the rename, so never published
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BAD_INPUT_EXIT_CODE = 2
BAD_INPUT_ERRORS = (ValueError, FileExistsError)  # run_until_stopped's one line, exit 2
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


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


class Unpublished(ValueError):
  """Bad input that only the run itself could find: the staging dir is not published but kept,
  holding only the files named in `kept` (what the user reads to see why), for the message to
  name. Without its owner file, later runs name it as stale."""

  def __init__(self, message: str, kept: tuple[str, ...]):
    super().__init__(message)
    self.kept = kept


def keep_only(path: str, names: tuple[str, ...]) -> None:
  """Deletes everything in the directory `path` but the files called `names`."""
  entries = FileSystems.match([FileSystems.join(path, "*")])[0].metadata_list
  doomed = sorted(entry.path for entry in entries if os.path.basename(entry.path) not in names)
  if doomed:
    FileSystems.delete(doomed)


@contextlib.contextmanager
def staged(output_dir: str) -> Iterator[str]:
  """Yields a fresh staging dir for output_dir, published as output_dir when the body returns,
  deleted when it raises or is stopped, and kept in part when it raises Unpublished."""
  path = create(output_dir)
  try:
    yield path
  except Unpublished as err:
    keep_only(path, err.kept)
    raise
  except BaseException:
    if FileSystems.exists(path):
      FileSystems.delete([path])
    raise
  publish(path, output_dir)


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


class Stopped(BaseException):
  """A stop signal, raised in the main thread; not an Exception, so `except Exception` in the
  code it interrupts lets it through (Beam re-raises it wrapped, which run_until_stopped also
  recognizes)."""


@contextlib.contextmanager
def stop_on_signals():
  """SIGINT and SIGTERM raise Stopped in the main thread, also where SIGINT came in ignored (a
  shell's background job ignores it); yields the list of signals received. Only the first one
  raises, so the cleanup it starts is not cut short by a second."""
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return

  def stop(signum, frame):
    del frame
    received.append(signum)
    if len(received) == 1:
      logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # its traceback of this stop
      raise Stopped(signal.Signals(signum).name)

  previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
  try:
    yield received
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def is_implicit_handler(handler: logging.Handler) -> bool:
  """Whether `handler` is the one a root logger with none gets from a module-level
  `logging.warning()` (basicConfig's defaults), as `import apache_beam` calls it."""
  return (type(handler) is logging.StreamHandler  # pylint: disable=unidiomatic-typecheck
          and handler.stream is sys.stderr and handler.formatter is not None
          and handler.formatter._fmt == logging.BASIC_FORMAT)  # pylint: disable=protected-access


def log_to_stderr() -> None:
  """A command line's INFO lines (progress, the staging dir) on stderr, Beam's from WARNING.
  Importing Beam configures the root logger at WARNING on its way (see is_implicit_handler);
  that handler is replaced. One someone else installed (pytest's, an embedding program's)
  stays, and none is left bound to a stream that its owner closes later, as force=True would."""
  root = logging.getLogger()
  for handler in [h for h in root.handlers if is_implicit_handler(h)]:
    root.removeHandler(handler)
  logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  logging.getLogger("apache_beam.runners.common").addFilter(_without_bad_input_tracebacks)


def _without_bad_input_tracebacks(record: logging.LogRecord) -> bool:
  """False for Beam's logged traceback of a transform's bad-input error, which
  run_until_stopped says in one line once it reaches the top (any other error keeps both)."""
  return not (record.exc_info and isinstance(record.exc_info[1], BAD_INPUT_ERRORS))


def run_until_stopped(program: str, output_dir: str, run: Callable[[], object]) -> None:
  """Runs a command line's `run()`: a stop signal exits 128 + its number, and bad input (a
  ValueError or FileExistsError) exits 2; each with one line on stderr."""
  with stop_on_signals() as received:
    try:
      run()
    except BaseException as err:
      if received:
        print(f"{program}: stopped by {signal.Signals(received[0]).name} before finishing; "
              f"--output_dir {output_dir} is as it was and no staging dir is left",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + received[0]) from None
      if isinstance(err, BAD_INPUT_ERRORS):
        print(f"{program}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(BAD_INPUT_EXIT_CODE) from None
      raise


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None, program: str
                ) -> tuple[argparse.Namespace, list[str]]:
  """(the command line's own flags, the rest for Beam as pipeline options). A flag that
  neither knows exits 2 naming it (and the closest of ours): Beam itself only logs
  'Unparseable argument' and runs without it, so a mistyped flag went unnoticed."""
  flags, beam_args = parser.parse_known_args(argv)
  if unknown := not_beam_options(beam_args):
    ours = difflib.get_close_matches(unknown[0], [f"--{name}" for name in vars(flags)], 1)
    parser.error(f"unrecognized flag {unknown[0]}: neither {program}'s nor a Beam "
                 "pipeline option" + (f"; did you mean {ours[0]}?" if ours else ""))
  return flags, beam_args


def not_beam_options(args: list[str]) -> list[str]:
  """The flags in `args` (as written, without a value) that no Beam pipeline option knows."""
  options = PipelineOptions(args)
  known = options.get_all_options()
  unknown = set(options.get_all_options(retain_unknown_options=True)) - set(known)
  flag_names = [arg.split("=", 1)[0] for arg in args if arg.startswith("-")]
  return [flag for flag in flag_names if flag.lstrip("-").replace("-", "_") in unknown]
