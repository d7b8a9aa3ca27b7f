"""Training throughput of maxlm's train step against Hugging Face `LlamaForCausalLM` (PyTorch),
both on this machine's CPU in the same run, plus MFU against a float32 matmul measured here.

  python benchmarks/train_step.py [--json] [--steps 3] [--rounds 3]

Both sides train the same Llama shapes (d_model 512, 8 layers, 8 query and 8 KV heads of 64,
SwiGLU 1376, vocabulary 8192, untied embeddings, float32) on the same random batch of 8 x 512
tokens with AdamW and global-norm clipping. The maxlm side is the real training path
(`steps.make_train_step` with `tasks.next_token_loss`). Rounds alternate JAX, PyTorch, matmul
so that load from other processes hits all three alike; each figure is the median over rounds
of the per-step time in that round. The `cpu_*` fields divide by each side's process CPU
seconds instead of wall seconds: when other processes share the cores, they still compare the
work each side needs (threads that spin while waiting count as work). PyTorch trains in a
child process (see `torch_trainer`). Without torch and transformers (`pip install -e
.[bench]`) the torch fields are null.
"""

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from maxlm import optim, sharding, steps, tasks  # noqa: E402
from maxlm.model import ModelConfig, count_params, training_flops_per_token  # noqa: E402

CONFIG = ModelConfig(vocab_size=8192, num_layers=8, embed_dim=512, num_heads=8, num_kv_heads=8,
                     head_dim=64, mlp_dim=1376, max_seq_len=512, norm_eps=1e-5,
                     dtype="float32")
BATCH, SEQ_LEN = 8, 512
PEAK_MATMUL = 4096
LEARNING_RATE = 1e-4


def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, CONFIG.vocab_size, (BATCH, SEQ_LEN), dtype=np.int32),
          "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)),
          "segment_ids": np.ones((BATCH, SEQ_LEN), np.int32)}


def one_device_step(config: ModelConfig, batch: dict[str, np.ndarray],
                    learning_rate: float = LEARNING_RATE):
  """`step() -> metrics`: maxlm's jitted train step (next-token loss, AdamW) on the first
  device, over `batch` each time, its state kept between calls."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10**6, learning_rate, 0))
  graphdef, abstract_state = steps.abstract_model(config)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                     sharding.batch_sharding(mesh))
  state = steps.init_train_state(config, optimizer, shardings)
  device_batch = jax.device_put(batch, sharding.batch_sharding(mesh))

  def step() -> dict:
    nonlocal state
    with jax.set_mesh(mesh):
      state, metrics = train_step(state, device_batch)
    return metrics
  return step


def jax_trainer(batch: dict[str, np.ndarray]):
  """`run(steps) -> seconds` for maxlm's jitted train step on one device."""
  steps.keep_freed_host_memory()  # before the CPU client starts; see its docstring
  step = one_device_step(CONFIG, batch)

  def run(num_steps: int) -> float:
    started = time.perf_counter()
    for _ in range(num_steps):
      metrics = step()
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - started
  return run


