"""Checks at the boundary of a training run, each failing with one sentence naming the fix."""

import dataclasses
import inspect
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gin
import jax

from beam_pipelines.chat_template import IMAGE_TOKEN
from maxlm import optim, sharding, tasks
from maxlm.errors import UserError
from maxlm.model import ModelConfig, moe, vit
from maxlm.model.transformer import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_MAX_SEED = 2**32


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
  if config.vision is not None and config.vision.image_token_id is None:
    config = dataclasses.replace(config, vision=dataclasses.replace(
        config.vision, image_token_id=image_token_id(manifest)))
  return config


def image_token_id(manifest: dict) -> int:
  """The id of the image placeholder in the data's tokenizer."""
  token_id = manifest["tokenizer"].get("special_tokens", {}).get(IMAGE_TOKEN)
  if token_id is None:
    raise UserError(f"the data's tokenizer has no {IMAGE_TOKEN} piece, which a model with "
                    "ModelConfig.vision needs; prepare the data with a tokenizer trained by "
                    "beam_pipelines.prepare_text")
  return token_id


def saved_model_config(saved: dict) -> ModelConfig:
  """The ModelConfig of a checkpoint's meta: a field added to ModelConfig after the run was
  written takes its default; a field this ModelConfig lacks is refused."""
  known = {field.name for field in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(saved) - known)
  if unknown:
    raise UserError(f"the checkpoint's model_config has {', '.join(unknown)}, which this "
                    "maxlm's ModelConfig lacks; load it with the maxlm version that wrote it")
  values = {field.name: field.default for field in dataclasses.fields(ModelConfig)} | saved
  check_values("ModelConfig", values)
  try:
    return ModelConfig(**values)  # every field given: no gin binding fills in
  except ValueError as error:
    raise UserError(str(error).splitlines()[0]) from None


def normalized_model_config(saved: dict) -> dict:
  """`saved` with missing fields at their defaults, as JSON holds it (tuples as lists), so a
  restored config compares equal to the one that was saved."""
  return json.loads(json.dumps(dataclasses.asdict(saved_model_config(saved))))


