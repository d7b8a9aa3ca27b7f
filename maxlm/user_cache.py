"""Where maxlm keeps what it builds once per machine: the prepared default datasets and the
compiled programs. Free of Beam and JAX, so a server finds its cache without importing them."""

import os
from pathlib import Path


def cache_root() -> Path:
  """`$MAXLM_CACHE`, else `$XDG_CACHE_HOME/maxlm`, else `~/.cache/maxlm`."""
  if os.environ.get("MAXLM_CACHE"):
    return Path(os.environ["MAXLM_CACHE"])
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maxlm"
