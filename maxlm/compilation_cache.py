"""JAX's persistent compilation cache, on by default for the entry points that compile.

A server compiles every prefill and decode shape before it answers (minutes on CPU), and a
training run its step; restarted on the same machine (a new checkpoint, a preemption), each
reads what it compiled last time from here instead. The key is XLA's own (the program, the
backend, the compile options), so a changed model or flag compiles afresh.
"""

import os
from pathlib import Path

import jax

from maxlm import user_cache
from maxlm.errors import UserError

ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own variable: when set, it wins


def default_dir() -> str:
  """`$MAXLM_CACHE/xla` (by default `~/.cache/maxlm/xla`), or JAX's variable when set."""
  return os.environ.get(ENV) or str(user_cache.cache_root() / "xla")


def enable(directory: str | None) -> str | None:
  """Keeps every compiled program under `directory` (an empty value or None turns the cache
  off); returns the directory in use."""
  if not directory:
    return None
  try:
    Path(directory).mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise UserError(f"--compilation_cache_dir {directory} cannot be made a directory "
                    f"({error.strerror or error}); pass another, or an empty value for no "
                    "cache") from None
  jax.config.update("jax_compilation_cache_dir", str(directory))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # On CPU most programs compile in under JAX's default second; a server has dozens of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return str(directory)