def check_compatible(saved_meta: dict, meta: dict, workdir: Path):
  """A checkpoint restores only into the same model shape, sequence length and tokenizer. The
  RESUME_MAY_CHANGE fields are not compared: they choose how the same function is computed."""
  for key in ("model_config", "seq_len", "tokenizer_sha256", "trainable", "init_from"):
    saved, current = saved_meta.get(key), meta.get(key)
    if key == "model_config" and isinstance(saved, dict) and isinstance(current, dict):
      saved, current = ({name: value for name, value in normalized_model_config(config).items()
                         if name not in RESUME_MAY_CHANGE} for config in (saved, current))
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
COMPUTE_ONLY_FIELDS = ("dtype", "attention", "remat", "max_seq_len", "norm_eps", "rope_theta",
                       "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                       "rope_original_max_len", "moe_dispatch", "capacity_factor")
# Of those, the ones that change the function the parameters compute: a run may change them
# from its init_from on purpose (a longer context), and is told that it did.
NUMERICS_FIELDS = ("norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor",
                   "rope_high_freq_factor", "rope_original_max_len")
# Of those, the ones a resumed run may change: the same function, computed another way (runs
# saved before "auto" became the default say attention="xla"; one that moves to a smaller
# device may need remat="full").
RESUME_MAY_CHANGE = ("attention", "remat")
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
  ignored += ("vision",) if source["vision"] is None else ()  # a fresh tower joins a text LM
  if source["vision"] and ours["vision"] and 0 in (source["vision"]["contrastive_dim"],
                                                   ours["vision"]["contrastive_dim"]):
    # SigLIP's heads come and go between stages: a run without them takes the tower alone,
    # a run that adds them starts them fresh.
    source["vision"]["contrastive_dim"] = ours["vision"]["contrastive_dim"]
  changed = [change for name in ours if name not in ignored
             for change in _changes(name, source[name], ours[name])]
  if changed:
    raise UserError(f"--init_from {run_dir} has another model shape ({', '.join(changed)}); "
                    "use the ModelConfig of that run")


def _changes(name: str, theirs, ours) -> list[str]:
  """`name: theirs -> ours`, one per field that differs inside a nested config (`vision`)."""
  if isinstance(theirs, dict) and isinstance(ours, dict):
    return [change for field in ours
            for change in _changes(f"{name}.{field}", theirs.get(field), ours[field])]
  return [f"{name}: {theirs} -> {ours}"] if theirs != ours else []


def changed_numerics(source_meta: dict, config: ModelConfig, run_dir) -> str | None:
  """A warning line when this run computes with other NUMERICS_FIELDS than --init_from's run
  (an imported Llama's rope_theta left at the gin default, say), else None."""
  source = normalized_model_config(source_meta.get("model_config", {}))
  ours = normalized_model_config(dataclasses.asdict(config))
  changed = [f"{name}={ours[name]} (it used {source[name]})" for name in NUMERICS_FIELDS
             if source[name] != ours[name]]
  if not changed:
    return None
  return (f"warning: this run computes with {', '.join(changed)} unlike --init_from {run_dir}; "
          "bind those ModelConfig fields to its values unless the change is meant")


# A rule is (test, what a valid value is); a value failing it reads
# "NAME.field=value must be <what>", which names the gin binding to fix.
Rule = tuple[Callable[[Any], bool], str]


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _optional(rule: Rule) -> Rule:
  test, what = rule
  return (lambda value: value is None or test(value)), f"{what} or None"


def _one_of(choices) -> Rule:
  return ((lambda value: isinstance(value, str) and value in choices),
          "one of " + ", ".join(repr(choice) for choice in choices))


def _is_regex(value) -> bool:
  try:
    re.compile(value)
  except (TypeError, re.error):
    return False
  return isinstance(value, str)


def _is_step_range(value) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) == 2
          and all(_is_int(step) and step >= 1 for step in value) and value[0] <= value[1])


POSITIVE_INT: Rule = (lambda value: _is_int(value) and value > 0), "a positive int"
NON_NEGATIVE_INT: Rule = (lambda value: _is_int(value) and value >= 0), "an int >= 0"
POSITIVE_NUMBER: Rule = (lambda value: _is_number(value) and value > 0), "a positive number"
NON_NEGATIVE_NUMBER: Rule = (lambda value: _is_number(value) and value >= 0), "a number >= 0"
BOOL: Rule = (lambda value: isinstance(value, bool)), "True or False"
STRING: Rule = (lambda value: isinstance(value, str)), "a string"
PATH: Rule = ((lambda value: isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""),
              "a directory path")
ANY: Rule = (lambda value: True), "anything"

