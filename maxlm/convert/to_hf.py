"""A maxlm run dir as a Hugging Face Llama model directory.

  python -m maxlm.convert.to_hf --checkpoint_dir=RUN --output_dir=DIR [--overwrite]

DIR gets config.json, model-0000i-of-0000n.safetensors (each at most --max_shard_bytes) and
model.safetensors.index.json, and the tokenizer: tokenizer.model plus an equivalent
tokenizer.json, and tokenizer_config.json whose chat_template renders maxlm's chat template.
A LoRA run exports its adapters merged, and the adapters alone in PEFT's layout under
DIR/adapter/. The parameters are restored one layer at a time and written tensor by tensor,
so no more than one layer is in host memory. DIR must be new, empty or an earlier export (whose
weights this one replaces, other files staying), unless --overwrite replaces it whole.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from beam_pipelines import chat_template
from maxlm import checkpoint, runs, steps
from maxlm import tokenizer as tokenizer_lib
from maxlm.convert import hf_llama, hf_tokenizer, output_dirs, safetensors_file
from maxlm.convert.progress import Progress
from maxlm.errors import UserError
from maxlm.model import LORA_TARGETS, ModelConfig, layers

MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"
# In the index's metadata: what tells an earlier export, which a new one may update, from
# another model's files.
WRITTEN_BY = "maxlm.convert.to_hf"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ADAPTER_DIR = "adapter"


@dataclasses.dataclass(frozen=True)
class Tensor:
  name: str                 # Hugging Face's
  path: tuple               # maxlm's parameter path
  shape: tuple[int, ...]    # Hugging Face's

  def nbytes(self, dtype: np.dtype) -> int:
    return int(np.prod(self.shape)) * dtype.itemsize


class LayerReader:
  """A run's parameters one group at a time (a block, or a top-level parameter), LoRA
  adapters merged into their kernels when `merge`; keeps only the last group."""

  def __init__(self, run_dir: Path, config: ModelConfig, step: int, merge: bool):
    self.run_dir, self.config, self.step, self.merge = run_dir, config, step, merge
    _, abstract_state = steps.abstract_model(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    self._abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
        nnx.to_pure_dict(abstract_state))
    self._group, self._arrays = None, {}

  def __call__(self, path: tuple) -> np.ndarray:
    group = path[:2] if path[0] == "blocks" else path[:1]
    if group != self._group:
      subtree = _subtree(self._abstract, group)
      restored = runs.restore_params(self.run_dir, _nest(group, subtree), self.step)
      self._arrays = dict(_leaves(jax.tree.map(np.asarray, restored)))
      self._group = group
    array = self._arrays[path]
    kernel, name = path[:-1], str(path[-1])
    if self.merge and name in LORA_TARGETS and (*kernel, f"{name}_lora_a") in self._arrays:
      a, b = (self._arrays[(*kernel, f"{name}_lora_{part}")] for part in "ab")
      array = np.asarray(layers.merged_kernel(array, a, b, self.config.lora_scale))
    return array


def _subtree(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _nest(path: tuple, value) -> dict:
  for key in reversed(path):
    value = {key: value}
  return value


def _leaves(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def model_tensors(config: ModelConfig, adapters: bool) -> list[Tensor]:
  """The tensors of the export in file order (`adapters`: the LoRA factors alone)."""
  _, abstract_state = steps.abstract_model(config)
  tensors = []
  for path, shape in _leaves(nnx.to_pure_dict(abstract_state)):
    if ("_lora_" in str(path[-1])) != adapters:
      continue
    hf_shape = hf_llama.to_hf(path, np.empty(shape.shape, np.uint8)).shape
    tensors.append(Tensor(hf_llama.hf_name(path), path, hf_shape))
  return tensors


def shard_plan(tensors: list[Tensor], dtype: np.dtype, max_bytes: int) -> list[list[Tensor]]:
  """Consecutive tensors in shards of at most `max_bytes` (a larger tensor alone in one)."""
  shards, size = [[]], 0
  for tensor in tensors:
    nbytes = tensor.nbytes(dtype)
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(tensor)
    size += nbytes
  return shards


def merged_tensors(config: ModelConfig) -> list[Tensor]:
  """The model's tensors, a LoRA run's adapters merged into their kernels."""
  return model_tensors(dataclasses.replace(config, lora_rank=0), False)


def export_tensors(config: ModelConfig) -> list[Tensor]:
  """Every tensor an export writes: the merged model's, then a LoRA run's adapters."""
  return merged_tensors(config) + (model_tensors(config, True) if config.lora_rank else [])


def write_model(output_dir: Path, read: LayerReader, dtype: np.dtype, max_shard_bytes: int,
                progress: Progress) -> None:
  plan = shard_plan(merged_tensors(read.config), dtype, max_shard_bytes)
  weight_map, total = {}, 0
  for index, shard in enumerate(plan, 1):
    name = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
    by_name = {tensor.name: tensor for tensor in shard}
    safetensors_file.write(output_dir / name, [(t.name, t.shape, dtype) for t in shard],
                           _hf_tensor(by_name, read, dtype, progress), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(by_name, name)
    total += sum(t.nbytes(dtype) for t in shard)
  (output_dir / INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": total, "written_by": WRITTEN_BY}, "weight_map": weight_map},
      indent=2))


def is_export(directory: Path) -> bool:
  """Whether `directory` holds an export of ours (its shard index says so)."""
  try:
    index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return isinstance(index, dict) and isinstance(index.get("metadata"), dict) and (
      index["metadata"].get("written_by") == WRITTEN_BY)


def _hf_tensor(tensors: dict[str, Tensor], read: LayerReader, dtype: np.dtype,
               progress: Progress):
  """`make(name)` for `safetensors_file.write`: the named tensor in Hugging Face's layout."""
  def make(name: str) -> np.ndarray:
    tensor = tensors[name]
    array = hf_llama.to_hf(tensor.path, read(tensor.path))
    progress.advance(tensor.nbytes(dtype))
    return array
  return make


