"""Our ViT's forward+backward against timm's (PyTorch) of the same shape and FLOPs, paired in
alternating rounds on one device: issue 13's `vit_ratio_vs_timm`, for `benchmarks/vision.py`
(on this host's CPU) and `benchmarks/gpu_first_run.py` (timm on the CUDA GPU beside ours).
Imports neither the server nor its web stack, which a lent GPU's image lacks.
"""

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from maxlm.model import vit

VIT_BATCH = 64
MATMUL_ROUNDS = 3
# How each side computes: "float32" everywhere, or "bfloat16" mixed precision as the vision
# configs, 1b.gin and 7b.gin train (float32 parameters, bfloat16 matmuls and activations; timm
# under PyTorch's own mixed precision, `torch.autocast` to bfloat16).
PRECISIONS = ("bfloat16", "float32")

TIMM_SCRIPT = """
import json, sys, time, torch, timm
shape, batch = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
device = torch.device(sys.argv[4])
mixed = sys.argv[5] == "bfloat16"
matmul_dtype = torch.bfloat16 if mixed else torch.float32
# float32 matmuls as XLA runs them by default there: TF32 on a CUDA GPU, full float32 on CPU
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
wait = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
model = timm.models.vision_transformer.VisionTransformer(
    img_size=shape["image_size"], patch_size=shape["patch_size"], embed_dim=shape["embed_dim"],
    depth=shape["num_layers"], num_heads=shape["num_heads"],
    mlp_ratio=(shape["mlp_dim"] + 0.5) / shape["embed_dim"], num_classes=0, global_pool="",
    class_token=False).to(device)
images = torch.rand(batch, 3, shape["image_size"], shape["image_size"], device=device)
def step():
  model.zero_grad(set_to_none=True)
  with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
    features = model(images)
  features.float().square().mean().backward()
  wait()
for _ in range(3):
  step()
print("ready", flush=True)
def matmul_gflops(m, k, n, seconds=0.2):
  a = torch.rand(m, k, device=device, dtype=matmul_dtype)
  b = torch.rand(k, n, device=device, dtype=matmul_dtype)
  a @ b
  wait()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    a @ b
    count += 1
  wait()
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


def vit_gradients(config: vit.VisionConfig, precision: str = "float32"):
  """(gradients, parameters): our ViT's forward+backward (parameter gradients of a mean
  square) over VIT_BATCH images in `precision` (one of PRECISIONS; the parameters and their
  gradients stay float32), not yet compiled, and the parameters it takes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  encoder_def, encoder_params = nnx.split(vit.VisionEncoder(config, rngs=nnx.Rngs(0)))
  images = jnp.asarray(np.random.default_rng(2).integers(
      0, 256, (VIT_BATCH, 1, config.image_size, config.image_size, 3), np.uint8))

  def loss(params):
    features = nnx.merge(encoder_def, params)(images, jnp.dtype(precision))
    return jnp.mean(jnp.square(features.astype(jnp.float32)))

  return jax.grad(loss), encoder_params


def vit_step(config: vit.VisionConfig, precision: str = "float32"):
  """`vit_gradients` compiled, as a function of no arguments that waits for its result."""
  import jax
  gradients, params = vit_gradients(config, precision)
  step = jax.jit(gradients)
  return lambda: jax.block_until_ready(step(params))


