"""Images through the serving engine, and the ViT against timm's, in one run.

  python benchmarks/vision.py [--run_dir=runs/vision_tiny_sft] [--json] [--slots=8]
      [--max_tokens=32] [--rounds=15] [--vit_rounds=7] [--vit_seconds=2]

On the run's engine, in process (no HTTP, so only the engine and the batching are timed):
  - `image_prefill_ms`: one image prompt's prefill (ViT, projector, decoder), median, beside
    `text_prefill_ms`, the text prefill of a prompt as long;
  - `text_only_slowdown`: 1 - (a text request's tokens/s while half the slots decode image
    requests) / (its tokens/s while every slot decodes text): the same load, --slots requests
    at once, each making --max_tokens tokens (`ignore_eos`); medians over --rounds rounds,
    after one untimed round of each (a round takes about 0.1 s: with 3 rounds, two runs on
    the shared 2-core machine read -0.11 and 0.11, hence 15);
  - `vit_ratio_vs_timm`: the run's ViT forward+backward images/s over timm's
    VisionTransformer of the same shape and the same FLOPs per image (PyTorch, CPU), or null
    when timm is not importable by --timm_python (default this interpreter; PyTorch may live in
    another virtualenv). Our SwiGLU MLP has three matrices where timm's GELU MLP has two, so
    timm's MLP is widened (`timm_mlp_dim`) until its matmul FLOPs per image equal ours
    (`vit_flops_per_image`, printed for both): the ratio is images/s at equal FLOPs. The two
    run in --vit_rounds alternating rounds of --vit_seconds, both warm (timm in a process of
    its own that waits between rounds); the ratio is the median of the rounds' ratios, the
    images/s the medians of each side's rounds;
  - `matmul_ratio_vs_torch`: what that ratio is read against, XLA's float32 matmul GFLOP/s
    over PyTorch's on our ViT's own forward matmul shapes (q/k/v, output, gate/up, down over
    the batch's patches), a geometric mean over the shapes, the median of 3 alternating
    rounds; `matmul_gflops` has each shape's rates. Most of a step is these matmuls, so a ViT
    ratio above this one is what our ViT gains beyond the backend's matmuls.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import machine_load
from maxlm.model import vit
from serving.chat import IMAGE_TOKEN, chat_prompt
from serving.engine import Engine, SamplingSettings
from serving.orchestrator import Orchestrator

QUESTION = "What shape and color?"
VIT_BATCH = 64
MATMUL_ROUNDS = 3

TIMM_SCRIPT = """
import json, sys, time, torch, timm
shape, batch = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
model = timm.models.vision_transformer.VisionTransformer(
    img_size=shape["image_size"], patch_size=shape["patch_size"], embed_dim=shape["embed_dim"],
    depth=shape["num_layers"], num_heads=shape["num_heads"],
    mlp_ratio=(shape["mlp_dim"] + 0.5) / shape["embed_dim"], num_classes=0, global_pool="",
    class_token=False)
images = torch.rand(batch, 3, shape["image_size"], shape["image_size"])
def step():
  model.zero_grad(set_to_none=True)
  model(images).float().square().mean().backward()
for _ in range(3):
  step()
print("ready", flush=True)
def matmul_gflops(m, k, n, seconds=0.2):
  a, b = torch.rand(m, k), torch.rand(k, n)
  a @ b
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    a @ b
    count += 1
  return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9
for line in sys.stdin:  # a round's seconds, or "matmuls SHAPES_JSON"
  if line.startswith("matmuls "):
    print(json.dumps([matmul_gflops(*shape) for shape in json.loads(line[8:])]), flush=True)
    continue
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < float(line):
    step()
    count += 1
  print(json.dumps(count * batch / (time.perf_counter() - start)), flush=True)