def write_adapter(adapter_dir: Path, read: LayerReader, dtype: np.dtype, base: str | None,
                  progress: Progress):
  """PEFT's layout: adapter_model.safetensors (lora_A [rank, in], lora_B [out, rank] per
  projection) and adapter_config.json."""
  config = read.config
  adapter_dir.mkdir(parents=True, exist_ok=True)
  tensors = {t.name: t for t in model_tensors(config, True)}
  safetensors_file.write(adapter_dir / "adapter_model.safetensors",
                         [(t.name, t.shape, dtype) for t in tensors.values()],
                         _hf_tensor(tensors, read, dtype, progress), metadata={"format": "pt"})
  (adapter_dir / "adapter_config.json").write_text(json.dumps({
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
      "lora_alpha": config.lora_alpha, "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
      "target_modules": [hf_llama.PROJECTIONS[name] for name in config.lora_targets],
      "base_model_name_or_path": base}, indent=2))


def write_tokenizer(output_dir: Path, tokenizer_file: Path, max_len: int) -> tuple[int, int]:
  """The tokenizer files; returns (bos id, eos id)."""
  tokenizer = tokenizer_lib.load(tokenizer_file)
  if tokenizer_file.suffix == ".json":
    tokenizer_lib.copy_into(tokenizer_file, output_dir)
    config_path = output_dir / tokenizer_lib.HF_TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not chat_template.missing_pieces(tokenizer, chat_template.CHAT_STOPS):
      config.setdefault("chat_template", hf_tokenizer.chat_template_jinja())
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return tokenizer.bos_id(), tokenizer.eos_id()
  tokenizer_lib.copy_into(tokenizer_file, output_dir)  # with an imported generation_config
  proto = tokenizer_file.read_bytes()
  (output_dir / tokenizer_lib.HF_TOKENIZER_FILE).write_text(
      json.dumps(hf_tokenizer.tokenizer_json(proto), ensure_ascii=False))
  bos, eos, pad, unk = (tokenizer.id_to_piece(token_id) if token_id >= 0 else None
                        for token_id in (tokenizer.bos_id(), tokenizer.eos_id(),
                                         tokenizer.pad_id(), tokenizer.unk_id()))
  config = hf_tokenizer.tokenizer_config(bos, eos, pad, unk, max_len)
  (output_dir / tokenizer_lib.HF_TOKENIZER_CONFIG).write_text(
      json.dumps(config, indent=2, ensure_ascii=False))
  return tokenizer.bos_id(), tokenizer.eos_id()


