"""Where maxlm keeps what it builds once per machine: the prepared default datasets and the
compiled programs. Free of Beam and JAX, so a server finds its cache without importing them."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def cache_root() -> Path:
  """`$MAXLM_CACHE`, else `$XDG_CACHE_HOME/maxlm`, else `~/.cache/maxlm`."""
  if os.environ.get("MAXLM_CACHE"):
    return Path(os.environ["MAXLM_CACHE"])
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maxlm"


def other_builds(built: Path) -> list[Path]:
  """The finished builds beside `built` whose names start as its does up to the first '-'
  (`stdlib-`, `chat-`, `vision-`): other settings, or recipes and tokenizers of older versions
  that no newer run reads again."""
  kind = built.name.split("-", 1)[0] + "-"
  if not built.parent.is_dir():
    return []
  return sorted(path for path in built.parent.iterdir()
                if path.is_dir() and path.name.startswith(kind) and path != built
                and not path.name.endswith(PARTIAL_SUFFIX))


def tree_bytes(path: Path) -> int:
  return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def report_other_builds(built: Path) -> None:
  """Says, while `built` is being built, which builds of its kind the cache already holds and
  their size: nothing removes them, as another config or maxlm version may still read them."""
  others = other_builds(built)
  if others:
    mib = sum(map(tree_bytes, others)) / 2**20
    print(f"the cache also holds {len(others)} other build(s) of this kind ({mib:.1f} MiB), "
          f"which this run does not read; delete those no other config or maxlm version uses: "
          + " ".join(str(path) for path in others), flush=True)


@contextlib.contextmanager
def building(built: Path) -> Iterator[Path]:
  """Yields an empty `<built>.partial` beside `built` for a build to fill. When the body
  returns, it replaces `built` whole; when the body raises or is interrupted, it is removed. So
  `built` is only ever a finished build, and a killed build leaves at most a `.partial` that
  the next one clears."""
  partial = built.with_name(built.name + PARTIAL_SUFFIX)
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    yield partial
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  shutil.rmtree(built, ignore_errors=True)
  os.replace(partial, built)