"""


def median_ms(work, repeats: int = 20) -> float:
  work()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    work()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def prefill_times(engine: Engine) -> tuple[float, float]:
  """(image prefill ms, text prefill ms of a prompt of the same length), medians."""
  import jax
  image = np.random.default_rng(0).integers(0, 256, (engine.image_size,) * 2 + (3,), np.uint8)
  image_ids, _ = engine.image_prompt_ids(chat_prompt([("user", IMAGE_TOKEN + QUESTION)]), 1, 8)
  text_ids = [engine.tokenizer.bos_id()] * len(image_ids)
  settings = SamplingSettings(temperature=0.0)
  image_ms = median_ms(lambda: jax.block_until_ready(
      engine.prefill_images(image_ids, [image], settings)))
  text_ms = median_ms(lambda: jax.block_until_ready(engine.prefill(text_ids, settings)))
  return image_ms, text_ms


def text_tokens_per_s(orchestrator: Orchestrator, engine: Engine, slots: int,
                      max_tokens: int, with_images: bool) -> float:
  """A text request's median tokens/s with `slots` requests at once: all text, or half of
  them image requests."""
  rng = np.random.default_rng(1)
  text_ids, _ = engine.prompt_ids(chat_prompt([("user", QUESTION)]), max_tokens)
  image_ids, _ = engine.image_prompt_ids(chat_prompt([("user", IMAGE_TOKEN + QUESTION)]), 1,
                                         max_tokens)
  work = []
  for index in range(slots):
    if with_images and index % 2:
      image = rng.integers(0, 256, (engine.image_size,) * 2 + (3,), np.uint8)
      work.append((image_ids, {"images": [image]}))
    else:
      work.append((text_ids, {}))
  rates = [None] * slots

  def run(index, prompt_ids, extra):
    start = time.perf_counter()
    deltas = orchestrator.generate(prompt_ids, max_tokens=max_tokens, ignore_eos=True, **extra)
    if not extra:
      rates[index] = len(deltas) / (time.perf_counter() - start)

  threads = [threading.Thread(target=run, args=(i, *w)) for i, w in enumerate(work)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return statistics.median(rate for rate in rates if rate is not None)


def vit_step(config: vit.VisionConfig):
  """A compiled forward+backward (parameter gradients of a mean square) of our ViT over
  VIT_BATCH images, as a function of no arguments that waits for its result."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  encoder_def, encoder_params = nnx.split(vit.VisionEncoder(config, rngs=nnx.Rngs(0)))
  images = jnp.asarray(np.random.default_rng(2).integers(
      0, 256, (VIT_BATCH, 1, config.image_size, config.image_size, 3), np.uint8))

  @jax.jit
  def step(params):
    return jax.grad(lambda p: jnp.mean(jnp.square(nnx.merge(encoder_def, p)(images))))(params)

  return lambda: jax.block_until_ready(step(encoder_params))


