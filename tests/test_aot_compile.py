"""Deviceless ahead-of-time compiles (benchmarks/aot_compile.py): the compiled flash-attention
kernels and the FSDP train step go through the real TPU and CUDA compilers on this CPU host.

Marked `aot`, outside the default run: `pytest -m aot tests/test_aot_compile.py`. The TPU tests
need libtpu (`pip install -e '.[aot]'`), the CUDA tests the CUDA plugin (`pip install
'jax[cuda12]==<this jax>'`, or cuda13 as the lent H200s have); each skips without its
compiler. Small shapes: the figures for the 1b and 7b configs come from the script
(benchmarks/RESULTS.md).
"""

import importlib.util

import jax.numpy as jnp
import pytest

from benchmarks import aot_compile

pytestmark = pytest.mark.aot

KERNELS = ["flash_attention_dkdv", "flash_attention_dq", "flash_attention_forward"]
# tiny.gin widened so every per-device shard is whole (8, 128) TPU tiles: with tiny's d=192
# (48 per device of 4) the TPU layout pads shards and arguments come to 1.13x state / N.
SMALL = ["ModelConfig.vocab_size = 4096", "ModelConfig.embed_dim = 512", "ModelConfig.mlp_dim = 1024",
         "ModelConfig.num_heads = 4", "ModelConfig.num_kv_heads = 2", "ModelConfig.head_dim = 128",
         "ModelConfig.dtype = 'bfloat16'"]


@pytest.fixture(scope="module")
def tpu_devices():
  pytest.importorskip("libtpu", reason="needs libtpu: pip install -e '.[aot]'")
  aot_compile.cpu_host()
  aot_compile.enable_kernel_dumps()  # before libtpu starts, so Mosaic reports what it compiled
  return aot_compile.compile_only_devices("tpu", "v5e=2x2")


@pytest.fixture(scope="module")
def cuda_devices():
  if not any(importlib.util.find_spec(f"jax_cuda{version}_plugin") for version in (12, 13)):
    pytest.skip("needs pip install 'jax[cuda12]' or 'jax[cuda13]'")
  aot_compile.cpu_host()
  return aot_compile.compile_only_devices("cuda", "1x1x4")


@pytest.mark.parametrize("dtype, head_dim", [(jnp.bfloat16, 64), (jnp.bfloat16, 128),
                                             (jnp.float32, 128)])
def test_tpu_mosaic_compiles_forward_and_backward(tpu_devices, dtype, head_dim):
  result = aot_compile.compile_attention(tpu_devices, "tpu", dtype, head_dim)
  assert result["kernel_calls"] == 3   # forward, dq, dk/dv
  if aot_compile._tpu_dump_dir():  # pylint: disable=protected-access
    assert result["mosaic_llo"] == KERNELS   # libtpu's Mosaic compiled each one down to LLO


def test_tpu_train_step_shards_state_over_fsdp(tpu_devices):
  result = aot_compile.compile_train_step(tpu_devices, "tpu", ["tiny.gin"], SMALL, seq_len=256)
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  assert result["kernel_calls"] == 3 * 4   # three kernels in each of the 4 layers
  # Each device holds a quarter of parameters and optimizer moments (the step counter and
  # the batch's few KiB are the rest), and the donated state is aliased, not copied.
  assert 1.0 <= result["argument_vs_state_over_n"] < 1.01
  assert result["memory"]["alias"] >= 0.99 * result["memory"]["argument"] - 2**16


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_mosaic_gpu_compiles_forward_and_backward_through_ptxas(cuda_devices, head_dim):
  result = aot_compile.compile_attention(cuda_devices, "cuda", jnp.bfloat16, head_dim)
  assert result["kernel_calls"] == 3 and result["custom_calls"] == {"mosaic_gpu_v2": 3}
  # ptxas built each kernel for sm_90a: forward and dq store one tile by TMA, dk/dv two.
  assert sorted(k["tma_stores"] for k in result["ptxas"]) == [1, 1, 2]
  assert all(k["registers"] <= 255 for k in result["ptxas"])


@pytest.mark.parametrize("mask", ["prefix_lm", "branches"])
def test_cuda_triton_compiles_the_masks_mosaic_gpu_does_not_take(cuda_devices, mask):
  """Prefix-LM (an image's patches) and branch ids (DPO's shared prompts) fall back to the
  Triton kernels on CUDA: forward, dq and dk/dv, each a Triton call the compiler built."""
  result = aot_compile.compile_attention(cuda_devices, "cuda", jnp.bfloat16, 64, mask=mask)
  assert result["custom_calls"] == {"__gpu$xla.gpu.triton": 3}


def test_cuda_paged_decode_attention_compiles_the_ragged_kernel(cuda_devices):
  """The serving engine's decode attention on CUDA is the ragged paged Pallas kernel."""
  result = aot_compile.compile_paged_decode(cuda_devices, "cuda")
  assert result["custom_calls"] == {"__gpu$xla.gpu.triton": 1}


def test_cuda_train_step_shards_state_over_fsdp(cuda_devices):
  result = aot_compile.compile_train_step(cuda_devices, "cuda", ["tiny.gin"], SMALL, seq_len=256)
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  assert result["kernel_calls"] == 3 * 4
  assert 1.0 <= result["argument_vs_state_over_n"] < 1.01


@pytest.mark.parametrize("ids, mask_type", [("segment_ids", "CAUSAL"),
                                            ("bidirectional_ids", "NO_MASK")])
def test_cuda_cudnn_attention_with_a_mask_stays_causal_unless_a_prefix_is_bidirectional(
    cuda_devices, ids, mask_type):
  """With segment ids `_cudnn` passes cuDNN the dense mask and `is_causal` (on the H200, 4k
  packed: 224.7 TF/s forward against 127.3 with the mask alone), forward and backward; a
  bidirectional image prefix cannot be causal."""
  import re  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from maxlm.model import attention  # pylint: disable=import-outside-toplevel
  q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  id_array = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  whole = jax.sharding.NamedSharding(jax.sharding.Mesh(cuda_devices[:1], ("x",)),
                                     jax.sharding.PartitionSpec())

  def loss(q, k, v, given):
    return attention._cudnn(q, k, v, **{ids: given}).astype(jnp.float32).sum()  # noqa: SLF001

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=whole,
                 out_shardings=whole)
  text = step.lower(q, kv, kv, id_array).compile().as_text()
  assert text.count("cudnn$fmha") >= 2   # forward and backward
  assert set(re.findall(r'"mask_type":\s*"(\w+)"', text)) == {mask_type}
