"""The embedded default corpus: the installed Python's standard library sources plus its
`pydoc_data` topics, run through `beam_pipelines.prepare_text` once into a cache directory.

Real text already on every machine with Python, so `python -m maxlm.train` trains on
something meaningful with no flags and no download.
"""

import json
import sys
import sysconfig
import time
from pathlib import Path

import gin

from beam_pipelines.records import MANIFEST_NAME
from maxlm import user_cache

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib",
                 "lib2to3", "turtledemo", "ensurepip", "config-3", "encodings"}  # encodings/: generated codec tables


def stdlib_source_globs() -> list[str]:
  """One glob per top-level stdlib package (skipping third-party and test trees)."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  globs = [str(stdlib / "*.py")]
  for child in sorted(stdlib.iterdir()):
    if child.is_dir() and not any(child.name.startswith(s) for s in _SKIPPED_DIRS):
      if next(child.rglob("*.py"), None) is not None:
        globs.append(str(child / "**" / "*.py"))
  return globs


def write_pydoc_topics(path: Path) -> Path:
  """The interpreter's help topics (`pydoc_data.topics`) as JSONL, one topic a document."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  with open(path, "w", encoding="utf-8") as out:
    for name, text in sorted(topics.topics.items()):
      out.write(json.dumps({"text": text, "topic": name}) + "\n")
  return path


RECIPE = 5  # bumped whenever the pipeline's defaults change what the corpus holds


@gin.configurable(module="maxlm")
def ensure_default_corpus(vocab_size: int = 4096, seq_len: int = 256,
                          validation_fraction: float = 0.03,
                          cache_dir: str | None = None) -> str:
  """Returns the data dir of the stdlib corpus, building it first if it is not cached."""
  version = f"py{sys.version_info.major}.{sys.version_info.minor}"
  root = Path(cache_dir) if cache_dir else user_cache.cache_root()
  data_dir = root / f"stdlib-{version}-v{vocab_size}-s{seq_len}-h{validation_fraction:g}-r{RECIPE}"
  if (data_dir / MANIFEST_NAME).exists():
    return str(data_dir)
  print(f"no data configured: building the Python {version} standard library corpus into "
        f"{data_dir} (once)", flush=True)
  from beam_pipelines import prepare_text  # noqa: PLC0415 - Beam costs a trainer ~2 s to import;
  from beam_pipelines.sources import Source  # noqa: PLC0415 - only a first run builds
  user_cache.report_other_builds(data_dir)
  topics = write_pydoc_topics(root / f"pydoc-topics-{version}.jsonl")
  started = time.perf_counter()
  # One source with the code profile: language ID and prose heuristics would drop source code.
  stdlib = Source("stdlib", tuple(stdlib_source_globs() + [str(topics)]), profile="code")
  with user_cache.building(data_dir) as partial:
    manifest = prepare_text.run([stdlib], str(partial),
                                vocab_size=vocab_size, seq_len=seq_len,
                                validation_fraction=validation_fraction)
  splits = manifest["splits"]
  print(f"corpus ready in {time.perf_counter() - started:.0f}s: " + ", ".join(
      f"{name} {s['documents']:,} documents / {s['tokens']:,} tokens / {s['sequences']:,} "
      f"sequences" for name, s in splits.items()) +
        f"; unigram entropy {manifest['unigram_entropy_nats']:.3f} nats/token", flush=True)
  return str(data_dir)
