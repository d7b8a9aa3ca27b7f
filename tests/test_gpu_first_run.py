"""benchmarks/gpu_first_run.py at its smoke sizes on CPU: the script a lent GPU runs first must
work before it gets there, and its checks must catch a wrong kernel."""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_first_run  # noqa: E402
from kernels_pallas import reference_attention  # noqa: E402


def test_smoke_run_checks_every_kernel_against_the_reference(tmp_path):
  out = tmp_path / "figures.json"
  result = gpu_first_run.main(["--smoke", f"--json={out}",
                               "--attention_impls=pallas,xla,cudnn",
                               "--train_attentions=pallas,cudnn,xla", "--train_remats=none,full"])
  assert json.loads(out.read_text())["smoke"] is True
  attention = {(row["variant"], row["impl"]): row for row in result["attention"]}
  for variant in ("causal", "packed", "prefix_lm"):
    for impl in ("pallas", "xla"):
      row = attention[variant, impl]
      assert row["status"] == "ok", row
      assert row["fwd_error"] < 1e-2 and row["grad_error"] < 1e-2, row
    # No cuDNN on a CPU: the row says so instead of passing.
    assert attention[variant, "cudnn"]["status"] == "error"
  paged = {(row["kind"], row["impl"]): row for row in result["paged"]}
  assert {key for key, row in paged.items() if row["status"] == "ok"} == {
      ("decode", "paged_kernel"), ("decode", "xla_chunked"), ("decode", "xla_gather"),
      ("prefill", "xla_chunked"), ("prefill", "xla_gather")}
  [moe] = result["moe"]
  assert moe["status"] == "ok" and moe["error"] < 1e-5, moe
  assert sum(moe["group_sizes"]) == moe["copies"]
  # The padded road gives every row what ragged_dot gives it, not only the checked blocks.
  assert moe["padded_error"] < 1e-5 and moe["padded_vs_grouped_max_difference"] < 1e-4, moe
  # timm may be missing here: our side is measured all the same, in each precision.
  assert [vit["precision"] for vit in result["vit"]] == ["bfloat16", "float32"]
  for vit in result["vit"]:
    assert vit["status"] in ("ok", "no timm") and vit["vit_images_per_s"] > 0, vit
    assert vit["config"]["embed_dim"] == 128  # configs/vision_tiny_sft.gin's tower
  train = {(row["attention"], row["remat"]): row for row in result["train"]}
  assert len(train) == 6
  for remat in ("none", "full"):
    assert train["pallas", remat]["status"] == train["xla", remat]["status"] == "ok"
    assert np.isclose(train["pallas", remat]["first_loss"], np.log(256), atol=0.5)


def test_a_wrong_kernel_is_marked_bad(monkeypatch):
  def no_causal_mask(q, k, v, segment_ids=None, bidirectional_ids=None):
    return reference_attention(q, k, v, causal=False)

  monkeypatch.setattr(gpu_first_run, "attention_impls",
                      lambda smoke: {"no_causal_mask": no_causal_mask})
  rows = gpu_first_run.attention_rows(gpu_first_run.SMOKE, smoke=True)
  assert [row["status"] for row in rows] == ["BAD"] * 3
  assert gpu_first_run.verdict(gpu_first_run.relative_error(
      jnp.array([np.nan, 1.0]), jnp.array([1.0, 1.0]))) == "BAD"