def _torch_training(batch: dict[str, np.ndarray]):
  """`run(steps) -> seconds` for LlamaForCausalLM with the same shapes, or None without torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.embed_dim,
      intermediate_size=CONFIG.mlp_dim, num_hidden_layers=CONFIG.num_layers,
      num_attention_heads=CONFIG.num_heads, num_key_value_heads=CONFIG.num_kv_heads,
      head_dim=CONFIG.head_dim, max_position_embeddings=SEQ_LEN, rms_norm_eps=CONFIG.norm_eps,
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
  model = transformers.LlamaForCausalLM(config).to(torch.float32).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95),
                                weight_decay=0.1)
  tokens = torch.from_numpy(batch["tokens"].astype(np.int64))

  def run(num_steps: int) -> float:
    started = time.perf_counter()
    for _ in range(num_steps):
      loss = model(input_ids=tokens, labels=tokens).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started
  return run


def _torch_worker(connection):
  """Serves `steps -> (wall seconds, CPU seconds)` until the parent closes the pipe; sends
  False first if torch is missing. Both sides run under the same allocator policy: PyTorch's
  large tensors are spared their page faults too."""
  steps.keep_freed_host_memory()
  run = _torch_training(random_batch())
  connection.send(run is not None)
  while run is not None:
    try:
      num_steps = connection.recv()
    except EOFError:
      return
    cpu_started = process_cpu_seconds()
    connection.send((run(num_steps), process_cpu_seconds() - cpu_started))


def child_timer(worker, *args):
  """`run(steps) -> (wall s, CPU s)` served by `worker(connection, *args)` in a spawned child.
  The worker first sends whether it can run (False: its libraries are missing; then None).

  Baselines train in a child: run in this process, PyTorch's heap use leaves maxlm's next steps
  ~25% slower (page faults), which would bias the comparison.
  """
  context = multiprocessing.get_context("spawn")
  ours, theirs = context.Pipe()
  process = context.Process(target=worker, args=(theirs, *args), daemon=True)
  process.start()
  theirs.close()  # so that a child's death ends our recv() with EOFError
  if not ours.recv():
    process.join()
    return None

  def run(num_steps: int) -> tuple[float, float]:
    ours.send(num_steps)
    return ours.recv()
  return run


def torch_trainer():
  """`run(steps) -> (wall s, CPU s)` of the PyTorch baseline, or None without torch."""
  return child_timer(_torch_worker)


def matmul_timer(size: int = PEAK_MATMUL):
  """`run(repeats) -> seconds` for a jitted float32 [size, size] @ [size, size]."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)

  def run(repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
      out = matmul(a, b)
    jax.block_until_ready(out)
    return time.perf_counter() - started
  return run


def process_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _in_this_process(run):
  """Wraps `run(steps) -> wall s` as `run(steps) -> (wall s, CPU s)`."""
  def timed(num_steps: int) -> tuple[float, float]:
    cpu_started = process_cpu_seconds()
    return run(num_steps), process_cpu_seconds() - cpu_started
  return timed


def measure(steps_per_round: int, rounds: int, warmup: int) -> tuple[dict, dict, dict]:
  """Median (wall seconds, CPU seconds) per step or matmul, and the per-round wall seconds."""
  runners = {"jax": _in_this_process(jax_trainer(random_batch())), "torch": torch_trainer(),
             "matmul": _in_this_process(matmul_timer())}
  runners = {name: run for name, run in runners.items() if run is not None}
  repeats = {"jax": steps_per_round, "torch": steps_per_round, "matmul": 4 * steps_per_round}
  for run in runners.values():
    run(warmup)  # compilation, allocator and thread-pool warm-up: not timed
  wall = {name: [] for name in runners}
  cpu = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      wall_s, cpu_s = run(repeats[name])
      wall[name].append(wall_s / repeats[name])
      cpu[name].append(cpu_s / repeats[name])
  median = lambda times: {name: statistics.median(t) for name, t in times.items()}  # noqa: E731
  return median(wall), median(cpu), {name: [round(t, 3) for t in times]
                                     for name, times in wall.items()}


def summarize(seconds: dict, cpu_seconds: dict, by_round: dict) -> dict:
  tokens = BATCH * SEQ_LEN
  model_flops = training_flops_per_token(CONFIG, SEQ_LEN) * tokens
  peak = 2 * PEAK_MATMUL ** 3 / seconds["matmul"]
  cpu_peak = 2 * PEAK_MATMUL ** 3 / cpu_seconds["matmul"]
  result = {
      "params": count_params(CONFIG), "batch": BATCH, "seq_len": SEQ_LEN,
      "step_s": seconds["jax"], "tokens_per_s": tokens / seconds["jax"],
      "model_flops_per_step": model_flops, "model_flops_per_s": model_flops / seconds["jax"],
      "peak_flops_per_s": peak, "mfu": model_flops / seconds["jax"] / peak,
      "torch_step_s": None, "torch_tokens_per_s": None, "torch_mfu": None,
      "ratio_vs_torch": None,
      "cpu_step_s": cpu_seconds["jax"], "cpu_mfu": model_flops / cpu_seconds["jax"] / cpu_peak,
      "torch_cpu_step_s": None, "torch_cpu_mfu": None, "cpu_ratio_vs_torch": None,
      "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "per_step_s_by_round": by_round}
  if "torch" in seconds:
    result |= {"torch_step_s": seconds["torch"], "torch_tokens_per_s": tokens / seconds["torch"],
               "torch_mfu": model_flops / seconds["torch"] / peak,
               "ratio_vs_torch": seconds["torch"] / seconds["jax"],
               "torch_cpu_step_s": cpu_seconds["torch"],
               "torch_cpu_mfu": model_flops / cpu_seconds["torch"] / cpu_peak,
               "cpu_ratio_vs_torch": cpu_seconds["torch"] / cpu_seconds["jax"]}
  return result


def print_table(result: dict):
  print(f"Llama {CONFIG.num_layers}x{CONFIG.embed_dim}, {result['params'] / 1e6:.1f}M params, "
        f"batch {BATCH} x {SEQ_LEN} tokens, float32, {result['device']}")
  print(f"{'':>8} {'step s':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU':>6} {'CPU s':>8} "
        f"{'CPU MFU':>8}")
  rows = [("maxlm", result["step_s"], result["mfu"], result["cpu_step_s"], result["cpu_mfu"])]
  if result["torch_step_s"] is not None:
    rows.append(("torch", result["torch_step_s"], result["torch_mfu"],
                 result["torch_cpu_step_s"], result["torch_cpu_mfu"]))
  for name, step_s, mfu, cpu_s, cpu_mfu in rows:
    flops = result["model_flops_per_step"] / step_s
    print(f"{name:>8} {step_s:8.3f} {BATCH * SEQ_LEN / step_s:10.0f} {flops / 1e9:9.1f} "
          f"{mfu:6.3f} {cpu_s:8.3f} {cpu_mfu:8.3f}")
  print(f"{'matmul':>8} {'':>8} {'':>10} {result['peak_flops_per_s'] / 1e9:9.1f} "
        f"{1.0:6.3f}  (float32 {PEAK_MATMUL}x{PEAK_MATMUL}, the MFU denominator)")
  if result["ratio_vs_torch"] is not None:
    print(f"maxlm / torch tokens per second: {result['ratio_vs_torch']:.3f} "
          f"(per CPU second: {result['cpu_ratio_vs_torch']:.3f})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="also print one JSON object")
  parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  args = parser.parse_args()
  result = summarize(*measure(args.steps, args.rounds, args.warmup))
  print_table(result)
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
