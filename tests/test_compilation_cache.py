"""maxlm.compilation_cache: a second process reads what the first compiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from maxlm import (
  compilation_cache,
  evaluate,
  train,  # noqa: F401  (defines its absl flags)
)
from maxlm.errors import UserError
from serving import server

REPO_ROOT = Path(__file__).resolve().parents[1]
# Compiles a few programs after `enable(argv[1])`; prints how often JAX's persistent cache
# hit and missed.
COMPILE_ONCE = """
import collections, json, sys
import jax, jax.numpy as jnp
from jax._src import monitoring
from maxlm import compilation_cache
events = collections.Counter()
monitoring.register_event_listener(lambda event, **kw: events.update([event.split("/")[-1]]))
compilation_cache.enable(sys.argv[1])
out = float(jax.jit(lambda x: jnp.tanh(x) @ x)(jnp.eye(8)).sum())
print(json.dumps({"out": out, "hits": events["cache_hits"], "misses": events["cache_misses"]}))
"""


def compile_once(directory: str, tmp_path: Path) -> dict:
  env = {name: value for name, value in os.environ.items()
         if not name.startswith("JAX_PERSISTENT_CACHE") and name != compilation_cache.ENV}
  env["MAXLM_CACHE"] = str(tmp_path / "maxlm_cache")
  result = subprocess.run([sys.executable, "-c", COMPILE_ONCE, directory], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  return json.loads(result.stdout.splitlines()[-1])


def test_a_second_process_reads_the_program_the_first_compiled(tmp_path):
  directory = tmp_path / "xla"
  first = compile_once(str(directory), tmp_path)
  assert first["hits"] == 0 and first["misses"] > 0 and any(directory.iterdir())
  second = compile_once(str(directory), tmp_path)
  assert second == {**first, "hits": first["misses"], "misses": 0}


def test_an_empty_directory_turns_the_cache_off(tmp_path):
  run = compile_once("", tmp_path)
  assert run["hits"] == run["misses"] == 0  # no cache was consulted
  assert not (tmp_path / "maxlm_cache").exists()


def test_a_cache_dir_that_cannot_be_made_is_one_line_naming_the_flag(tmp_path):
  blocking = tmp_path / "a_file"
  blocking.write_text("")
  with pytest.raises(UserError, match=f"--compilation_cache_dir {blocking}/xla cannot be made"):
    compilation_cache.enable(str(blocking / "xla"))


def test_the_default_lives_in_the_maxlm_cache_unless_jax_names_one(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv("MAXLM_CACHE", str(tmp_path))
  assert compilation_cache.default_dir() == str(tmp_path / "xla")
  monkeypatch.setenv(compilation_cache.ENV, "/elsewhere")
  assert compilation_cache.default_dir() == "/elsewhere"


def test_server_train_and_evaluate_take_the_flag(monkeypatch, tmp_path):
  monkeypatch.setenv(compilation_cache.ENV, str(tmp_path))
  assert server.parse_args(["--checkpoint_dir=x"]).compilation_cache_dir is not None
  assert server.parse_args(["--checkpoint_dir=x", "--compilation_cache_dir="]
                           ).compilation_cache_dir == ""
  assert evaluate.parse_args(["--checkpoint_dir=x", "--tasks=t", "--compilation_cache_dir=d"]
                             ).compilation_cache_dir == "d"
  assert "compilation_cache_dir" in flags.FLAGS


def test_the_server_the_evaluator_and_the_trainer_start_without_importing_beam():
  """Only the data stages need Apache Beam (the trainer's default builders import it when they
  build): importing it costs each start about 2 s and prints a warning about BigQuery's client
  libraries."""
  for module in ("serving.server", "maxlm.evaluate", "maxlm.train"):
    loaded = subprocess.run([sys.executable, "-c", f"import sys, {module}; "
                             "print(sorted(m for m in sys.modules if m.startswith('apache_beam')))"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", (module, loaded.stdout[-300:])