def vit_matmul_shapes(config: vit.VisionConfig, images: int = VIT_BATCH
                      ) -> list[tuple[int, int, int]]:
  """(rows, inner, columns) of one block's weight matmuls in our ViT's forward over `images`
  images: q/k/v, the attention output, gate/up, down."""
  c, tokens = config, images * config.num_patches
  return [(tokens, c.embed_dim, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
          (tokens, c.num_heads * c.head_dim, c.embed_dim), (tokens, c.embed_dim, 2 * c.mlp_dim),
          (tokens, c.mlp_dim, c.embed_dim)]


def matmul_gflops(shapes: list[tuple[int, int, int]], seconds: float = 0.2) -> list[float]:
  """XLA's float32 GFLOP/s on each (rows, inner, columns) matmul, as TIMM_SCRIPT's
  `matmul_gflops` times PyTorch's: what the ViT ratio is read against."""
  import jax
  import jax.numpy as jnp
  product, rng, rates = jax.jit(jnp.matmul), np.random.default_rng(3), []
  for rows, inner, columns in shapes:
    a = jnp.asarray(rng.random((rows, inner), np.float32))
    b = jnp.asarray(rng.random((inner, columns), np.float32))
    run = lambda: jax.block_until_ready(product(a, b))  # noqa: E731
    run()
    rates.append(2 * rows * inner * columns * calls_per_s(run, seconds) / 1e9)
  return rates


def calls_per_s(work, seconds: float) -> float:
  """How many times a second `work()` runs, over `seconds`."""
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    work()
    count += 1
  return count / (time.perf_counter() - start)


def images_per_s(step, seconds: float) -> float:
  return calls_per_s(step, seconds) * VIT_BATCH


def vit_flops_per_image(config: vit.VisionConfig) -> int:
  """Our ViT's forward matmul FLOPs per image: patch embedding, then per block the q/k/v/o
  projections, the scores and their weighted sum, and SwiGLU's three matrices."""
  c, tokens = config, config.num_patches
  weights = sum(2 * rows * inner * columns for rows, inner, columns in vit_matmul_shapes(c, 1))
  attention = 2 * 2 * tokens * tokens * c.num_heads * c.head_dim
  return _patch_embedding_flops(c) + c.num_layers * (weights + attention)


def _patch_embedding_flops(c: vit.VisionConfig) -> int:
  return 2 * c.num_patches * c.patch_size * c.patch_size * 3 * c.embed_dim


def timm_flops_per_image(config: vit.VisionConfig, mlp_dim: int) -> int:
  """timm's ViT's forward matmul FLOPs per image: heads of embed_dim / num_heads, a
  two-matrix MLP of width `mlp_dim`."""
  c, tokens = config, config.num_patches
  per_block = (2 * tokens * c.embed_dim * 4 * c.embed_dim + 2 * 2 * tokens * tokens * c.embed_dim
               + 2 * tokens * 2 * c.embed_dim * mlp_dim)
  return _patch_embedding_flops(c) + c.num_layers * per_block


def timm_mlp_dim(config: vit.VisionConfig) -> int:
  """The width of timm's MLP that gives it our FLOPs per image."""
  without_mlp = timm_flops_per_image(config, 0)
  per_unit = timm_flops_per_image(config, 1) - without_mlp
  return round((vit_flops_per_image(config) - without_mlp) / per_unit)


def paired_vit_rates(config: vit.VisionConfig, python: str, rounds: int, seconds: float
                     ) -> tuple[list[float], list[float] | None, dict | None]:
  """Our ViT's and timm's (same shape and FLOPs: LayerNorm and a wider GELU MLP where ours has
  RMSNorm and SwiGLU) forward+backward images/s on the CPU, in `rounds` alternating rounds of
  `seconds` each, both compiled and warm beforehand: the shared machine's speed drifts by tens
  of percent over a minute, and a round of each side back to back sees the same drift. Then
  XLA's and PyTorch's GFLOP/s on our ViT's matmul shapes, alternating in MATMUL_ROUNDS rounds
  ({"shapes", "ours", "torch"}: a list of rates per round). timm's list and the matmul rates
  are None when timm is not importable by `python`."""
  import os
  ours_step = vit_step(config)
  ours_step()
  shape = {name: getattr(config, name) for name in
           ("image_size", "patch_size", "embed_dim", "num_layers", "num_heads")}
  shape["mlp_dim"] = timm_mlp_dim(config)
  threads = str(len(os.sched_getaffinity(0)))
  # timm's warnings go to a file: a pipe read only at the end would stall timm once they
  # filled its buffer (64 KiB).
  with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
      [python, "-c", TIMM_SCRIPT, json.dumps(shape), str(VIT_BATCH), threads],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True) as timm:

    def last_error_line() -> list[str]:
      timm.wait()
      errors.seek(0)
      return errors.read().strip().splitlines()[-1:]

    if timm.stdout.readline().strip() != "ready":
      timm.stdin.close()
      print(f"timm did not run under {python}: {last_error_line()}")
      return [images_per_s(ours_step, seconds) for _ in range(rounds)], None, None
    ours, theirs = [], []
    for _ in range(rounds):
      ours.append(images_per_s(ours_step, seconds))
      timm.stdin.write(f"{seconds}\n")
      timm.stdin.flush()
      line = timm.stdout.readline()
      if not line:
        raise SystemExit(f"timm stopped in round {len(theirs) + 1} of {rounds}: "
                         f"{last_error_line()}")
      theirs.append(float(line))
    matmuls = {"shapes": vit_matmul_shapes(config), "ours": [], "torch": []}
    for _ in range(MATMUL_ROUNDS):
      matmuls["ours"].append(matmul_gflops(matmuls["shapes"]))
      timm.stdin.write(f"matmuls {json.dumps(matmuls['shapes'])}\n")
      timm.stdin.flush()
      if not (line := timm.stdout.readline()):
        raise SystemExit(f"timm stopped timing matmuls: {last_error_line()}")
      matmuls["torch"].append(json.loads(line))
    timm.stdin.close()
  return ours, theirs, matmuls


