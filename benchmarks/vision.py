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
    images/s the medians of each side's rounds. Measured in both precisions, each side in the
    same one: `vit_ratio_vs_timm` is bfloat16 mixed precision, as the vision configs (and
    1b.gin, 7b.gin) train: float32 parameters, bfloat16 matmuls and activations; timm under
    `torch.autocast` to bfloat16, PyTorch's own mixed precision. `..._float32` is everything
    in float32 (as the text tiny configs train); `vit` has each precision's rounds and matmul
    rates;
  - `matmul_ratio_vs_torch_{precision}`: what that ratio is read against, XLA's matmul
    GFLOP/s over PyTorch's on our ViT's own forward matmul shapes in that precision (q/k/v,
    output, gate/up, down over the batch's patches), a geometric mean over the shapes, the
    median of 3 alternating rounds. Most of a step is these matmuls, so a ViT ratio above
    this one is what our ViT gains beyond the backend's matmuls.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import machine_load
from benchmarks.vit_timm import (PRECISIONS, paired_summary, timm_flops_per_image, timm_mlp_dim,
                                 vit_flops_per_image)
from serving.chat import IMAGE_TOKEN, chat_prompt
from serving.engine import Engine, SamplingSettings
from serving.orchestrator import Orchestrator

QUESTION = "What shape and color?"

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
  vit = {precision: paired_summary(engine.config.vision, python, args.vit_rounds,
                                   args.vit_seconds, precision) for precision in PRECISIONS}
  result = {
      "run_dir": args.run_dir, "image_prefill_ms": round(image_ms, 2),
      "text_prefill_ms": round(text_ms, 2),
      "text_tokens_per_s_alone": round(statistics.median(alone), 1),
      "text_tokens_per_s_beside_images": round(statistics.median(beside), 1),
      "text_only_slowdown": round(1 - statistics.median(beside) / statistics.median(alone), 4),
      "vit_ratio_vs_timm": vit["bfloat16"]["ratio_vs_timm"],
      **{f"{name}_{precision}": vit[precision][key] for precision in PRECISIONS
         for name, key in (("vit_images_per_s", "vit_images_per_s"),
                           ("timm_images_per_s", "timm_images_per_s"),
                           ("vit_ratio_vs_timm", "ratio_vs_timm"),
                           ("matmul_ratio_vs_torch", "matmul_ratio_vs_torch"))},
      "vit_flops_per_image": vit_flops_per_image(engine.config.vision),
      "timm_flops_per_image": timm_flops_per_image(engine.config.vision,
                                                   timm_mlp_dim(engine.config.vision)),
      "timm_mlp_dim": timm_mlp_dim(engine.config.vision),
      "vit": vit, "machine_before_run": machine,
      "rounds": {"alone": [round(r, 1) for r in alone], "beside": [round(r, 1) for r in beside]}}
  print("| measure | value |\n|---|---|")
  for name, value in result.items():
    if name not in ("run_dir", "rounds", "vit", "machine_before_run"):
      print(f"| {name} | {value} |")
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
