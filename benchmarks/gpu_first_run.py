"""The first run on a lent CUDA GPU, in one call: the flash kernels against the XLA attention
and cuDNN at 2k/4k/8k, the ragged paged decode kernel and the chunked prefill against the XLA
gather, the dropless MoE path's grouped matmul (`jax.lax.ragged_dot`) against a dense matmul
of the same FLOPs, then the 1b train step's MFU with each attention; last, issue 13's ViT
forward+backward against timm's on the same GPU, in bfloat16 and in float32 (`vit_timm`: the
image holds timm).

  python benchmarks/gpu_first_run.py [--json=PATH]
      [--sections=ceilings,train,moe,attention,paged,vit]
      [--budget_s=420] [--smoke] [--attention_impls=pallas,cudnn]
      [--train_attentions=cudnn,pallas] [--train_remats=none,full]

Every kernel is checked before it is timed, on fresh random inputs, by ||out - ref|| / ||ref||
against a float32 reference computed at `precision=highest` from the same inputs upcast
(`kernels_pallas.reference_attention`; for decode, float64 NumPy): bfloat16 operands land near
1e-3 to 1e-2; a NaN or an error over 5e-2 is marked BAD. Forward+backward checks dq, dk and dv
against the reference's `jax.vjp` as well. Times are medians over rounds of `--calls` calls
each after a warm-up (compile time is reported apart); TFLOP/s counts causal attention's
visible half (forward 4·B·H·S²·D/2, forward+backward 3.5 times that).

Ceilings measured here first: a bfloat16 8192^3 matmul (the practical peak MFU is also given
against) and a device-to-device copy. Any variant that fails prints its error's first line and
the run goes on; sections past `--budget_s` are skipped (a lent machine's time is short).

--smoke runs tiny sizes on whatever backend is there (the Pallas interpreter on CPU), so that
this script is exercised by tests/test_gpu_first_run.py before any GPU sees it.

On the lent H200 (its image has JAX 0.11.2 and optax; gin-config, zstandard and the flax maxlm
was tested with travel as wheels), from the repository root here:
  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
      gin-config==0.5.0 zstandard==0.25.0 flax==0.12.12
then one device call, carrying .whl:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
  timeout 570 python3 benchmarks/gpu_first_run.py --json=$OUT/gpu_first_run.json
"""

import argparse
import dataclasses
import functools
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import kernels_pallas  # noqa: E402
from benchmarks import vit_timm  # noqa: E402
from benchmarks.train_step import one_device_step  # noqa: E402
from maxlm.model import ModelConfig, layers, paged_kv, training_flops_per_token  # noqa: E402
from maxlm.model import attention as fused  # noqa: E402

# H200 / H100 SXM datasheet: dense bfloat16 tensor-core peak.
DATASHEET_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12}
BAD_ERROR = 5e-2


@dataclasses.dataclass(frozen=True)
class Sizes:
  seq_lens: tuple[int, ...]
  tokens_per_batch: int      # attention timing batch = tokens_per_batch // seq_len
  heads: int
  kv_heads: int
  head_dim: int
  matmul: int
  decode_rows: int
  decode_max_len: int
  block_size: int
  prefill_len: int
  train_config: dict
  train_batch: int
  train_seq: int
  moe: tuple[int, int, int, int]  # token copies (tokens x top-k), experts, embed, expert width
  calls: int
  rounds: int
  vit_rounds: int = 7      # alternating rounds of ours and timm's ViT step
  vit_seconds: float = 2.0


FULL = Sizes(seq_lens=(2048, 4096, 8192), tokens_per_batch=32768, heads=32, kv_heads=8,
             head_dim=64, matmul=8192, decode_rows=64, decode_max_len=4096, block_size=32,
             prefill_len=2048,
             train_config=dict(vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32,
                               num_kv_heads=8, head_dim=64, mlp_dim=8192, max_seq_len=8192,
                               rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16",
                               remat="full"),
             train_batch=8, train_seq=4096, moe=(65536, 8, 2048, 1408), calls=10, rounds=5)
SMOKE = Sizes(seq_lens=(64,), tokens_per_batch=64, heads=4, kv_heads=2, head_dim=64,
              matmul=256, decode_rows=4, decode_max_len=96, block_size=16, prefill_len=64,
              train_config=dict(vocab_size=256, num_layers=2, embed_dim=64, num_heads=4,
                                num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128,
                                dtype="bfloat16", remat="full"),
              train_batch=2, train_seq=64, moe=(256, 4, 64, 32), calls=2, rounds=2,
              vit_rounds=1, vit_seconds=0.1)