RULES: dict[str, dict[str, Rule]] = {
    "ModelConfig": {
        "vocab_size": _optional(POSITIVE_INT),
        **dict.fromkeys(("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
                         "mlp_dim", "max_seq_len"), POSITIVE_INT),
        "rope_theta": POSITIVE_NUMBER,
        "rope_scaling_factor": NON_NEGATIVE_NUMBER,
        **dict.fromkeys(("rope_low_freq_factor", "rope_high_freq_factor"), POSITIVE_NUMBER),
        "rope_original_max_len": POSITIVE_INT,
        "norm_eps": POSITIVE_NUMBER,
        "tie_embeddings": BOOL,
        "dtype": _one_of(COMPUTE_DTYPES),
        "attention": _one_of(ATTENTION_IMPLEMENTATIONS),
        "remat": _one_of(tuple(REMAT_POLICIES)),
        "lora_rank": NON_NEGATIVE_INT,
        "lora_alpha": POSITIVE_NUMBER,
        "lora_targets": ((lambda value: isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value))),
                         "a list of projection names, e.g. ['q', 'v']"),  # ModelConfig names them
        "vision": _optional(((lambda value: isinstance(value, (vit.VisionConfig, dict))),
                             "@VisionConfig()")),  # whose fields RULES["VisionConfig"] checks
        **dict.fromkeys(("num_experts", "num_shared_experts", "first_dense_layers"),
                        NON_NEGATIVE_INT),
        **dict.fromkeys(("experts_per_token", "moe_every"), POSITIVE_INT),
        "moe_mlp_dim": _optional(POSITIVE_INT),
        "moe_dispatch": _one_of(moe.DISPATCHES),
        "capacity_factor": POSITIVE_NUMBER,
        "renormalize_routing": BOOL,
        "routing_bias": BOOL,
    },
    "VisionConfig": {
        **dict.fromkeys(("image_size", "patch_size", "num_layers", "embed_dim", "num_heads",
                         "num_kv_heads", "head_dim", "mlp_dim"), POSITIVE_INT),
        "norm_eps": POSITIVE_NUMBER,
        "projector": ANY,  # VisionConfig names the projectors it accepts
        "image_token_id": _optional(NON_NEGATIVE_INT),
        "contrastive_dim": NON_NEGATIVE_INT,
    },
    "train": {
        "workdir": PATH,
        "data_dir": _optional(((lambda value: PATH[0](value) or callable(value)),
                               "a directory path, or a function returning one")),
        **dict.fromkeys(("steps", "global_batch_size", "microbatches", "checkpoint_every",
                         "eval_every", "eval_batches", "log_every", "max_bad_steps",
                         "keep_checkpoints"), POSITIVE_INT),
        "task": ANY,
        "init_from": _optional(PATH),
        "trainable": _optional((_is_regex, "a regular expression over parameter paths")),
        "seed": ((lambda value: _is_int(value) and 0 <= value < _MAX_SEED),
                 "an int in [0, 2**32)"),
        "sample_prompt": _optional(STRING),
        "sample_tokens": NON_NEGATIVE_INT,
        "sample_temperature": NON_NEGATIVE_NUMBER,
        "keep_checkpoint_every": _optional(POSITIVE_INT),
        "peak_flops_per_device": _optional(POSITIVE_NUMBER),
        "profile_steps": _optional((_is_step_range, "a pair of steps (first, last) in order")),
        "verify_checkpoints": BOOL,
        "evals": ((lambda value: isinstance(value, (list, tuple)) and all(
            hasattr(evaluator, "run") for evaluator in value)),
                  "a list of evaluators, e.g. [@MultipleChoice(), @Perplexity()]"),
    },
    "Pretrain": {
        **dict.fromkeys(("z_loss", "load_balancing_loss", "router_z_loss"), NON_NEGATIVE_NUMBER),
        "batch_fields": ANY,
    },
    "learning_rate_schedule": {
        "total_steps": POSITIVE_INT,
        "peak_learning_rate": POSITIVE_NUMBER,
        "warmup_steps": NON_NEGATIVE_INT,
        "final_fraction": ((lambda value: _is_number(value) and 0 <= value <= 1),
                           "a number in [0, 1]"),
    },
    "make_optimizer": {
        "schedule": ANY,
        "weight_decay": NON_NEGATIVE_NUMBER,
        **dict.fromkeys(("b1", "b2"), ((lambda value: _is_number(value) and 0 <= value < 1),
                                       "a number in [0, 1)")),
        "eps": POSITIVE_NUMBER,
        "max_grad_norm": POSITIVE_NUMBER,
        "router_learning_rate_scale": NON_NEGATIVE_NUMBER,
        "routing_bias_learning_rate_scale": NON_NEGATIVE_NUMBER,
        "routing_bias_update_rate": _optional(POSITIVE_NUMBER),
    },
    "make_mesh": {
        **dict.fromkeys(("data", "fsdp", "tensor", "expert"), (
            (lambda value: _is_int(value) and (value > 0 or value == -1)),
            "a positive int, or -1 for the devices left over")),
        "devices": ANY,
    },
}