def matmul_ratio(matmuls: dict) -> float:
  """The median over rounds of the geometric mean over shapes of XLA's rate over PyTorch's."""
  return statistics.median(
      float(np.exp(np.mean(np.log(np.array(ours) / np.array(theirs)))))
      for ours, theirs in zip(matmuls["ours"], matmuls["torch"]))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run_dir", default="runs/vision_tiny_sft",
                      help="a vision run (`configs/vision_tiny_sft.gin`'s workdir)")
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--max_tokens", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--timm_python", default=sys.executable)
  parser.add_argument("--vit_rounds", type=int, default=7)
  parser.add_argument("--vit_seconds", type=float, default=2.0)
  parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
  args = parser.parse_args(argv)
  machine = machine_load.load_before_run()
  engine = Engine.from_checkpoint(args.run_dir, slots=args.slots)
  if engine.image_size is None:
    raise SystemExit(f"{args.run_dir} has no vision tower; train one with "
                     "configs/vision_tiny_projector.gin and configs/vision_tiny_sft.gin")
  engine.warmup()
  image_ms, text_ms = prefill_times(engine)
  orchestrator = Orchestrator(engine).start()
  for with_images in (False, True):  # untimed: the first round compiles what warmup does not
    text_tokens_per_s(orchestrator, engine, args.slots, args.max_tokens, with_images)
  alone, beside = [], []
  for _ in range(args.rounds):
    alone.append(text_tokens_per_s(orchestrator, engine, args.slots, args.max_tokens, False))
    beside.append(text_tokens_per_s(orchestrator, engine, args.slots, args.max_tokens, True))
  orchestrator.shutdown()
  python = args.timm_python if Path(args.timm_python).exists() else sys.executable
  ours, theirs, matmuls = paired_vit_rates(engine.config.vision, python, args.vit_rounds,
                                           args.vit_seconds)
  result = {
      "run_dir": args.run_dir, "image_prefill_ms": round(image_ms, 2),
      "text_prefill_ms": round(text_ms, 2),
      "text_tokens_per_s_alone": round(statistics.median(alone), 1),
      "text_tokens_per_s_beside_images": round(statistics.median(beside), 1),
      "text_only_slowdown": round(1 - statistics.median(beside) / statistics.median(alone), 4),
      "vit_images_per_s": round(statistics.median(ours), 1),
      "timm_images_per_s": theirs and round(statistics.median(theirs), 1),
      "vit_ratio_vs_timm": theirs and round(statistics.median(
          mine / its for mine, its in zip(ours, theirs)), 3),
      "vit_flops_per_image": vit_flops_per_image(engine.config.vision),
      "timm_flops_per_image": timm_flops_per_image(engine.config.vision,
                                                   timm_mlp_dim(engine.config.vision)),
      "timm_mlp_dim": timm_mlp_dim(engine.config.vision),
      "matmul_ratio_vs_torch": matmuls and round(matmul_ratio(matmuls), 3),
      "matmul_gflops": matmuls and {
          "shapes": matmuls["shapes"],
          **{side: [round(statistics.median(rates), 1) for rates in zip(*matmuls[side])]
             for side in ("ours", "torch")}},
      "machine_before_run": machine,
      "rounds": {"alone": [round(r, 1) for r in alone], "beside": [round(r, 1) for r in beside],
                 "vit": [round(r, 1) for r in ours],
                 "timm": theirs and [round(r, 1) for r in theirs]}}
  print("| measure | value |\n|---|---|")
  for name, value in result.items():
    if name not in ("run_dir", "rounds", "matmul_gflops", "machine_before_run"):
      print(f"| {name} | {value} |")
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