def first_line(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip().splitlines()
  return text[0][:300] if text else type(error).__name__


def mark_failed(row: dict, error: BaseException):
  """A variant that did not run is a result too: status "error", its error's first line as
  "error_text" (a row's other "error" fields are its numeric checks)."""
  row["status"], row["error_text"] = "error", first_line(error)


def timed(call, calls: int, rounds: int) -> tuple[float, float]:
  """(first call's seconds, compile included; median seconds per call over rounds)."""
  started = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - started
  jax.block_until_ready(call())
  per_call = []
  for _ in range(rounds):
    started = time.perf_counter()
    for _ in range(calls):
      out = call()
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - started) / calls)
  return first, statistics.median(per_call)


def relative_error(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("nan")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def verdict(error: float) -> str:
  return "ok" if np.isfinite(error) and error <= BAD_ERROR else "BAD"


# --- ceilings ----------------------------------------------------------------------------


def ceilings(sizes: Sizes) -> dict:
  n = sizes.matmul
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  _, matmul_s = timed(lambda: matmul(a, b), sizes.calls, sizes.rounds)
  copy_source = jax.random.normal(jax.random.key(2), (16 * n, n), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)  # one read and one write of every byte
  _, copy_s = timed(lambda: copy(copy_source), sizes.calls, sizes.rounds)
  return {"matmul_bf16_flops": 2 * n ** 3 / matmul_s,
          "copy_bytes_per_s": 2 * copy_source.nbytes / copy_s}


# --- training attention --------------------------------------------------------------------


def attention_inputs(key, batch: int, seq: int, sizes: Sizes, dtype=jnp.bfloat16):
  kq, kk, kv, kd = jax.random.split(key, 4)
  shape_q = (batch, seq, sizes.heads, sizes.head_dim)
  shape_kv = (batch, seq, sizes.kv_heads, sizes.head_dim)
  return (jax.random.normal(kq, shape_q, dtype), jax.random.normal(kk, shape_kv, dtype),
          jax.random.normal(kv, shape_kv, dtype), jax.random.normal(kd, shape_q, dtype))


def attention_impls(smoke: bool) -> dict:
  """name -> attention(q, k, v, segment_ids, bidirectional_ids)."""
  def pallas(q, k, v, segment_ids=None, bidirectional_ids=None):
    return kernels_pallas.flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                          bidirectional_ids=bidirectional_ids,
                                          interpret=True if smoke else None)

  def xla(q, k, v, segment_ids=None, bidirectional_ids=None):
    return layers.causal_attention(q, k, v, segment_ids, bidirectional_ids=bidirectional_ids)

  def cudnn(q, k, v, segment_ids=None, bidirectional_ids=None):
    return fused._cudnn(q, k, v, segment_ids, bidirectional_ids)  # noqa: SLF001

  return {"pallas": pallas, "xla": xla, "cudnn": cudnn}


def reference_and_grads(q, k, v, do, ids: dict):
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(lambda q, k, v: kernels_pallas.reference_attention(q, k, v, causal=True,
                                                                          **ids), *upcast)
    grads = vjp(do.astype(jnp.float32))
  return out, grads