def vit_matmul_shapes(config: vit.VisionConfig, images: int = VIT_BATCH
                      ) -> list[tuple[int, int, int]]:
  """(rows, inner, columns) of one block's weight matmuls in our ViT's forward over `images`
  images: q/k/v, the attention output, gate/up, down."""
  c, tokens = config, images * config.num_patches
  return [(tokens, c.embed_dim, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
          (tokens, c.num_heads * c.head_dim, c.embed_dim), (tokens, c.embed_dim, 2 * c.mlp_dim),
          (tokens, c.mlp_dim, c.embed_dim)]


def matmul_gflops(shapes: list[tuple[int, int, int]], seconds: float = 0.2,
                  precision: str = "float32") -> list[float]:
  """XLA's GFLOP/s on each (rows, inner, columns) matmul of `precision` operands, as
  TIMM_SCRIPT's `matmul_gflops` times PyTorch's: what the ViT ratio is read against."""
  import jax
  import jax.numpy as jnp
  product, rng, rates = jax.jit(jnp.matmul), np.random.default_rng(3), []
  for rows, inner, columns in shapes:
    a = jnp.asarray(rng.random((rows, inner), np.float32), precision)
    b = jnp.asarray(rng.random((inner, columns), np.float32), precision)
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


def paired_vit_rates(config: vit.VisionConfig, python: str, rounds: int, seconds: float,
                     precision: str = "float32"
                     ) -> tuple[list[float], list[float] | None, dict | None]:
  """Our ViT's and timm's (same shape and FLOPs: LayerNorm and a wider GELU MLP where ours has
  RMSNorm and SwiGLU) forward+backward images/s on JAX's device (timm on the CUDA GPU when
  JAX runs on one, its float32 matmuls in TF32 as XLA's are there), both in `precision` (one
  of PRECISIONS), in `rounds` alternating
  rounds of `seconds` each, both compiled and warm beforehand: the shared machine's speed
  drifts by tens of percent over a minute, and a round of each side back to back sees the
  same drift. Then
  XLA's and PyTorch's GFLOP/s on our ViT's matmul shapes, alternating in MATMUL_ROUNDS rounds
  ({"shapes", "ours", "torch"}: a list of rates per round). timm's list and the matmul rates
  are None when timm is not importable by `python`."""
  import os

  import jax
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"  # timm beside our ViT's device
  if precision not in PRECISIONS:
    raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
  ours_step = vit_step(config, precision)
  ours_step()
  shape = {name: getattr(config, name) for name in
           ("image_size", "patch_size", "embed_dim", "num_layers", "num_heads")}
  shape["mlp_dim"] = timm_mlp_dim(config)
  threads = str(len(os.sched_getaffinity(0)))
  # timm's warnings go to a file: a pipe read only at the end would stall timm once they
  # filled its buffer (64 KiB).
  with tempfile.TemporaryFile("w+") as errors, subprocess.Popen(
      [python, "-c", TIMM_SCRIPT, json.dumps(shape), str(VIT_BATCH), threads, device,
       precision],
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
      matmuls["ours"].append(matmul_gflops(matmuls["shapes"], precision=precision))
      timm.stdin.write(f"matmuls {json.dumps(matmuls['shapes'])}\n")
      timm.stdin.flush()
      if not (line := timm.stdout.readline()):
        raise SystemExit(f"timm stopped timing matmuls: {last_error_line()}")
      matmuls["torch"].append(json.loads(line))
    timm.stdin.close()
  return ours, theirs, matmuls


def config_of_gin_file(path: Path) -> vit.VisionConfig:
  """The VisionConfig a gin file binds (its `VisionConfig.*` lines; the rest is left out)."""
  import gin
  lines = [line for line in path.read_text().splitlines() if line.startswith("VisionConfig.")]
  gin.parse_config(lines)
  try:
    return vit.VisionConfig()
  finally:
    gin.clear_config()


def matmul_ratio(matmuls: dict) -> float:
  """The median over rounds of the geometric mean over shapes of XLA's rate over PyTorch's."""
  return statistics.median(
      float(np.exp(np.mean(np.log(np.array(ours) / np.array(theirs)))))
      for ours, theirs in zip(matmuls["ours"], matmuls["torch"]))


def paired_summary(config: vit.VisionConfig, python: str, rounds: int, seconds: float,
                   precision: str) -> dict:
  """`paired_vit_rates` in `precision`, read: each side's median images/s, the median of the
  rounds' ratios (`ratio_vs_timm`), the matmul ratio and each shape's median rates (None
  where timm did not run), and the rounds themselves."""
  ours, theirs, matmuls = paired_vit_rates(config, python, rounds, seconds, precision)
  return {
      "precision": precision, "vit_images_per_s": round(statistics.median(ours), 1),
      "timm_images_per_s": theirs and round(statistics.median(theirs), 1),
      "ratio_vs_timm": theirs and round(statistics.median(
          mine / its for mine, its in zip(ours, theirs)), 3),
      "matmul_ratio_vs_torch": matmuls and round(matmul_ratio(matmuls), 3),
      "matmul_gflops": matmuls and {
          "shapes": matmuls["shapes"],
          **{side: [round(statistics.median(rates), 1) for rates in zip(*matmuls[side])]
             for side in ("ours", "torch")}},
      "rounds": {"vit": [round(rate, 1) for rate in ours],
                 "timm": theirs and [round(rate, 1) for rate in theirs]}}
