"""Deviceless ahead-of-time compiles for TPU and CUDA: the flash-attention kernels (forward and
backward; with prefix-LM and branch masks too, which CUDA runs through Triton), the serving
engine's paged decode attention (on CUDA the ragged Pallas kernel) and the train step of a gin
config, compiled for a topology this host does not have.

  python benchmarks/aot_compile.py --platform tpu  [--topology v5e=2x2] [--gin_file 1b.gin] [--json]
  python benchmarks/aot_compile.py --platform cuda [--topology 1x1x8] [--gin_file 1b.gin] [--json]

`jax.experimental.topologies.get_topology_desc` makes compile-only devices: from libtpu for TPU
(`pip install -e '.[aot]'`, which pins the libtpu of this JAX's `tpu` extra), from the CUDA
plugin for CUDA (`pip install 'jax[cuda12]==<jax version>'`) given a GPU target description
(`--gpu_target`: a GpuTargetConfigProto text file, default the H100 SXM below). Compiling on
them runs the real backend compilers on this CPU host: XLA:TPU with libtpu's Mosaic compiler
for each `tpu_custom_call`, or XLA:GPU with the Mosaic GPU pipeline and ptxas (sm_90a) for each
`mosaic_gpu_v2` call. Nothing is allocated: inputs are `jax.ShapeDtypeStruct`s with shardings.

What the table reports per compile: seconds to lower and to compile, the custom calls in the
compiled HLO, the kernels the backend compiler itself reported (TPU: kernels whose Mosaic dump
reached `finalize-llo`; CUDA: ptxas registers, spilled bytes and TMA stores of each distinct
kernel in the order the plugin compiled them: 2 TMA stores is dk/dv; of the two with 1, the
forward is the one named `_lambda_*`, dq `anonymous_*`), per-device memory from
`compiled.memory_analysis()` and FLOPs from `compiled.cost_analysis()` (XLA does not count
FLOPs inside custom calls, and XLA:GPU reports none; the train step also reports the model
FLOPs of `training_flops_per_token` per device for comparison).

The train step is maxlm's own (`steps.make_train_step` with `tasks.next_token_loss`, state
shardings from `steps.state_shardings`, mesh from the gin-bound `sharding.make_mesh`) with
`ModelConfig.attention = "pallas"`, as is: `flash_attention` picks its kernels per lowering
platform (Mosaic for TPU, Mosaic GPU for CUDA), not from this CPU host.
"""

import argparse
import atexit
import collections
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
from jax._src import xla_bridge
from jax.experimental import topologies

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
import kernels_pallas
from maxlm import optim, sharding, steps, tasks
from maxlm import train as maxlm_train
from maxlm.model import ModelConfig, count_params, paged_kv, training_flops_per_token

# H100 SXM (80 GB HBM3) as XLA:GPU describes it (GpuTargetConfigProto text format); CUDA 12.9
# and cuDNN 9.8 are what jax[cuda12] 0.12 installs.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
DEFAULT_TOPOLOGY = {"tpu": "v5e=2x2", "cuda": "1x1x8"}
# HBM per device (public specs), for the "fits" column; CUDA reads it from the target config.
TPU_HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5": 95 << 30,
                 "TPU v6 lite": 32 << 30}
KERNEL_CALLS = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}
INSTALL = {"tpu": "pip install -e '.[aot]'  (libtpu pinned by jax[tpu]=={version})",
           "cuda": "pip install 'jax[cuda12]=={version}'"}
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def cpu_host():
  """Keeps JAX's runtime on the CPU: the accelerator exists only as compile-only devices."""
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")


def compile_only_devices(platform: str, topology: str, gpu_target: str = H100_TARGET) -> list:
  """Compile-only devices of `topology` ("v5e=2x2", "v5p=2x2x1"; CUDA "slices x hosts x gpus")."""
  install = INSTALL[platform].format(version=jax.__version__)
  try:
    if platform == "tpu":
      os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
      return topologies.get_topology_desc(topology, platform="tpu").devices
    return topologies.get_topology_desc(platform="cuda", target_config=gpu_target,
                                        topology=topology).devices
  except (RuntimeError, NotImplementedError) as error:
    if "not installed" in str(error) or "not implemented for" in str(error):
      raise SystemExit(f"no {platform} compiler in this environment: {install}") from None
    raise SystemExit(f"--topology {topology!r} for {platform}: {str(error).splitlines()[0]}") \
        from None