def export(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
           step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> ModelConfig:
  """Writes the Hugging Face model of a run's latest (or given) checkpoint, with progress on
  stderr; returns its (merged) ModelConfig. `output_dir` must be new, empty or an earlier
  export unless `overwrite`, which replaces it whole."""
  run_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
  if max_shard_bytes < 1:
    raise UserError(f"--max_shard_bytes={max_shard_bytes}; pass a positive number of bytes "
                    f"(the default is {MAX_SHARD_BYTES})")
  update = check_output_dir(output_dir, run_dir, overwrite)
  step, meta = checkpoint.read_meta(run_dir, step)
  config = checkpoint.config_from_meta(meta)
  if reason := hf_llama.unexportable(config):
    raise UserError(f"{run_dir} cannot be exported as a Hugging Face Llama: {reason}")
  dtype = dtype or (config.dtype if config.dtype in DTYPES else "float32")
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype}; choose one of {', '.join(DTYPES)}")
  _, tokenizer_file = checkpoint.run_paths(run_dir)
  if not tokenizer_file.is_file():
    raise UserError(f"{run_dir} has no tokenizer.model or tokenizer.json; copy the one it "
                    "was trained with there")
  merged = dataclasses.replace(config, lora_rank=0)
  tensors = export_tensors(config)
  progress = Progress("to_hf", len(tensors), sum(t.nbytes(DTYPES[dtype]) for t in tensors))
  publish_staged = publish if update else output_dirs.move_into_place
  with output_dirs.staged(output_dir, publish_staged) as staging:
    bos_id, eos_id = write_tokenizer(staging, tokenizer_file, config.max_seq_len)
    (staging / "config.json").write_text(json.dumps(
        hf_llama.hf_config(merged, dtype, bos_id, eos_id), indent=2))
    read = LayerReader(run_dir, config, step, merge=True)
    write_model(staging, read, DTYPES[dtype], max_shard_bytes, progress)
    if config.lora_rank:
      write_adapter(staging / ADAPTER_DIR, LayerReader(run_dir, config, step, merge=False),
                    DTYPES[dtype], meta.get("init_from"), progress)
  return merged


def check_output_dir(output_dir: Path, run_dir: Path, overwrite: bool) -> bool:
  """Whether the export updates an earlier one in `output_dir`; refuses a dir holding other
  files unless `overwrite`, and one that holds the run itself."""
  names = output_dirs.contents(output_dir)
  output_dirs.refuse_enclosing(output_dir, run_dir, "--checkpoint_dir")
  if names and not overwrite and not is_export(output_dir):
    raise output_dirs.not_empty_error(output_dir, names, "files of no earlier to_hf export")
  return bool(names) and not overwrite


def publish(staging: Path, output_dir: Path) -> None:
  """Moves every file of a finished export from `staging` into `output_dir`, the shard index
  last: an export that fails midway leaves `output_dir` as it was. Then removes the weights of
  an earlier export there that this one did not write (shards past its count, a lone
  `model.safetensors` a loader would read first, an adapter), as `save_pretrained` does;
  other files in `output_dir` stay."""
  output_dir.mkdir(parents=True, exist_ok=True)
  index = staging / INDEX_FILE
  files = [path for path in sorted(staging.rglob("*")) if path.is_file() and path != index]
  written = {path.relative_to(staging) for path in [*files, index]}
  for path in [*files, index]:
    target = output_dir / path.relative_to(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
  for pattern in ("model*.safetensors", f"{ADAPTER_DIR}/adapter_*"):
    for stale in output_dir.glob(pattern):
      if stale.relative_to(output_dir) not in written:
        stale.unlink()


def main(argv: list[str] | None = None):
  """Console entry: a user error prints one line and exits 2."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint_dir", required=True, help="the run dir to export")
  parser.add_argument("--output_dir", required=True, help="the Hugging Face model dir to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step; default latest")
  parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                      help="stored dtype; default the run's compute dtype (float32 unless it "
                           "is bfloat16)")
  parser.add_argument("--max_shard_bytes", type=int, default=MAX_SHARD_BYTES,
                      help="largest safetensors shard")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a --output_dir holding other files whole (once the export "
                           "is written)")
  args = parser.parse_args(argv)
  try:
    config = export(args.checkpoint_dir, args.output_dir, step=args.step, dtype=args.dtype,
                    max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)
  except (UserError, OSError, checkpoint.CorruptCheckpointError) as error:
    print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {args.output_dir}: {config.num_layers} layers, vocab {config.vocab_size}")


if __name__ == "__main__":
  main()
