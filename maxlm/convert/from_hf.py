"""A Hugging Face Llama checkpoint (config.json, *.safetensors, a tokenizer) as a maxlm run dir.

  python -m maxlm.convert.from_hf --hf_dir=DIR --output_dir=RUN [--overwrite]

RUN is an ordinary run dir (checkpoint step 0 holding the parameters, its meta, the tokenizer):
`maxlm.train --init_from=RUN`, `serving.server --checkpoint_dir=RUN` and `maxlm.to_hf` take it
as they take a trained run. Tensors are read one at a time from memory-mapped files; the
parameters are stored in float32, as training keeps them, and a bfloat16 checkpoint computes
in bfloat16 (ModelConfig.dtype). RUN is written beside itself as RUN.partial and renamed into
place when complete; it must be new or empty, unless --overwrite replaces it whole.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from maxlm import array_digest, checkpoint, steps
from maxlm import tokenizer as tokenizer_lib
from maxlm.convert import hf_llama, output_dirs
from maxlm.convert.progress import Progress
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
  hf = read_json(path)
  if not isinstance(hf, dict):
    raise UserError(f"{path} holds a JSON {type(hf).__name__}, not the object of a model's "
                    "config; point --hf_dir at a Hugging Face model directory")
  return hf, hf_llama.model_config(hf)


def read_json(path: Path):
  """The JSON in `path`; text that is none raises UserError naming the file and where."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise UserError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column "
                    f"{error.colno}); fix it or download it again") from None
  except UnicodeDecodeError:
    raise UserError(f"{path} is not UTF-8 text; download it again") from None


def weight_files(hf_dir: Path) -> dict[str, SafetensorsFile]:
  """{tensor name: the file holding it} from the index, or from every *.safetensors."""
  index = hf_dir / INDEX_FILE
  if index.is_file():
    weight_map = index_weight_map(index)
    files = {name: SafetensorsFile(hf_dir / name) for name in sorted(set(weight_map.values()))}
    if absent := [(t, name) for t, name in weight_map.items() if t not in files[name].entries]:
      raise UserError(f"{INDEX_FILE} places {absent[0][0]} in {absent[0][1]}, which does not "
                      "hold it; download the model's index and shards again")
    return {tensor: files[name] for tensor, name in weight_map.items()}
  paths = sorted(hf_dir.glob("*.safetensors"))
  if not paths:
    raise UserError(f"--hf_dir {hf_dir} has no *.safetensors weights (pytorch_model.bin needs "
                    "torch to read); save the model with safe_serialization=True")
  return {name: file for file in map(SafetensorsFile, paths) for name in file.entries}


def index_weight_map(index: Path) -> dict[str, str]:
  """{tensor name: shard file name} of a shard index whose shards are all there."""
  data = read_json(index)
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict):
    raise UserError(f"{index} has no weight_map object; download it again")
  shards = sorted(set(map(str, weight_map.values())))
  if missing := [name for name in shards if not (index.parent / name).is_file()]:
    more = f" and {len(missing) - 1} more of its {len(shards)}" if len(missing) > 1 else ""
    raise UserError(f"{index.name} names the shard {missing[0]}{more}, missing from "
                    f"{index.parent}; download every shard the index names")
  return weight_map


def import_params(files: dict[str, SafetensorsFile], config: ModelConfig) -> dict:
  """maxlm's parameters (a pure dict of float32 numpy arrays) from the Hugging Face tensors,
  read with progress on stderr; a tensor missing, unknown or of another shape raises UserError
  naming it."""
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

  progress = Progress("from_hf", len(expected),
                      sum(files[name].nbytes(name) for name in expected))

  def load(path, shape):
    name = hf_llama.hf_name(path)
    hf_shape = files[name].shape(name)
    if int(np.prod(hf_shape)) != int(np.prod(shape.shape)):
      raise UserError(f"{name} has shape {hf_shape} but config.json implies "
                      f"{hf_llama.to_hf(path, np.empty(shape.shape, np.uint8)).shape}")
    param = hf_llama.from_hf(path, files[name].tensor(name).astype(np.float32), shape.shape)
    progress.advance(files[name].nbytes(name))
    return param
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


def copy_tokenizer(source: Path, hf: dict, output_dir: Path) -> Path:
  """The tokenizer file `source` in the run dir with the model's generation_config.json (the
  ids generation stops at, default sampling settings; made from config.json's list of eos ids
  when the model has none); a tokenizer.json gets a tokenizer_config.json naming its bos/eos
  (from config.json's ids when the model's own has none)."""
  tokenizer = tokenizer_lib.load(source)  # a bad generation_config.json is named where it is
  copied = tokenizer_lib.copy_into(source, output_dir)
  if copied.suffix == ".json":
    config_path = output_dir / tokenizer_lib.HF_TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for name in ("bos", "eos"):
      token_id = hf.get(f"{name}_token_id")
      if f"{name}_token" not in config and isinstance(token_id, int):
        config[f"{name}_token"] = tokenizer.id_to_piece(token_id)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
  generation_path = output_dir / tokenizer_lib.HF_GENERATION_CONFIG
  if isinstance(stops := hf.get("eos_token_id"), list) and not generation_path.is_file():
    tokenizer_lib.stop_ids(stops, tokenizer.vocab_size(), str(source.with_name("config.json")))
    generation_path.write_text(json.dumps({"eos_token_id": stops}, indent=2))
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


def import_checkpoint(hf_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                      overwrite: bool = False) -> ModelConfig:
  """Writes the run dir of a Hugging Face model; returns its ModelConfig. `output_dir` must be
  new or empty unless `overwrite`, which replaces it whole."""
  hf_dir, output_dir = Path(hf_dir), Path(output_dir)
  check_output_dir(output_dir, hf_dir, overwrite)
  hf, config = read_config(hf_dir)
  tokenizer = tokenizer_source(hf_dir)
  params = import_params(weight_files(hf_dir), config)
  with output_dirs.staged(output_dir) as staging:
    print(f"from_hf: writing the checkpoint to {output_dir}", file=sys.stderr, flush=True)
    tokenizer_file = copy_tokenizer(tokenizer, hf, staging)
    write_run(staging, params, config, tokenizer_file, imported_from=str(hf_dir.resolve()))
  return config


def check_output_dir(output_dir: Path, hf_dir: Path, overwrite: bool) -> None:
  """Refuses an output dir holding anything unless `overwrite`, and one holding the input."""
  names = output_dirs.contents(output_dir)
  output_dirs.refuse_enclosing(output_dir, hf_dir, "--hf_dir")
  if names and not overwrite:
    raise output_dirs.not_empty_error(
        output_dir, names, "a run" if checkpoint.CHECKPOINTS in names else "files")


def main(argv: list[str] | None = None):
  """Console entry: a user error prints one line and exits 2."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf_dir", required=True,
                      help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
  parser.add_argument("--output_dir", required=True, help="the run dir to write: new or empty")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --output_dir whole (once the run is written)")
  args = parser.parse_args(argv)
  try:
    config = import_checkpoint(args.hf_dir, args.output_dir, overwrite=args.overwrite)
  except (UserError, OSError) as error:
    print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {args.output_dir}: {config.num_layers} layers, {config.embed_dim} wide, "
        f"vocab {config.vocab_size}")


if __name__ == "__main__":
  main()
