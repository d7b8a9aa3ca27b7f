"""Checks at the boundary of a training run, each failing with one sentence naming the fix."""

import dataclasses
import json
from pathlib import Path

from maxlm.model import ModelConfig


class UserError(Exception):
  """A mistake in flags, gin or data that the user fixes; printed without a traceback."""


def resolve_model_config(config: ModelConfig, manifest: dict) -> ModelConfig:
  """Fills `vocab_size` from the data's tokenizer and checks the model fits the data."""
  tokenizer_vocab = manifest["tokenizer"]["vocab_size"]
  if config.vocab_size is None:
    config = dataclasses.replace(config, vocab_size=tokenizer_vocab)
  elif config.vocab_size < tokenizer_vocab:
    raise UserError(f"ModelConfig.vocab_size={config.vocab_size} is smaller than the data's "
                    f"tokenizer ({tokenizer_vocab} pieces); raise it or leave it unset")
  if config.max_seq_len < manifest["seq_len"]:
    raise UserError(f"ModelConfig.max_seq_len={config.max_seq_len} is shorter than the data's "
                    f"seq_len {manifest['seq_len']}; raise it or rerun prepare_text with a "
                    "smaller --seq_len")
  return config


def saved_model_config(saved: dict) -> ModelConfig:
  """The ModelConfig of a checkpoint's meta: a field added to ModelConfig after the run was
  written takes its default; a field this ModelConfig lacks is refused."""
  known = {field.name for field in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(saved) - known)
  if unknown:
    raise UserError(f"the checkpoint's model_config has {', '.join(unknown)}, which this "
                    "maxlm's ModelConfig lacks; load it with the maxlm version that wrote it")
  return ModelConfig(**saved)


def normalized_model_config(saved: dict) -> dict:
  """`saved` with missing fields at their defaults, as JSON holds it (tuples as lists), so a
  restored config compares equal to the one that was saved."""
  return json.loads(json.dumps(dataclasses.asdict(saved_model_config(saved))))


def check_compatible(saved_meta: dict, meta: dict, workdir: Path):
  """A checkpoint restores only into the same model shape, sequence length and tokenizer."""
  for key in ("model_config", "seq_len", "tokenizer_sha256", "trainable", "init_from"):
    saved, current = saved_meta.get(key), meta.get(key)
    if key == "model_config" and isinstance(saved, dict) and isinstance(current, dict):
      saved, current = normalized_model_config(saved), normalized_model_config(current)
    if saved != current:
      raise UserError(
          f"the checkpoint in {workdir} was written with a different {key} "
          f"({_diff(saved, current)}); use a new --workdir or the original configuration")


def _diff(saved, current) -> str:
  if isinstance(saved, dict) and isinstance(current, dict):
    changed = [f"{k}: {saved.get(k)} -> {current.get(k)}"
               for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return ", ".join(changed)
  return f"{saved} -> {current}"


# ModelConfig fields that choose how the model computes, not what its parameters are.
COMPUTE_ONLY_FIELDS = ("dtype", "attention", "remat", "max_seq_len", "norm_eps", "rope_theta")
# Adapters a run adds to a base that has none (see `check_same_model`).
ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


def check_same_model(source_meta: dict, meta: dict, run_dir, config: ModelConfig):
  """--init_from takes parameters only from a run of the same shape and tokenizer."""
  if source_meta.get("tokenizer_sha256") != meta.get("tokenizer_sha256"):
    raise UserError(f"--init_from {run_dir} was trained with another tokenizer (sha256 "
                    f"{str(source_meta.get('tokenizer_sha256'))[:12]}… vs the data's "
                    f"{str(meta.get('tokenizer_sha256'))[:12]}…); prepare the data with "
                    f"that run's tokenizer")
  source = normalized_model_config(source_meta.get("model_config", {}))
  ours = normalized_model_config(dataclasses.asdict(config))
  # New adapters may join a base without any; a base's own adapters must stay as they are.
  ignored = COMPUTE_ONLY_FIELDS + (ADAPTER_FIELDS if not source["lora_rank"] else ())
  changed = [f"{name}: {source[name]} -> {ours[name]}" for name in ours
             if name not in ignored and source[name] != ours[name]]
  if changed:
    raise UserError(f"--init_from {run_dir} has another model shape ({', '.join(changed)}); "
                    "use the ModelConfig of that run")
