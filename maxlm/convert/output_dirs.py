"""The --output_dir of a conversion: refused when it holds what the conversion did not write
(unless --overwrite), and filled through a `.partial` sibling that takes its place only when
complete, so a conversion that fails or is stopped leaves the output dir as it was."""

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from maxlm.errors import UserError

PARTIAL_SUFFIX = ".partial"
RETIRED_SUFFIX = ".old"


def contents(output_dir: Path) -> list[str]:
  """The names in `output_dir`, sorted ([] when it does not exist yet); a file there raises."""
  if output_dir.exists() and not output_dir.is_dir():
    raise UserError(f"--output_dir {output_dir} is a file; pass a directory path")
  return sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []


def not_empty_error(output_dir: Path, names: list[str], held: str = "files") -> UserError:
  listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
  return UserError(f"--output_dir {output_dir} already holds {held} ({listed}); pass a new or "
                   "empty directory, or --overwrite to replace it")


def refuse_enclosing(output_dir: Path, source: Path, flag: str) -> None:
  """Refuses an output dir that is `source` or holds it: replacing it would delete the input."""
  output, source = output_dir.resolve(), source.resolve()
  if output == source or output in source.parents:
    raise UserError(f"--output_dir {output_dir} holds {flag} {source}; pass another directory")


def move_into_place(staging: Path, output_dir: Path) -> None:
  """Renames `staging` to `output_dir`; a non-empty `output_dir` (the caller was told to
  overwrite it) is first moved aside and deleted after, so no reader sees a mix of the two."""
  if not output_dir.is_dir() or not any(output_dir.iterdir()):
    os.replace(staging, output_dir)  # an empty directory is replaced by the rename itself
    return
  retired = output_dir.with_name(output_dir.name + RETIRED_SUFFIX)
  shutil.rmtree(retired, ignore_errors=True)
  os.replace(output_dir, retired)
  try:
    os.replace(staging, output_dir)
  except BaseException:
    os.replace(retired, output_dir)
    raise
  shutil.rmtree(retired)


@contextlib.contextmanager
def staged(output_dir: Path,
           publish: Callable[[Path, Path], None] = move_into_place) -> Iterator[Path]:
  """Yields an empty `<output_dir>.partial` to fill. When the body returns, `publish(staging,
  output_dir)` puts it in place; when it raises or is interrupted, the staging dir is removed,
  with the parent directories made for it."""
  target = output_dir.resolve()
  staging = target.with_name(target.name + PARTIAL_SUFFIX)
  made_parents = [parent for parent in staging.parents if not parent.exists()]
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  try:
    yield staging
    publish(staging, target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    for parent in made_parents:  # deepest first; one now holding anything else stays
      with contextlib.suppress(OSError):
        parent.rmdir()
    raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
