"""Checks at the boundary of a training run, each failing with one sentence naming the fix."""

import dataclasses
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


def check_compatible(saved_meta: dict, meta: dict, workdir: Path):
  """A checkpoint restores only into the same model shape, sequence length and tokenizer."""
  for key in ("model_config", "seq_len", "tokenizer_sha256", "trainable", "init_from"):
    if saved_meta.get(key) != meta.get(key):
      raise UserError(
          f"the checkpoint in {workdir} was written with a different {key} "
          f"({_diff(saved_meta.get(key), meta.get(key))}); use a new --workdir or the "
          "original configuration")


def _diff(saved, current) -> str:
  if isinstance(saved, dict) and isinstance(current, dict):
    changed = [f"{k}: {saved.get(k)} -> {current.get(k)}"
               for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return ", ".join(changed)
  return f"{saved} -> {current}"


# ModelConfig fields that choose how the model computes, not what its parameters are.
COMPUTE_ONLY_FIELDS = ("dtype", "attention", "remat", "max_seq_len", "norm_eps", "rope_theta")


def check_same_model(source_meta: dict, meta: dict, run_dir, config: ModelConfig):
  """--init_from takes parameters only from a run of the same shape and tokenizer."""
  if source_meta.get("tokenizer_sha256") != meta.get("tokenizer_sha256"):
    raise UserError(f"--init_from {run_dir} was trained with another tokenizer (sha256 "
                    f"{str(source_meta.get('tokenizer_sha256'))[:12]}… vs the data's "
                    f"{str(meta.get('tokenizer_sha256'))[:12]}…); prepare the data with "
                    f"that run's tokenizer")
  source = source_meta.get("model_config", {})
  ours = dataclasses.asdict(config)
  changed = [f"{name}: {source.get(name)} -> {ours[name]}" for name in ours
             if name not in COMPUTE_ONLY_FIELDS and name in source and source[name] != ours[name]]
  if changed:
    raise UserError(f"--init_from {run_dir} has another model shape ({', '.join(changed)}); "
                    "use the ModelConfig of that run")