def variant_ids(variant: str, batch: int, seq: int) -> dict:
  """The masks a variant adds: none (causal), four packed documents a row, or an image prefix
  of a quarter of the row seen whole (prefix-LM)."""
  if variant == "causal":
    return {}
  if variant == "packed":
    return {"segment_ids": jnp.broadcast_to(1 + jnp.arange(seq) // (seq // 4), (batch, seq))}
  if variant == "prefix_lm":
    return {"bidirectional_ids": jnp.broadcast_to(
        jnp.where(jnp.arange(seq) < seq // 4, 1, 0), (batch, seq))}
  raise ValueError(variant)


def attention_rows(sizes: Sizes, smoke: bool, on_row=lambda row: None,
                   wanted=None) -> list[dict]:
  impls = {name: impl for name, impl in attention_impls(smoke).items()
           if wanted is None or name in wanted}
  plan = [(seq, "causal") for seq in sizes.seq_lens]
  plan += [(sizes.seq_lens[len(sizes.seq_lens) // 2], "packed"),
           (sizes.seq_lens[0], "prefix_lm")]
  rows = []
  for seq, variant in plan:
    check_inputs = attention_inputs(jax.random.key(seq + 1), 1, seq, sizes)
    ids_check = variant_ids(variant, 1, seq)
    ref_out, ref_grads = reference_and_grads(*check_inputs, ids_check)
    batch = max(1, sizes.tokens_per_batch // seq)
    q, k, v, do = attention_inputs(jax.random.key(seq), batch, seq, sizes)
    ids = variant_ids(variant, batch, seq)
    fwd_flops = 4 * batch * sizes.heads * seq * seq * sizes.head_dim / 2
    for name, impl in impls.items():
      row = {"seq": seq, "batch": batch, "variant": variant, "impl": name}
      if name == "pallas" and not smoke:
        row["backend"] = ("triton" if variant == "prefix_lm"  # see flash_attention's docstring
                          else kernels_pallas.gpu_backend(q, k, v)[0])
      try:
        forward = jax.jit(lambda q, k, v, ids, impl=impl: impl(q, k, v, **ids))
        gradient = jax.jit(jax.grad(
            lambda q, k, v, do, ids, impl=impl: jnp.sum(
                impl(q, k, v, **ids).astype(jnp.float32) * do.astype(jnp.float32)),
            argnums=(0, 1, 2)))
        cq, ck, cv, cdo = check_inputs
        row["fwd_error"] = relative_error(forward(cq, ck, cv, ids_check), ref_out)
        got = gradient(cq, ck, cv, cdo, ids_check)
        row["grad_error"] = max(relative_error(g, r) for g, r in zip(got, ref_grads))
        row["compile_fwd_s"], row["fwd_s"] = timed(lambda: forward(q, k, v, ids), sizes.calls,
                                                   sizes.rounds)
        row["compile_grad_s"], row["fwd_bwd_s"] = timed(lambda: gradient(q, k, v, do, ids),
                                                        sizes.calls, sizes.rounds)
        row["fwd_tflops"] = fwd_flops / row["fwd_s"] / 1e12
        row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_s"] / 1e12
        row["status"] = verdict(max(row["fwd_error"], row["grad_error"]))
      except Exception as error:  # noqa: BLE001
        mark_failed(row, error)
      rows.append(row)
      on_row(row)
      print_attention_row(row)
  return rows


def print_attention_row(row: dict):
  if row["status"] == "error":
    print(f"  {row['variant']:>9} {row['seq']:>5} {row['impl']:>6}: {row['error_text']}")
    return
  print(f"  {row['variant']:>9} {row['seq']:>5} x{row['batch']:<3} {row['impl']:>6}"
        f"{'/' + row['backend'] if 'backend' in row else '':<11} "
        f"fwd {row['fwd_s'] * 1e3:8.3f} ms {row['fwd_tflops']:7.1f} TF/s  "
        f"fwd+bwd {row['fwd_bwd_s'] * 1e3:8.3f} ms {row['fwd_bwd_tflops']:7.1f} TF/s  "
        f"err {row['fwd_error']:.1e}/{row['grad_error']:.1e} {row['status']}  "
        f"(compile {row['compile_fwd_s']:.1f}+{row['compile_grad_s']:.1f} s)")


# --- serving attention: a decode step and a prefill chunk over the block pool ---------------


def paged_layer(sizes: Sizes, lengths: np.ndarray, dtype=jnp.bfloat16, seed: int = 0):
  """A pool whose rows own shuffled blocks, and its block table."""
  rng = np.random.default_rng(seed)
  width = -(-int(lengths.max()) // sizes.block_size)
  blocks_needed = [-(-int(n) // sizes.block_size) for n in lengths]
  num_blocks = 1 + sum(blocks_needed)
  owners = rng.permutation(np.arange(1, num_blocks))
  table = np.zeros((len(lengths), width), np.int32)
  start = 0
  for row, count in enumerate(blocks_needed):
    table[row, :count] = owners[start:start + count]
    start += count
  shape = (sizes.kv_heads, num_blocks, sizes.block_size, sizes.head_dim)
  k = rng.standard_normal(shape, np.float32)
  v = rng.standard_normal(shape, np.float32)
  return {"k": jnp.asarray(k, dtype), "v": jnp.asarray(v, dtype),
          "block_table": jnp.asarray(table)}


def paged_reference(layer, q, positions) -> np.ndarray:
  """float64 NumPy: each query over its row's positions up to its own."""
  k, v = (np.asarray(layer[name].astype(jnp.float32), np.float64) for name in ("k", "v"))
  table = np.asarray(layer["block_table"])
  q = np.asarray(q.astype(jnp.float32), np.float64)
  batch, q_len, heads, head_dim = q.shape
  group = heads // k.shape[0]
  out = np.zeros_like(q)
  for row in range(batch):
    keys = k[:, table[row]].reshape(k.shape[0], -1, head_dim)
    values = v[:, table[row]].reshape(v.shape[0], -1, head_dim)
    for t in range(q_len):
      seen = int(positions[row, t]) + 1
      for head in range(heads):
        scores = keys[head // group, :seen] @ q[row, t, head] / np.sqrt(head_dim)
        weights = np.exp(scores - scores.max())
        out[row, t, head] = weights @ values[head // group, :seen] / weights.sum()
  return out


def paged_rows(sizes: Sizes, smoke: bool, on_row=lambda row: None) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  lengths = rng.integers(1, sizes.decode_max_len + 1, sizes.decode_rows)
  decode_layer = paged_layer(sizes, lengths)
  q = jax.random.normal(jax.random.key(3), (sizes.decode_rows, 1, sizes.heads, sizes.head_dim),
                        jnp.bfloat16)
  positions = jnp.asarray(lengths - 1, jnp.int32)[:, None]
  check_rows = min(4, sizes.decode_rows)
  check_layer = {**decode_layer, "block_table": decode_layer["block_table"][:check_rows]}
  decode_ref = paged_reference(check_layer, q[:check_rows], np.asarray(positions[:check_rows]))
  def paged_kernel(layer, q, positions):  # what paged_kv.attend runs on CUDA
    return kernels_pallas.paged_attention(q[:, 0], layer["k"], layer["v"], layer["block_table"],
                                          positions[:, 0] + 1, interpret=smoke)[:, None]

  decoders = {"paged_kernel": paged_kernel, "xla_chunked": paged_kv.chunked_attend,
              "xla_gather": paged_kv.gathered_attend}
  prefill_lengths = np.full(1, sizes.prefill_len + sizes.prefill_len // 2)
  prefill_layer = paged_layer(sizes, prefill_lengths, seed=1)
  chunk = sizes.prefill_len // 2
  prefill_q = jax.random.normal(jax.random.key(4), (1, chunk, sizes.heads, sizes.head_dim),
                                jnp.bfloat16)
  prefill_positions = jnp.arange(sizes.prefill_len, sizes.prefill_len + chunk)[None]
  prefill_ref = paged_reference(prefill_layer, prefill_q[:, ::max(1, chunk // 8)],
                                np.asarray(prefill_positions[:, ::max(1, chunk // 8)]))
  prefills = {"xla_chunked": paged_kv.attend, "xla_gather": paged_kv.gathered_attend}
  cases = [("decode", decoders, decode_layer, q, positions, check_layer, decode_ref),
           ("prefill", prefills, prefill_layer, prefill_q, prefill_positions, None, prefill_ref)]
  for kind, impls, layer, queries, where, check_layer_, ref in cases:
    for name, impl in impls.items():
      row = {"kind": kind, "impl": name, "rows": int(queries.shape[0]),
             "q_len": int(queries.shape[1]), "max_len": int(where.max()) + 1}
      try:
        run = jax.jit(impl)
        if kind == "decode":
          got = np.asarray(run(check_layer_, queries[:check_rows], where[:check_rows]))
        else:
          got = np.asarray(run(layer, queries, where))[:, ::max(1, chunk // 8)]
        row["error"] = relative_error(got, ref)
        row["compile_s"], row["seconds"] = timed(lambda: run(layer, queries, where),
                                                 sizes.calls, sizes.rounds)
        kv_bytes = 2 * layer["k"].dtype.itemsize * sizes.kv_heads * sizes.head_dim
        read = (int(lengths.sum()) if kind == "decode" else int(prefill_lengths.sum())) * kv_bytes
        row["kv_gb_per_s"] = read / row["seconds"] / 1e9
        row["status"] = verdict(row["error"])
      except Exception as error:  # noqa: BLE001
        mark_failed(row, error)
      rows.append(row)
      on_row(row)
      if row["status"] == "error":
        print(f"  {kind:>7} {name:>12}: {row['error_text']}")
      else:
        print(f"  {kind:>7} {name:>12} rows {row['rows']:>3} q {row['q_len']:>4} "
              f"to {row['max_len']:>5}: {row['seconds'] * 1e3:8.3f} ms "
              f"{row['kv_gb_per_s']:7.1f} GB/s of KV  err {row['error']:.1e} {row['status']}")
  return rows


# --- MoE: the dropless path's grouped matmul ----------------------------------------------


def padded_grouped_matmul(lhs, rhs, group_sizes, capacity: int):
  """`ragged_dot`'s result by another road: each expert's rows gathered into a [experts,
  capacity] block (zeros past its group), one batched matmul, the rows gathered back."""
  experts, rows = rhs.shape[0], lhs.shape[0]
  starts = jnp.cumsum(group_sizes) - group_sizes
  slots = jnp.arange(capacity)
  taken = jnp.minimum(starts[:, None] + slots, rows - 1)
  blocks = jnp.where((slots < group_sizes[:, None])[..., None], lhs[taken], 0)
  out = jnp.einsum("ecd,edf->ecf", blocks, rhs, preferred_element_type=jnp.float32)
  expert_of_row = jnp.repeat(jnp.arange(experts), group_sizes, total_repeat_length=rows)
  return out[expert_of_row, jnp.arange(rows) - starts[expert_of_row]]


def moe_rows(sizes: Sizes) -> list[dict]:
  """`jax.lax.ragged_dot` (what `maxlm.model.moe`'s dropless path runs) over token copies
  sorted by expert, uneven groups, against one dense matmul of the same FLOPs, and against
  `padded_grouped_matmul` (every group padded to the largest: more FLOPs, one batched matmul;
  on the H200 ragged_dot ran at 0.13x the dense matmul's rate)."""
  copies, experts, embed, width = sizes.moe
  rng = np.random.default_rng(0)
  shares = rng.dirichlet(np.full(experts, 4.0))  # uneven loads, as a router gives
  group_sizes = np.floor(shares * copies).astype(np.int32)
  group_sizes[-1] += copies - group_sizes.sum()
  lhs = jax.random.normal(jax.random.key(5), (copies, embed), jnp.bfloat16)
  rhs = jax.random.normal(jax.random.key(6), (experts, embed, width), jnp.bfloat16)
  dense_rhs = rhs[0]
  grouped = jax.jit(lambda lhs, rhs, sizes: jax.lax.ragged_dot(
      lhs, rhs, sizes, preferred_element_type=jnp.float32))
  dense = jax.jit(lambda lhs, rhs: jnp.matmul(lhs, rhs, preferred_element_type=jnp.float32))
  padded = jax.jit(functools.partial(padded_grouped_matmul, capacity=int(group_sizes.max())))
  sizes_array = jnp.asarray(group_sizes)
  row = {"copies": copies, "experts": experts, "embed": embed, "width": width,
         "group_sizes": group_sizes.tolist()}
  try:
    got = np.asarray(grouped(lhs, rhs, sizes_array))
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    reference = []  # each group's first rows against its own expert's matrix, float64
    for expert in np.flatnonzero(group_sizes)[:4]:
      start, count = int(bounds[expert]), min(64, int(group_sizes[expert]))
      block = np.asarray(lhs[start:start + count].astype(jnp.float32), np.float64)
      reference.append((start, block @ np.asarray(rhs[expert].astype(jnp.float32), np.float64)))
    row["error"] = max(relative_error(got[start:start + len(ref)], ref) for start, ref in reference)
    got_padded = np.asarray(padded(lhs, rhs, sizes_array))
    row["padded_error"] = max(relative_error(got_padded[start:start + len(ref)], ref)
                              for start, ref in reference)
    row["padded_vs_grouped_max_difference"] = float(np.max(np.abs(got_padded - got)))
    flops = 2 * copies * embed * width
    row["compile_grouped_s"], row["grouped_s"] = timed(lambda: grouped(lhs, rhs, sizes_array),
                                                       sizes.calls, sizes.rounds)
    row["compile_dense_s"], row["dense_s"] = timed(lambda: dense(lhs, dense_rhs), sizes.calls,
                                                   sizes.rounds)
    row["grouped_tflops"], row["dense_tflops"] = (flops / row["grouped_s"] / 1e12,
                                                  flops / row["dense_s"] / 1e12)
    row["grouped_vs_dense"] = row["dense_s"] / row["grouped_s"]
    row["compile_padded_s"], row["padded_s"] = timed(lambda: padded(lhs, rhs, sizes_array),
                                                     sizes.calls, sizes.rounds)
    row["padded_vs_grouped"] = row["grouped_s"] / row["padded_s"]
    row["status"] = verdict(max(row["error"], row["padded_error"]))
    print(f"  ragged_dot {copies} x {embed} -> {width}, {experts} experts: "
          f"{row['grouped_s'] * 1e3:.3f} ms {row['grouped_tflops']:.1f} TF/s; dense matmul of the "
          f"same FLOPs {row['dense_s'] * 1e3:.3f} ms {row['dense_tflops']:.1f} TF/s; ratio "
          f"{row['grouped_vs_dense']:.2f}; err {row['error']:.1e} {row['status']}")
    print(f"  padded to the largest group ({int(group_sizes.max())} rows): "
          f"{row['padded_s'] * 1e3:.3f} ms, {row['padded_vs_grouped']:.2f}x ragged_dot; "
          f"err {row['padded_error']:.1e}")
  except Exception as error:  # noqa: BLE001
    mark_failed(row, error)
    print(f"  ragged_dot: {row['error_text']}")
  return [row]


# --- the 1b train step ---------------------------------------------------------------------


def train_rows(sizes: Sizes, peak: float | None, attentions: list[str], remats: list[str],
               on_row=lambda row: None) -> list[dict]:
  """The 1b step for each attention, and within it each rematerialization policy, in order.
  `peak_gib` is the process's peak so far (JAX keeps no per-step one): read it for the first
  row, or for a row bigger than every one before it."""
  rows = []
  batch, seq = sizes.train_batch, sizes.train_seq
  rng = np.random.default_rng(0)
  data = {"tokens": rng.integers(0, sizes.train_config["vocab_size"], (batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
          "segment_ids": np.ones((batch, seq), np.int32)}
  device = jax.devices()[0]
  datasheet = next((flops for name, flops in DATASHEET_BF16_FLOPS.items()
                    if name in device.device_kind), None)
  for attention, remat in itertools.product(attentions, remats):
    config = ModelConfig(**{**sizes.train_config, "remat": remat}, attention=attention)
    row = {"attention": attention, "batch": batch, "seq": seq, "remat": config.remat}
    try:
      if attention == "cudnn" and jax.default_backend() != "gpu":
        raise RuntimeError(f"cuDNN needs a CUDA device; this is {jax.default_backend()}")
      train_step = one_device_step(config, data, learning_rate=1e-4)
      losses = []

      def step():
        losses.append(train_step()["loss"])
        return losses[-1]

      row["compile_s"], row["step_s"] = timed(step, 1, sizes.rounds)
      losses = [float(loss) for loss in losses]
      row["first_loss"], row["last_loss"] = losses[0], losses[-1]
      flops = training_flops_per_token(config, seq) * batch * seq
      row["tokens_per_s"] = batch * seq / row["step_s"]
      row["model_tflops"] = flops / row["step_s"] / 1e12
      row["mfu_vs_datasheet"] = datasheet and flops / row["step_s"] / datasheet
      row["mfu_vs_measured_matmul"] = peak and flops / row["step_s"] / peak
      stats = device.memory_stats() or {}
      row["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
      row["status"] = "ok" if all(np.isfinite(losses)) else "BAD"
      del train_step  # its state and batch, before the next attention's
    except Exception as error:  # noqa: BLE001
      mark_failed(row, error)
    rows.append(row)
    on_row(row)
    label = attention if len(remats) == 1 else f"{attention}, remat {remat}"
    if row["status"] == "error":
      print(f"  {label:>6}: {row['error_text']}")
    else:
      mfu = row["mfu_vs_datasheet"]
      print(f"  {label:>6}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['model_tflops']:.1f} TFLOP/s, MFU {mfu if mfu is None else f'{mfu:.3f}'} "
            f"(datasheet), {row['mfu_vs_measured_matmul'] or 0:.3f} (measured matmul), "
            f"peak {row['peak_gib']:.1f} GiB, loss {row['first_loss']:.3f} -> "
            f"{row['last_loss']:.3f}, compile {row['compile_s']:.0f} s  {row['status']}")
  return rows


def vit_rows(sizes: Sizes) -> list[dict]:
  """Issue 13's `vit_ratio_vs_timm` on this device: `configs/vision_tiny_sft.gin`'s ViT
  forward+backward against timm's of the same shape and FLOPs (`benchmarks/vit_timm.py`'s
  pairing, as `benchmarks/vision.py` runs it on a CPU; timm on the CUDA GPU beside ours), a
  row per precision: bfloat16 mixed precision, and float32 (TF32 matmuls on both sides)."""
  config = vit_timm.config_of_gin_file(REPO_ROOT / "configs" / "vision_tiny_sft.gin")
  rows = []
  for precision in vit_timm.PRECISIONS:
    row = {"config": dataclasses.asdict(config), "batch": vit_timm.VIT_BATCH,
           "precision": precision}
    try:
      row.update(vit_timm.paired_summary(config, sys.executable, sizes.vit_rounds,
                                         sizes.vit_seconds, precision))
      row["status"] = "ok" if row["timm_images_per_s"] else "no timm"
      print(f"  {precision}: ours {row['vit_images_per_s']:,.0f} images/s, timm "
            f"{row['timm_images_per_s'] or 0:,.0f}; ratio {row['ratio_vs_timm'] or 0:.3f} "
            f"(matmuls {row['matmul_ratio_vs_torch'] or 0:.3f})")
    except Exception as error:  # noqa: BLE001
      mark_failed(row, error)
      print(f"  vit {precision}: {row['error_text']}")
    rows.append(row)
  return rows


# Run in this order: what the last lease (2026-12-04, H200) left open first.
SECTIONS = ("ceilings", "train", "moe", "attention", "paged", "vit")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write every figure to this file")
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="sections that would start after this many seconds are skipped")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, any backend")
  parser.add_argument("--attention_impls", default="pallas,cudnn",
                      help="the attentions timed side by side, of pallas, cudnn, xla (XLA's "
                           "compiles took 22 to 65 s each on the "
                           "H200, and its figures are in RESULTS.md: add it when time allows)")
  parser.add_argument("--train_attentions", default="cudnn,pallas",
                      help="the attentions the 1b train step is timed with, in order")
  parser.add_argument("--train_remats", default="none,full",
                      help="ModelConfig.remat policies timed for each of those attentions "
                           "(full, save_dots, none; 1b.gin trains with none: deviceless on "
                           "one H100 its step's peak is 54.4 GiB, 40.0 with full)")
  args = parser.parse_args(argv)
  wanted = args.sections.split(",")
  if unknown := sorted(set(wanted) - set(SECTIONS)):
    parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
  sizes = SMOKE if args.smoke else FULL
  device = jax.devices()[0]
  result = {"device": device.device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "smoke": args.smoke}
  print(f"{device.device_kind} ({jax.default_backend()}), JAX {jax.__version__}")
  started = time.perf_counter()

  def save():  # after every row: a timeout still leaves what was measured
    result["seconds"] = time.perf_counter() - started
    if args.json:
      Path(args.json).write_text(json.dumps(result, indent=1, default=float))

  for section in SECTIONS:
    if section not in wanted:
      continue
    if time.perf_counter() - started > args.budget_s:
      print(f"{section}: skipped, past --budget_s={args.budget_s:.0f}")
      result[section] = "skipped"
      continue
    print(f"== {section}")
    result[section] = measured = []

    def on_row(row, measured=measured):
      measured.append(row)
      save()

    try:
      if section == "ceilings":
        result[section] = ceilings(sizes)
        print(f"  bf16 matmul {result[section]['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s, copy "
              f"{result[section]['copy_bytes_per_s'] / 1e9:.0f} GB/s")
      elif section == "attention":
        result[section] = attention_rows(sizes, args.smoke, on_row,
                                         args.attention_impls.split(","))
      elif section == "paged":
        result[section] = paged_rows(sizes, args.smoke, on_row)
      elif section == "moe":
        result[section] = moe_rows(sizes)
      elif section == "vit":
        result[section] = vit_rows(sizes)
      else:
        peak = result.get("ceilings", {}).get("matmul_bf16_flops")
        result[section] = train_rows(sizes, peak, args.train_attentions.split(","),
                                     args.train_remats.split(","), on_row)
    except Exception as error:  # noqa: BLE001 — the next section may still run
      traceback.print_exc()
      result[section] = {"error": first_line(error), "rows": measured}
    save()
    sys.stdout.flush()
  return result


if __name__ == "__main__":
  main()