@contextlib.contextmanager
def kernel_compiler_report(platform: str):
  """Yields a dict that, on exit, holds what the backend's kernel compiler reported.

  TPU: names of Mosaic kernels lowered to LLO, from libtpu's dump (`--xla_mosaic_dump_to`,
  which must be in LIBTPU_INIT_ARGS before libtpu starts: `enable_kernel_dumps`). CUDA: ptxas
  statistics per Mosaic GPU kernel (MOSAIC_GPU_DUMP_PTXAS, read at each compile)."""
  report = {}
  if platform == "tpu":
    dump_dir = _tpu_dump_dir()
    before = set(os.listdir(dump_dir)) if dump_dir else set()
    yield report
    if dump_dir:
      new = sorted(set(os.listdir(dump_dir)) - before)
      report["mosaic_llo"] = sorted({m.group(1) for m in map(
          re.compile(r"mosaic-dump-(.+)-post-finalize-llo").search, new) if m})
    return
  with tempfile.TemporaryDirectory() as dump_dir:
    saved = {k: os.environ.get(k) for k in ("MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_TO")}
    os.environ.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=dump_dir)
    try:
      yield report
    finally:
      for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.update({key: value})
      report["ptxas"] = _ptxas_stats(Path(dump_dir))


def enable_kernel_dumps():
  """Asks libtpu to dump Mosaic's compile stages (to a temporary folder); before libtpu starts."""
  if "xla_mosaic_dump_to" not in os.environ.get("LIBTPU_INIT_ARGS", ""):
    dump_dir = tempfile.mkdtemp(prefix="mosaic-dump-")
    atexit.register(shutil.rmtree, dump_dir, ignore_errors=True)
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") +
                                      f" --xla_mosaic_dump_to={dump_dir}").strip()


def _tpu_dump_dir() -> str | None:
  found = re.search(r"--xla_mosaic_dump_to=(\S+)", os.environ.get("LIBTPU_INIT_ARGS", ""))
  return found.group(1) if found and os.path.isdir(found.group(1)) else None


def _ptxas_stats(dump_dir: Path) -> list[dict]:
  """[{kernel, registers, spill_store_bytes, tma_stores}] per distinct Mosaic GPU kernel, in the
  order the plugin compiled them (its dump names end in a per-process counter). `tma_stores`
  counts the PTX's TMA copies to GMEM: 2 marks the dk/dv kernel, 1 the forward or dq."""
  order = lambda p: int(re.search(r"_(\d+)$", p.stem).group(1))
  stats = []
  for path in sorted(dump_dir.glob("*.ptxas"), key=order):
    text = path.read_bytes().decode(errors="replace")
    ptx = path.with_suffix(".ptx")
    stores = re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared",
                        ptx.read_text(errors="replace")) if ptx.exists() else None
    stats.append({"kernel": path.stem,
                  "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
                  "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", text).group(1)),
                  "tma_stores": None if stores is None else len(stores)})
  return stats


def _compiled_summary(lowered, seconds_lower: float, platform: str) -> dict:
  started = time.perf_counter()
  compiled = lowered.compile()
  seconds_compile = time.perf_counter() - started
  memory = compiled.memory_analysis()
  # XLA:GPU's compile-only executables report no cost analysis (and the lowered module's needs
  # a runtime client): flops stay None there.
  cost = compiled.cost_analysis() or {}
  calls = collections.Counter(_CUSTOM_CALL.findall(compiled.as_text()))
  return {
      "lower_s": round(seconds_lower, 2), "compile_s": round(seconds_compile, 2),
      "custom_calls": dict(calls), "kernel_calls": calls.get(KERNEL_CALLS[platform], 0),
      "memory": {name: getattr(memory, f"{name}_size_in_bytes") for name in
                 ("argument", "output", "alias", "temp", "generated_code")} if memory else None,
      "flops": cost.get("flops"),
  }


ATTENTION_MASKS = ("segments", "prefix_lm", "branches")


def compile_attention(devices, platform: str, dtype=jnp.bfloat16, head_dim: int = 128,
                      batch: int = 2, seq_len: int = 300, num_heads: int = 8,
                      num_kv_heads: int = 2, mask: str = "segments") -> dict:
  """Compiles the compiled-mode (interpret=False) flash attention's value and q/k/v gradient on
  the first device: causal, GQA, a length that is no multiple of the blocks, and `mask`:
  segment ids; or bidirectional ids (prefix-LM, an image's patches) or branch ids (DPO's
  shared-prompt rows), which CUDA runs through the Triton kernels, not Mosaic GPU."""
  mesh = jax.sharding.Mesh(devices[:1], ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)
  q = spec(batch, seq_len, num_heads, head_dim)
  kv = spec(batch, seq_len, num_kv_heads, head_dim)
  ids = spec(batch, seq_len, dt=jnp.int32)
  keyword = {"segments": "segment_ids", "prefix_lm": "bidirectional_ids",
             "branches": "branch_ids"}[mask]

  def loss(q, k, v, ids):
    out = kernels_pallas.flash_attention(q, k, v, causal=True, interpret=False, **{keyword: ids})
    return out.astype(jnp.float32).sum()

  with jax.set_mesh(mesh), kernel_compiler_report(platform) as report:
    started = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids)
    result = _compiled_summary(lowered, time.perf_counter() - started, platform)
  shape = f"b{batch} l{seq_len} h{num_heads}/{num_kv_heads} d{head_dim}"
  return {"what": f"flash_attention fwd+bwd {mask} {shape}", "dtype": jnp.dtype(dtype).name,
          **result, **report}


