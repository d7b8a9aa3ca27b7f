"""The optimized HLO of `benchmarks/train_step.py`'s maxlm step, without source locations, so
two commits' steps can be compared as programs when their timings are too noisy to.

  cd CHECKOUT_A && python benchmarks/step_hlo.py /tmp/a.hlo
  cd CHECKOUT_B && python benchmarks/step_hlo.py /tmp/b.hlo && cmp /tmp/a.hlo /tmp/b.hlo

Identical files mean XLA compiled the same program: any step-time difference is the machine's.
"""

import re
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as bench  # noqa: E402
from maxlm import optim, sharding, steps, tasks  # noqa: E402

SOURCE_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def compiled_step_text() -> str:
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10**6, bench.LEARNING_RATE, 0))
  graphdef, abstract_state = steps.abstract_model(bench.CONFIG)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh))
  state = steps.abstract_train_state(abstract_state, optimizer, shardings)
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), bench.random_batch())
  with jax.set_mesh(mesh):
    return train_step.lower(state, batch).compile().as_text()


def without_source_locations(hlo: str) -> str:
  """The HLO module only: no file/function/stack tables, no metadata, one jit name."""
  lines = hlo.splitlines()
  lines = lines[next(i for i, line in enumerate(lines) if line.startswith("HloModule")):]
  kept, in_table = [], False
  for line in lines:
    if line in SOURCE_TABLES:
      in_table = True
    elif not (in_table and (re.match(r"^\d+ ", line) or not line.strip())):
      in_table = False
      line = re.sub(r", metadata=\{[^}]*\}|, stack_frame_id=\d+", "", line)
      kept.append(re.sub(r"jit_[A-Za-z_<>]+", "jit_step", line))
  return "\n".join(kept) + "\n"


if __name__ == "__main__":
  text = without_source_locations(compiled_step_text())
  Path(sys.argv[1]).write_text(text)
  print(f"{len(text.splitlines())} HLO lines -> {sys.argv[1]}")
