"""Mixture-of-experts train step costs against a dense step, measured in one run.

  python benchmarks/moe.py [--json] [--steps 3] [--rounds 3]

Every step is maxlm's real one (`steps.make_train_step` with the pretraining task, its
optimizer and their gin bindings, on one device) over configs/tiny.gin's batch (8 x 256
tokens). Each model, task and optimizer is read from its gin file, so the figures follow them:
  moe_step_vs_dense_same_active  configs/moe_tiny.gin (its shape, dispatch, capacity factor,
                        router losses and routing bias) over configs/tiny.gin: the same active
                        parameters per token (target <= 1.6);
  dropless_step_vs_dense  moe_tiny.gin with the dropless dispatch (jax.lax.ragged_dot);
  dropless_vs_capacity  the dropless step over the capacity step;
  active_params_ratio   MoE active parameters over the dense model's (~1);
  total_params_ratio    MoE total parameters over the dense model's.
Rounds alternate the steps so load from other processes hits all alike; each figure is the
median over rounds of the per-step time. Grouped-matmul TFLOP/s on a GPU is not measured here.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import gin
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from maxlm import optim, sharding, steps, tasks
from maxlm import train as maxlm_train
from maxlm.model import ModelConfig, count_params

BATCH, SEQ_LEN = 8, 256
# name: (gin file, bindings on top)
SHAPES = {"dense": ("tiny.gin", []),
          "dropless": ("moe_tiny.gin", ["ModelConfig.moe_dispatch = 'dropless'"]),
          "capacity": ("moe_tiny.gin", [])}


def random_batch(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, vocab_size, (BATCH, SEQ_LEN), dtype=np.int32),
          "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)),
          "segment_ids": np.ones((BATCH, SEQ_LEN), np.int32)}


def gin_config(gin_file: str, bindings: list[str]) -> ModelConfig:
  """The ModelConfig `gin_file` and `bindings` make (at SEQ_LEN), leaving them parsed for the
  task and optimizer that are built next."""
  gin.clear_config()
  gin.parse_config_files_and_bindings([maxlm_train.resolve_gin_file(gin_file)], bindings)
  # The trainer takes the vocabulary from the tokenizer that the default corpus build trains.
  vocab_size = gin.query_parameter("ensure_default_corpus.vocab_size")
  return dataclasses.replace(ModelConfig(), vocab_size=vocab_size, max_seq_len=SEQ_LEN)


def trainer(config: ModelConfig, batch: dict):
  """`run(steps) -> seconds` of the jitted train step of `config` on one device, with the
  pretraining task and optimizer as the parsed gin config binds them."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10**6, 1e-4, 0))
  graphdef, abstract_state = steps.abstract_model(config)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  train_step = steps.make_train_step(graphdef, tasks.Pretrain().loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh))
  state = steps.init_train_state(config, optimizer, shardings)
  device_batch = jax.device_put(batch, sharding.batch_sharding(mesh))

  def run(num_steps: int) -> float:
    nonlocal state
    started = time.perf_counter()
    with jax.set_mesh(mesh):
      for _ in range(num_steps):
        state, metrics = train_step(state, device_batch)
      jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - started
  return run


def prepared_runs() -> dict[str, tuple[ModelConfig, object]]:
  """For each of SHAPES: its ModelConfig and its trainer's `run`, compiled and warmed up
  under that shape's gin config."""
  runs = {}
  for name, (gin_file, bindings) in SHAPES.items():
    config = gin_config(gin_file, bindings)
    run = trainer(config, random_batch(config.vocab_size))
    run(1)
    runs[name] = config, run
  return runs


def measure(runs: dict, steps_per_round: int, rounds: int) -> dict[str, float]:
  """Median seconds per step of each of `prepared_runs()`."""
  seconds = {name: [] for name in runs}
  for _ in range(rounds):
    for name, (_, run) in runs.items():
      seconds[name].append(run(steps_per_round) / steps_per_round)
  return {name: statistics.median(values) for name, values in seconds.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="also print one JSON object")
  parser.add_argument("--steps", type=int, default=3, help="steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  steps.keep_freed_host_memory()
  runs = prepared_runs()
  step_s = measure(runs, args.steps, args.rounds)
  params = {name: (count_params(config), count_params(config, active=True))
            for name, (config, _) in runs.items()}
  print(f"{'':>9} {'step s':>8} {'params M':>9} {'active M':>9}")
  for name, seconds in step_s.items():
    print(f"{name:>9} {seconds:8.3f} {params[name][0] / 1e6:9.2f} {params[name][1] / 1e6:9.2f}")
  result = {
      "moe_step_vs_dense_same_active": step_s["capacity"] / step_s["dense"],
      "dropless_step_vs_dense": step_s["dropless"] / step_s["dense"],
      "dropless_vs_capacity": step_s["dropless"] / step_s["capacity"],
      "active_params_ratio": params["dropless"][1] / params["dense"][1],
      "total_params_ratio": params["dropless"][0] / params["dense"][0],
      "step_s": step_s, "batch_tokens": BATCH * SEQ_LEN, "device": jax.devices()[0].device_kind,
  }
  print(f"MoE step / dense step (same active params): "
        f"{result['moe_step_vs_dense_same_active']:.3f} (target <= 1.6); dropless / capacity: "
        f"{result['dropless_vs_capacity']:.3f}")
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