def check_values(configurable: str, values: Mapping[str, Any]) -> None:
  """Each of `values` against its rule in RULES[configurable]."""
  rules = RULES[configurable]
  for name, value in values.items():
    if name not in rules:
      raise UserError(f"{configurable}.{name} is not a setting of {configurable}; it has "
                      f"{', '.join(rules)}")
    test, what = rules[name]
    if not test(value):
      shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
      raise UserError(f"{configurable}.{name}={shown} must be {what}")


def check_run_configuration(train_arguments: Mapping[str, Any]) -> None:
  """`train`'s arguments, then the gin bindings of what it builds, before it builds any."""
  check_values("train", train_arguments)
  # VisionConfig first: reading ModelConfig's bindings builds the @VisionConfig() they name.
  for configurable in (vit.VisionConfig, ModelConfig, tasks.Pretrain,
                       optim.learning_rate_schedule, optim.make_optimizer, sharding.make_mesh):
    check_values(configurable.__name__, gin.get_bindings(configurable))
  check_mesh(gin.get_bindings(ModelConfig).get("num_experts", 0),
             gin.get_bindings(sharding.make_mesh))


def check_mesh(num_experts: int, mesh_bindings: Mapping[str, Any]) -> None:
  """The mesh's sizes fit this host's devices, and each device of its expert axis holds an
  equal share of every MoE layer's experts (else the first step's trace fails, after the
  workdir is made)."""
  arguments = inspect.signature(sharding.make_mesh).bind(**mesh_bindings)
  arguments.apply_defaults()
  sizes = {axis: arguments.arguments[axis] for axis in sharding.MESH_AXES}
  if arguments.arguments["devices"] is None:  # gin may not name devices; a caller might
    try:
      sizes = sharding.mesh_sizes(**sizes, num_devices=jax.device_count())
    except ValueError as error:
      raise UserError(str(error)) from None
  expert = sizes["expert"]
  if num_experts and expert != -1 and num_experts % expert:
    raise UserError(f"ModelConfig.num_experts={num_experts} must be a multiple of "
                    f"make_mesh.expert={expert}, the devices the experts are split over; "
                    "change one of them")


MOE_ONLY = {"ModelConfig": ("experts_per_token", "moe_mlp_dim", "num_shared_experts",
                            "moe_every", "first_dense_layers", "moe_dispatch", "capacity_factor",
                            "renormalize_routing", "routing_bias"),
            "make_optimizer": ("router_learning_rate_scale", "routing_bias_learning_rate_scale",
                               "routing_bias_update_rate")}


def ignored_moe_settings(bindings: Mapping[str, Mapping[str, Any]]) -> str | None:
  """A warning line naming the MoE bindings a dense model (ModelConfig.num_experts=0) leaves
  unused, e.g. moe_tiny.gin run with num_experts=0 as a dense baseline; None when there are
  none. bindings: {configurable name: its gin bindings}."""
  if bindings.get("ModelConfig", {}).get("num_experts", 0):
    return None
  unused = [f"{configurable}.{name}" for configurable, names in MOE_ONLY.items()
            for name in names if name in bindings.get(configurable, {})]
  if not unused:
    return None
  return (f"warning: ModelConfig.num_experts=0 (a dense model) leaves {', '.join(unused)} "
          "unused")


def build_model_config(**values) -> ModelConfig:
  """ModelConfig(**values), gin filling in the rest. Every field is checked first, since a
  wrong type would fail inside ModelConfig's own cross-field checks with a traceback, and
  those checks' errors become one-line errors too."""
  check_values("ModelConfig", {**gin.get_bindings(ModelConfig), **values})
  try:
    return ModelConfig(**values)
  except ValueError as error:  # gin appends "In call to configurable ..." lines
    raise UserError(str(error).splitlines()[0]) from None