def compile_paged_decode(devices, platform: str, dtype=jnp.bfloat16, batch: int = 8,
                         num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 64,
                         num_blocks: int = 4096, block_size: int = 16,
                         table_width: int = 256) -> dict:
  """Compiles one layer's decode attention as the serving engine runs it
  (`paged_kv.attend`, one query a row): on CUDA the ragged paged Pallas kernel (Triton),
  elsewhere the chunked XLA loop. Default shapes: the 1b model's heads over a 64k-position
  pool, rows of up to 4,096 positions."""
  mesh = jax.sharding.Mesh(devices[:1], ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=replicated)
  pool = spec(num_kv_heads, num_blocks, block_size, head_dim)
  layer = {"k": pool, "v": pool, "block_table": spec(batch, table_width, dt=jnp.int32)}
  q = spec(batch, 1, num_heads, head_dim)
  positions = spec(batch, 1, dt=jnp.int32)
  with jax.set_mesh(mesh), kernel_compiler_report(platform) as report:
    started = time.perf_counter()
    lowered = jax.jit(paged_kv.attend).lower(layer, q, positions)
    result = _compiled_summary(lowered, time.perf_counter() - started, platform)
  shape = (f"b{batch} h{num_heads}/{num_kv_heads} d{head_dim} pool {num_blocks}x{block_size} "
           f"table {table_width}")
  return {"what": f"paged decode attention {shape}", "dtype": jnp.dtype(dtype).name,
          **result, **report}


def compile_train_step(devices, platform: str, gin_files: list[str], gin_params: list[str] = (),
                       seq_len: int = 2048, per_device_batch: int = 1,
                       gpu_target: str = H100_TARGET) -> dict:
  """AOT-compiles maxlm's train step for `gin_files` with pallas attention on `devices` (mesh
  from the gin-bound `make_mesh`), on abstract state and batch; reports per-device memory and
  how the argument bytes compare with 1/N of the whole train state."""

  gin.clear_config()
  gin.parse_config_files_and_bindings([maxlm_train.resolve_gin_file(f) for f in gin_files],
                                      [*gin_params, "ModelConfig.attention = 'pallas'"])
  config = ModelConfig()
  mesh = sharding.make_mesh(devices=devices)
  global_batch = per_device_batch * len(devices)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(_gin_value("train.steps", 1000)))
  graphdef, abstract_model = steps.abstract_model(config)
  shardings = steps.state_shardings(abstract_model, optimizer, mesh)
  state = steps.abstract_train_state(abstract_model, optimizer, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=batch_sharding)
           for name in ("tokens", "positions", "segment_ids")}
  train_step = steps.make_train_step(graphdef, tasks.next_token_loss, optimizer, shardings,
                                     batch_sharding, _gin_value("train.microbatches", 1))
  what = (f"train step {'+'.join(Path(f).stem for f in gin_files)} "
          f"({count_params(config) / 1e9:.2f}B, b{global_batch} l{seq_len}, remat {config.remat})")
  with jax.set_mesh(mesh), kernel_compiler_report(platform) as report:
    started = time.perf_counter()
    lowered = train_step.lower(state, batch)
    try:
      result = _compiled_summary(lowered, time.perf_counter() - started, platform)
    except jax.errors.JaxRuntimeError as error:  # the compiler's out-of-memory verdict is a result
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      return {"what": what, "dtype": config.dtype, "mesh": dict(mesh.shape), "fits": False,
              "error": _out_of_memory(str(error))}
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  memory = result["memory"]
  hbm = _device_memory(devices[0], gpu_target)
  peak = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  model_flops = training_flops_per_token(config, seq_len) * global_batch * seq_len / len(devices)
  return {"what": what, "dtype": config.dtype, "mesh": dict(mesh.shape), **result, **report,
          "state_bytes_total": state_bytes,
          "argument_vs_state_over_n": round(memory["argument"] / (state_bytes / len(devices)), 3),
          "peak_bytes_per_device": peak, "device_memory_bytes": hbm,
          "fits": None if hbm is None else peak <= hbm, "model_flops_per_device": model_flops}


