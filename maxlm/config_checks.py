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
  for key in ("model_config", "seq_len", "tokenizer_sha256"):
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
