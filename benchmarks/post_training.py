"""Post-training step costs against pretraining's, measured in one run.

  python benchmarks/post_training.py [--json] [--steps 3] [--rounds 3] [--shape tiny|125m]

Every step is maxlm's real one (`steps.make_train_step` with the task's loss, on one device):
  sft_vs_pretrain_step  an SFT step over the same [batch, seq] tokens as a pretraining step;
  dpo_vs_sft_step       a DPO step over 2 B pairs of [prompt, reply] conversations (seq / 4
                        tokens each, half prompt; packed by `chat_examples` with each prompt
                        once, so B * seq * 3 / 4 tokens, plus the reference model's forward in
                        `prepare_batch`) over an SFT step over the 2 B rows those conversations
                        fill unshared;
  lora_step_vs_full     a rank-8 LoRA step (adapters trained, the base a frozen argument) over
                        a full fine-tuning step of the same model;
  lora_optimizer_bytes_fraction  Adam's state for rank-8 adapters over full fine-tuning's, on
                        configs/125m.gin's shape (counted from shapes, nothing allocated).
Rounds alternate the steps so load from other processes hits all alike; each figure is the
median over rounds of the per-step time.
  ratio_vs_trl          Hugging Face TRL's DPOTrainer (PyTorch, in a child process; see
                        `trl_dpo.py`) on the same model, parameters, pairs and beta, its
                        reference forward inside each step, over maxlm's DPO step: TRL s/step
                        / maxlm s/step. Null without trl (`pip install -e .[bench]`).
Targets (issue 12): sft_vs_pretrain_step <= 1.05, dpo_vs_sft_step <= 2.2, lora_step_vs_full
<= 1.0, lora_optimizer_bytes_fraction <= 0.02, ratio_vs_trl >= 1.5.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from beam_pipelines import chat_examples  # noqa: E402
from benchmarks import trl_dpo  # noqa: E402
from maxlm import optim, post_training, sharding, steps, tasks  # noqa: E402
from maxlm.model import ModelConfig  # noqa: E402

SHAPES = {
    "tiny": ModelConfig(vocab_size=4096, num_layers=4, embed_dim=192, num_heads=3,
                        num_kv_heads=1, head_dim=64, mlp_dim=512, max_seq_len=256),
    "125m": ModelConfig(vocab_size=32000, num_layers=12, embed_dim=768, num_heads=12,  # 125m.gin
                        num_kv_heads=12, head_dim=64, mlp_dim=2048, max_seq_len=2048,
                        tie_embeddings=True),
}
LORA_RANK = 8
LEARNING_RATE = 1e-4


def packed_rows(rng, rows: int, seq: int, vocab: int, documents: int = 4) -> dict:
  """Rows of `documents` equal segments each, with a loss mask on each segment's second half."""
  length = seq // documents
  segment_ids = np.repeat(np.arange(1, documents + 1), length)[None].repeat(rows, 0)
  positions = np.tile(np.arange(length), documents)[None].repeat(rows, 0)
  loss_mask = (positions >= length // 2).astype(np.int32)
  return {"tokens": rng.integers(4, vocab, (rows, seq)).astype(np.int32),
          "segment_ids": segment_ids.astype(np.int32),
          "positions": positions.astype(np.int32), "loss_mask": loss_mask}


def preference_pairs(rng, count: int, length: int, vocab: int) -> list[dict[str, list[int]]]:
  """`count` {prompt, chosen, rejected} id lists, `length` // 2 ids each; the replies differ
  from their first id, so each pair shares exactly its prompt."""
  ids = lambda: rng.integers(4, vocab, length // 2).tolist()  # noqa: E731
  pairs = [{"prompt": ids(), "chosen": ids(), "rejected": ids()} for _ in range(count)]
  for pair in pairs:
    if pair["rejected"][0] == pair["chosen"][0]:
      pair["rejected"][0] = 4 + (pair["chosen"][0] - 3) % (vocab - 4)
  return pairs


def preference_rows(pairs: list[dict[str, list[int]]], pairs_per_row: int) -> dict:
  """The pairs packed as `prepare_chat` packs them (each prompt once, then both replies;
  loss_mask 1 on the replies), `pairs_per_row` to a row that they fill exactly."""
  def half(pair, reply):
    return chat_examples.Tokenized(np.array(pair["prompt"] + pair[reply], np.int32),
                                   np.array([0] * len(pair["prompt"]) + [1] * len(pair[reply]),
                                            np.int32))
  examples = [chat_examples.shared_example(half(p, "chosen"), half(p, "rejected")) for p in pairs]
  seq_len = len(examples[0].tokens) * pairs_per_row
  rows = [chat_examples.record_arrays(row, chat_examples.PREFERENCE)
          for row in chat_examples.pack(examples, seq_len, open_rows=1)]
  return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


class Stepper:
  """One task's compiled step on one device, and its state."""

  def __init__(self, config: ModelConfig, task, trainable: str | None = None):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(optim.learning_rate_schedule(1000, LEARNING_RATE, 10))
    graphdef, abstract_state = steps.abstract_model(config)
    shardings = steps.state_shardings(abstract_state, optimizer, mesh, trainable)
    param_shardings = sharding.param_shardings(abstract_state, mesh)
    frozen_shardings = steps.frozen_shardings(abstract_state, mesh, trainable) if trainable else None
    params = steps.init_params(config, param_shardings)
    self.initial_params = params
    trained, self.frozen = steps.split_trainable(params, trainable)
    self.state = steps.train_state_from_params(trained, optimizer, shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    self.task = task.bind(tasks.TaskContext(graphdef, param_shardings, batch_sharding, mesh,
                                            reference_params=lambda: params))
    self.step = steps.make_train_step(graphdef, self.task.loss, optimizer, shardings,
                                      batch_sharding, frozen_shardings=frozen_shardings)
    self.frozen_args = (self.frozen,) if trainable else ()
    self.mesh = mesh

  def run(self, batch: dict, count: int) -> float:
    """Seconds per step over `count` steps, each ended by fetching its loss."""
    with jax.set_mesh(self.mesh):
      started = time.perf_counter()
      for _ in range(count):
        prepared = self.task.prepare_batch(batch)
        self.state, metrics = self.step(self.state, prepared, *self.frozen_args)
        float(metrics["loss"])
    return (time.perf_counter() - started) / count

  def optimizer_bytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.state.opt_state))


def optimizer_bytes_fraction(config: ModelConfig) -> float:
  """Adam's state bytes for rank-8 adapters over full fine-tuning's, from shapes alone."""
  def adam_bytes(model_config, trainable):
    _, abstract_state = steps.abstract_model(model_config)
    trained, _ = steps.split_trainable(nnx.to_pure_dict(abstract_state), trainable)
    opt_state = jax.eval_shape(optax.adamw(1e-4).init, trained)
    return sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
  lora = dataclasses.replace(config, lora_rank=LORA_RANK)
  return float(adam_bytes(lora, ".*lora.*") / adam_bytes(config, None))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
  parser.add_argument("--batch", type=int, default=8, help="rows of a pretraining/SFT step")
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
  parser.add_argument("--pairs_per_row", type=int, default=2,
                      help="preference pairs packed to a DPO row")
  args = parser.parse_args(argv)
  steps.keep_freed_host_memory()  # the allocator policy TRL's child runs under too
  config = dataclasses.replace(SHAPES[args.shape], max_seq_len=max(args.seq_len, 256))
  rng = np.random.default_rng(0)
  text = packed_rows(rng, args.batch, args.seq_len, config.vocab_size)
  documents = 4  # packed_rows'
  examples = preference_pairs(rng, args.batch // 2 * documents, args.seq_len // documents,
                              config.vocab_size)
  pairs = preference_rows(examples, args.pairs_per_row)
  lora_config = dataclasses.replace(config, lora_rank=LORA_RANK)
  runs = {
      "pretrain": (Stepper(config, tasks.Pretrain()), text),
      "sft": (Stepper(config, post_training.SFT()), text),
      "dpo": (Stepper(config, post_training.DPO()), pairs),
      "full_finetune": (Stepper(lora_config, post_training.SFT()), text),
      "lora": (Stepper(lora_config, post_training.SFT(), trainable=".*lora.*"), text),
  }
  timers = {name: functools.partial(stepper.run, batch) for name, (stepper, batch) in runs.items()}
  dpo, total_steps = runs["dpo"][0], args.warmup + args.rounds * args.steps
  trl_run = trl_dpo.trl_dpo_timer(jax.tree.map(np.asarray, dpo.initial_params), config,
                                  examples, dpo.task.beta, LEARNING_RATE, total_steps)
  if trl_run is not None:
    timers["trl_dpo"] = lambda count: trl_run(count)[0] / count
  for run in timers.values():
    run(args.warmup)
  times = {name: [] for name in timers}
  for _ in range(args.rounds):
    for name, run in timers.items():
      times[name].append(run(args.steps))
  median = {name: statistics.median(values) for name, values in times.items()}
  result = {
      "shape": args.shape, "batch": args.batch, "seq_len": args.seq_len,
      "dpo_rows": list(pairs["tokens"].shape),
      "seconds_per_step": median,
      "sft_vs_pretrain_step": median["sft"] / median["pretrain"],
      "dpo_vs_sft_step": median["dpo"] / median["sft"],
      "lora_step_vs_full": median["lora"] / median["full_finetune"],
      "lora_optimizer_bytes_fraction": optimizer_bytes_fraction(SHAPES["125m"]),
      "lora_optimizer_bytes_fraction_this_shape": (runs["lora"][0].optimizer_bytes()
                                                   / runs["full_finetune"][0].optimizer_bytes()),
      "ratio_vs_trl": median["trl_dpo"] / median["dpo"] if trl_run else None,
  }
  print(f"{'step':<14} {'s/step (median)':>16}   rounds")
  for name, values in times.items():
    print(f"{name:<14} {median[name]:>16.4f}   " + " ".join(f"{v:.4f}" for v in values))
  for key in ("sft_vs_pretrain_step", "dpo_vs_sft_step", "lora_step_vs_full",
              "lora_optimizer_bytes_fraction", "ratio_vs_trl"):
    print(f"{key:<32} " + (f"{result[key]:.3f}" if result[key] is not None else
                           "null: trl is not installed (pip install -e .[bench])"))
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
