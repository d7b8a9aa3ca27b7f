"""A Hugging Face Llama checkpoint (config.json, *.safetensors, a tokenizer) as a maxlm run dir.

  python -m maxlm.convert.from_hf --hf_dir=DIR --output_dir=RUN

RUN is an ordinary run dir (checkpoint step 0 holding the parameters, its meta, the tokenizer):
`maxlm.train --init_from=RUN`, `serving.server --checkpoint_dir=RUN` and `maxlm.to_hf` take it
as they take a trained run. Tensors are read one at a time from memory-mapped files; the
parameters are stored in float32, as training keeps them, and a bfloat16 checkpoint computes
in bfloat16 (ModelConfig.dtype).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from maxlm import array_digest, checkpoint, steps
from maxlm import tokenizer as tokenizer_lib
from maxlm.convert import hf_llama
from maxlm.convert.safetensors_file import SafetensorsFile
from maxlm.errors import UserError
from maxlm.model import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that are no parameter: RoPE's cached frequencies.
NON_PARAMETERS = ("rotary_emb.inv_freq",)


def read_config(hf_dir: Path) -> tuple[dict, ModelConfig]:
  path = hf_dir / "config.json"
  if not path.is_file():
    raise UserError(f"--hf_dir {hf_dir} has no config.json; point it at a Hugging Face model "
                    "directory")
  hf = json.loads(path.read_text())
  return hf, hf_llama.model_config(hf)


def weight_files(hf_dir: Path) -> dict[str, SafetensorsFile]:
  """{tensor name: the file holding it} from the index, or from every *.safetensors."""
  index = hf_dir / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: SafetensorsFile(hf_dir / name) for name in sorted(set(weight_map.values()))}
    return {tensor: files[name] for tensor, name in weight_map.items()}
  paths = sorted(hf_dir.glob("*.safetensors"))
  if not paths:
    raise UserError(f"--hf_dir {hf_dir} has no *.safetensors weights (pytorch_model.bin needs "
                    "torch to read); save the model with safe_serialization=True")
  return {name: file for file in map(SafetensorsFile, paths) for name in file.entries}


def import_params(files: dict[str, SafetensorsFile], config: ModelConfig) -> dict:
  """maxlm's parameters (a pure dict of float32 numpy arrays) from the Hugging Face tensors;
  a tensor missing, unknown or of another shape raises UserError naming it."""
  _, abstract_state = steps.abstract_model(config)
  shapes = nnx.to_pure_dict(abstract_state)
  expected = {hf_llama.hf_name(path): path for path, _ in _leaves(shapes)}
  ignored = {"lm_head.weight"} if config.tie_embeddings else set()
  unknown = [name for name in files if name not in expected and name not in ignored
             and not name.endswith(NON_PARAMETERS)]
  if unknown:
    raise UserError(f"the checkpoint holds {unknown[0]} (and {len(unknown) - 1} more unknown "
                    "tensors), which no Llama parameter maps to; it is not a plain Llama model")
  if missing := [name for name in expected if name not in files]:
    raise UserError(f"the checkpoint lacks {missing[0]}, which config.json implies; are all of "
                    "its safetensors files (and the index) there?")

  def load(path, shape):
    name = hf_llama.hf_name(path)
    hf_shape = files[name].shape(name)
    if int(np.prod(hf_shape)) != int(np.prod(shape.shape)):
      raise UserError(f"{name} has shape {hf_shape} but config.json implies "
                      f"{hf_llama.to_hf(path, np.empty(shape.shape, np.uint8)).shape}")
    return hf_llama.from_hf(path, files[name].tensor(name).astype(np.float32), shape.shape)
  return _map_with_path(load, shapes)


def _leaves(tree: dict, prefix: tuple = ()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _map_with_path(fn, tree: dict, prefix: tuple = ()) -> dict:
  return {key: _map_with_path(fn, value, (*prefix, key)) if isinstance(value, dict)
          else fn((*prefix, key), value) for key, value in tree.items()}


def tokenizer_source(hf_dir: Path) -> Path:
  """tokenizer.model when it is a SentencePiece model, else tokenizer.json."""
  model = hf_dir / tokenizer_lib.SENTENCEPIECE_FILE
  if model.is_file():
    try:
      tokenizer_lib.load(model)
      return model
    except RuntimeError:  # Llama 3 ships a tiktoken file under the same name
      pass
  if (hf_dir / tokenizer_lib.HF_TOKENIZER_FILE).is_file():
    return hf_dir / tokenizer_lib.HF_TOKENIZER_FILE
  raise UserError(f"--hf_dir {hf_dir} has neither a SentencePiece tokenizer.model nor a "
                  "tokenizer.json; copy the model's tokenizer there")


def copy_tokenizer(hf_dir: Path, hf: dict, output_dir: Path) -> Path:
  """The tokenizer file in the run dir; a tokenizer.json gets a tokenizer_config.json naming
  its bos/eos (from config.json's ids when the model's own has none)."""
  copied = tokenizer_lib.copy_into(tokenizer_source(hf_dir), output_dir)
  if copied.suffix == ".json":
    config_path = output_dir / tokenizer_lib.HF_TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tokenizer = tokenizer_lib.load(copied)
    for name in ("bos", "eos"):
      token_id = hf.get(f"{name}_token_id")
      if f"{name}_token" not in config and isinstance(token_id, int):
        config[f"{name}_token"] = tokenizer.id_to_piece(token_id)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
  return copied


def write_run(output_dir: Path, params: dict, config: ModelConfig, tokenizer_file: Path,
              **meta) -> None:
  """Checkpoint step 0 of a run dir: the parameters, their checksums, the meta serving and
  `--init_from` read."""
  state = {"params": jax.tree.map(jnp.asarray, params), "step": jnp.zeros((), jnp.int32)}
  meta = checkpoint.model_meta(config, seq_len=config.max_seq_len,
                               tokenizer_sha256=tokenizer_lib.sha256(tokenizer_file), **meta)
  checkpoints, _ = checkpoint.run_paths(output_dir)
  with ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(create=True)) as (
      manager):
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
        **{checkpoint.CHECKSUMS: ocp.args.JsonSave(array_digest.checksums(state))}))
    manager.wait_until_finished()


def import_checkpoint(hf_dir: str | os.PathLike, output_dir: str | os.PathLike) -> ModelConfig:
  hf_dir, output_dir = Path(hf_dir), Path(output_dir)
  hf, config = read_config(hf_dir)
  if (output_dir / checkpoint.CHECKPOINTS).exists():
    raise UserError(f"--output_dir {output_dir} already holds a run; pass a new directory")
  params = import_params(weight_files(hf_dir), config)
  output_dir.mkdir(parents=True, exist_ok=True)
  try:
    tokenizer_file = copy_tokenizer(hf_dir, hf, output_dir)
    write_run(output_dir, params, config, tokenizer_file, imported_from=str(hf_dir.resolve()))
  except BaseException:
    shutil.rmtree(output_dir / checkpoint.CHECKPOINTS, ignore_errors=True)
    raise
  return config


def main(argv: list[str] | None = None):
  """Console entry: a user error prints one line and exits 2."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf_dir", required=True,
                      help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
  parser.add_argument("--output_dir", required=True, help="the run dir to write")
  args = parser.parse_args(argv)
  try:
    config = import_checkpoint(args.hf_dir, args.output_dir)
  except UserError as error:
    print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {args.output_dir}: {config.num_layers} layers, {config.embed_dim} wide, "
        f"vocab {config.vocab_size}")


if __name__ == "__main__":
  main()