def _out_of_memory(message: str) -> str:
  """The compiler's verdict in one line: its error code, what ran out and where."""
  details = re.findall(r"(?:allocating on stack for %[\w.-]+|Scoped allocation with size \S+ and "
                       r"limit \S+|HLO temporaries \([^)]*\) exceeds available HBM \([^)]*\)|"
                       r"Used \S+ of \S+ vmem)", message)
  first = message.splitlines()[0].strip()
  return "; ".join([first, *(d for d in dict.fromkeys(details) if d not in first)])


def _gin_value(name: str, default):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def _device_memory(device, gpu_target: str) -> int | None:
  if device.platform == "tpu":
    return TPU_HBM_BYTES.get(device.device_kind)
  found = re.search(r"device_memory_size:\s*(\d+)", gpu_target)
  return int(found.group(1)) if found else None


def _gib(n):
  return "-" if n is None else f"{n / 2**30:.2f}"


def print_table(platform: str, topology: str, rows: list[dict]):
  print(f"\n{'what':<58} {'platform':<8} {'topology':<9} {'dtype':<8} {'lower s':>7} "
        f"{'compile s':>9}  custom calls / kernel compiler")
  for row in rows:
    if "error" in row:
      print(f"{row['what']:<58} {platform:<8} {topology:<9} {row['dtype']:<8} does not compile: "
            f"{row['error']}")
      continue
    compiler = (f"Mosaic LLO: {', '.join(row['mosaic_llo'])}" if row.get("mosaic_llo") else
                "; ".join(f"{p['registers']} regs, {p['spill_store_bytes']} B spilled, "
                          f"{p['tma_stores']} TMA stores"
                          for p in row.get("ptxas", [])))
    print(f"{row['what']:<58} {platform:<8} {topology:<9} {row['dtype']:<8} {row['lower_s']:>7} "
          f"{row['compile_s']:>9}  {row['custom_calls']} | {compiler}")
    memory = row["memory"] or {}
    line = (f"    per device GiB: arguments {_gib(memory.get('argument'))}, outputs "
            f"{_gib(memory.get('output'))}, aliased {_gib(memory.get('alias'))}, temporaries "
            f"{_gib(memory.get('temp'))}; XLA flops {row['flops']}")
    if "peak_bytes_per_device" in row:
      line += (f"; peak {_gib(row['peak_bytes_per_device'])} of {_gib(row['device_memory_bytes'])}"
               f" (fits: {row['fits']}); arguments / (state / N) {row['argument_vs_state_over_n']};"
               f" model flops per device {row['model_flops_per_device']:.4g}; mesh {row['mesh']}")
    print(line)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--platform", choices=("tpu", "cuda"), default="tpu")
  parser.add_argument("--topology", help="TPU 'v5e=2x2', 'v5p=2x2x1', 'v6e=2x2'; CUDA "
                      "'slices x hosts x gpus', e.g. 1x1x8 (default per platform)")
  parser.add_argument("--gpu_target", help="GpuTargetConfigProto text file (default: H100 SXM)")
  parser.add_argument("--gin_file", action="append", help="train step config(s); default 1b.gin")
  parser.add_argument("--gin_param", action="append", default=[], help="e.g. "
                      "\"ModelConfig.remat='full'\"")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--per_device_batch", type=int, default=1)
  parser.add_argument("--skip_kernels", action="store_true")
  parser.add_argument("--skip_train_step", action="store_true")
  parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
  args = parser.parse_args()
  topology = args.topology or DEFAULT_TOPOLOGY[args.platform]
  gpu_target = Path(args.gpu_target).read_text() if args.gpu_target else H100_TARGET
  cpu_host()
  if args.platform == "tpu":
    enable_kernel_dumps()
  devices = compile_only_devices(args.platform, topology, gpu_target)
  rows = []
  if not args.skip_kernels:
    cases = ([(jnp.bfloat16, 64), (jnp.bfloat16, 128)] if args.platform == "cuda" else
             [(jnp.bfloat16, 64), (jnp.bfloat16, 128), (jnp.float32, 128)])
    rows += [compile_attention(devices, args.platform, dtype, head_dim)
             for dtype, head_dim in cases]
    rows += [compile_attention(devices, args.platform, jnp.bfloat16, 64, mask=mask)
             for mask in ATTENTION_MASKS[1:]]
    rows.append(compile_paged_decode(devices, args.platform))
  if not args.skip_train_step:
    rows.append(compile_train_step(devices, args.platform, args.gin_file or ["1b.gin"],
                                   args.gin_param, args.seq_len, args.per_device_batch,
                                   gpu_target=gpu_target))
  print_table(args.platform, topology, rows)
  if args.json:
    print(json.dumps({"platform": args.platform, "topology": topology,
                      "device_kind": devices[0].device_kind, "devices": len(devices),
                      "jax": jax.__version__, "results": rows}))


if __name__ == "__main__":
  main()
