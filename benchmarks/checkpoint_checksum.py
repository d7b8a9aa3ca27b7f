"""What `train.verify_checkpoints` costs: a checkpoint's save and restore with and without the
per-array checksums, at the tiny and 125m shapes.

  python benchmarks/checkpoint_checksum.py [--shapes tiny 125m] [--rounds 3] [--json]

Each round saves (start and wait) and restores a random-init TrainState (params and Adam
moments, float32) on an FSDP mesh over all devices, once with verification and once without,
alternating so that load from other processes hits both alike; figures are medians over rounds.
`digest_s` is the checksum pass alone (compiled), `compile_s` its first call. Set
XLA_FLAGS=--xla_force_host_platform_device_count=8 to shard over 8 CPU devices.
"""

import argparse
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gin
import grain
import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from maxlm import array_digest, checkpoint, optim, sharding, steps
from maxlm.model import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_VOCAB = 4096  # tiny.gin leaves it to the data's tokenizer; the default corpus has 4096


def model_config(shape: str) -> ModelConfig:
  gin.clear_config()
  gin.parse_config_file(str(CONFIGS / f"{shape}.gin"), skip_unknown=True)
  config = ModelConfig()
  gin.clear_config()
  return config if config.vocab_size else ModelConfig(**{**config.__dict__,
                                                         "vocab_size": TINY_VOCAB})


def timed(fn) -> float:
  started = time.perf_counter()
  fn()
  return time.perf_counter() - started


def save(saver, state, iterator):
  saver.save(1, state, grain.checkpoint.CheckpointSave(iterator), {}, force=True)
  saver.wait()


def restore(saver, target, iterator):
  jax.block_until_ready(saver.restore(1, target, grain.checkpoint.CheckpointRestore(iterator)))


def measure(shape: str, rounds: int, workdir: Path) -> dict:
  config = model_config(shape)
  mesh = sharding.make_mesh(1, jax.device_count(), 1)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10))
  _, abstract_state = steps.abstract_model(config)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  state = steps.init_train_state(config, optimizer, shardings)
  target = steps.abstract_train_state(abstract_state, optimizer, shardings)
  compile_s = timed(lambda: array_digest.digests(state))
  times = {key: [] for key in ("save_s", "save_verified_s", "restore_s", "restore_verified_s",
                               "digest_s")}
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  for round_ in range(rounds):
    for verify in (False, True):
      saver = checkpoint.Checkpointer(workdir / f"{shape}-{round_}-{verify}", save_every=1,
                                      verify=verify)
      suffix = "_verified_s" if verify else "_s"
      times["save" + suffix].append(timed(functools.partial(save, saver, state, iterator)))
      times["restore" + suffix].append(timed(functools.partial(restore, saver, target,
                                                               iterator)))
      saver.close()
      shutil.rmtree(workdir / f"{shape}-{round_}-{verify}")
    times["digest_s"].append(timed(lambda: array_digest.digests(state)))
  medians = {key: statistics.median(values) for key, values in times.items()}
  params = sum(x.size for x in jax.tree.leaves(state.params))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return {"shape": shape, "params": params, "state_mib": state_bytes / 2**20,
          "compile_s": compile_s, **medians,
          "save_ratio": medians["save_verified_s"] / medians["save_s"],
          "restore_ratio": medians["restore_verified_s"] / medians["restore_s"]}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=["tiny", "125m"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as workdir:
    results = [measure(shape, args.rounds, Path(workdir)) for shape in args.shapes]
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, medians of {args.rounds} "
        "rounds (seconds)")
  print(f"{'shape':>6} {'params':>12} {'state MiB':>9} {'save':>7} {'+verify':>7} {'restore':>7} "
        f"{'+verify':>7} {'digest':>7} {'compile':>7} {'save x':>6} {'restore x':>9}")
  for r in results:
    print(f"{r['shape']:>6} {r['params']:>12,} {r['state_mib']:>9.0f} {r['save_s']:>7.2f} "
          f"{r['save_verified_s']:>7.2f} {r['restore_s']:>7.2f} {r['restore_verified_s']:>7.2f} "
          f"{r['digest_s']:>7.2f} {r['compile_s']:>7.2f} {r['save_ratio']:>6.2f} "
          f"{r['restore_ratio']:>9.2f}")
  if args.json:
    print(json.dumps({r["shape"]: {key: round(r[key], 3) for key in (
        "save_ratio", "restore_ratio", "digest_s", "save_s", "restore_s")} for r in results}))
  return results


if __name__ == "__main__":
  main()
