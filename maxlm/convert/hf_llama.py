"""Hugging Face Llama's config.json and weight names, and maxlm's, mapped both ways.

Hugging Face's `LlamaForCausalLM` rotates the two halves of each head (`rotate_half`), as
`maxlm.model.layers.rope` does, so q and k map without a permutation; Meta's original
checkpoints pair neighbouring dimensions instead, and Hugging Face's own converter permuted
them into halves. A Linear weight is [out, in]; a maxlm kernel is [*in, *out] (q: [embed,
heads, head_dim], o: [heads, head_dim, embed]), so a kernel is the weight transposed and
reshaped.
"""

import math

import numpy as np

from maxlm.errors import UserError
from maxlm.model import ModelConfig

ARCHITECTURE = "LlamaForCausalLM"
# config.json fields that say nothing about the function the weights compute.
IGNORED_FIELDS = ("_name_or_path", "transformers_version", "initializer_range", "use_cache",
                  "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
                  "torch_dtype", "dtype", "output_attentions", "output_hidden_states",
                  "return_dict", "tie_word_embeddings")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters")
# Fields maxlm accepts only at the value its model computes with.
FIXED_FIELDS = {"model_type": "llama", "architectures": [ARCHITECTURE], "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
# Fields every Llama config.json gives, and the types of those maxlm reads.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")
COUNT_FIELDS = (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "max_position_embeddings")
NUMBER_FIELDS = ("rms_norm_eps", "rope_theta")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")
# maxlm projection -> Hugging Face module name
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
               "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def model_config(hf: dict) -> ModelConfig:
  """The ModelConfig of a Hugging Face Llama config.json; a field maxlm cannot honour raises
  UserError naming it."""
  for name, value in hf.items():
    if name in IGNORED_FIELDS or name in SHAPE_FIELDS:
      continue
    if name not in FIXED_FIELDS:
      raise UserError(f"config.json field {name}={value!r} is not part of the Llama family "
                      "maxlm imports; remove it if it changes nothing, else this model is "
                      "not supported")
    if value != FIXED_FIELDS[name]:
      raise UserError(f"config.json field {name}={value!r} is not supported; maxlm imports "
                      f"{name}={FIXED_FIELDS[name]!r} only")
  check_field_types(hf)
  heads = hf["num_attention_heads"]
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  try:
    return _model_config(hf, heads, rope)
  except (ValueError, TypeError) as error:  # ModelConfig's own checks name its field
    raise UserError(f"config.json does not fit maxlm's model: {error}") from None


def check_field_types(hf: dict) -> None:
  """Raises UserError naming a required field config.json lacks, or one of another type."""
  if missing := [name for name in REQUIRED_FIELDS if name not in hf]:
    raise UserError(f"config.json has no {missing[0]} field; add it (a Llama config.json "
                    f"gives {', '.join(REQUIRED_FIELDS)})")
  for name in COUNT_FIELDS:
    value = hf.get(name)
    if value is not None and not (_is_int(value) and value > 0):
      raise UserError(f"config.json field {name}={value!r} should be a positive integer; "
                      "correct it")
  for name in NUMBER_FIELDS:
    value = hf.get(name)
    if value is not None and not (_is_int(value) or isinstance(value, float)):
      raise UserError(f"config.json field {name}={value!r} should be a number; correct it")
  for name in ("rope_scaling", "rope_parameters"):
    if not isinstance(hf.get(name) or {}, dict):
      raise UserError(f"config.json field {name}={hf[name]!r} should be an object or null; "
                      "correct it")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _model_config(hf: dict, heads: int, rope: dict) -> ModelConfig:
  return ModelConfig(
      vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
      embed_dim=hf["hidden_size"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      dtype=_compute_dtype(hf), **_rope_scaling(rope))


def _compute_dtype(hf: dict) -> str:
  dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  if not isinstance(dtype, str) or dtype not in DTYPES:
    raise UserError(f"config.json field torch_dtype={dtype!r} is not supported; maxlm imports "
                    f"{' and '.join(DTYPES)} checkpoints")
  return DTYPES[dtype]


def _rope_scaling(rope: dict) -> dict:
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return {}
  if kind != "llama3":
    raise UserError(f"config.json field rope_scaling.rope_type={kind!r} is not supported; "
                    "maxlm imports llama3 scaling (or none)")
  if missing := [name for name in LLAMA3_SCALING if name not in rope]:
    raise UserError(f"config.json field rope_scaling has no {missing[0]}, which llama3 "
                    f"scaling needs; add it (llama3 scaling gives {', '.join(LLAMA3_SCALING)})")
  factor, low, high, original = (rope[name] for name in LLAMA3_SCALING)
  return {"rope_scaling_factor": float(factor), "rope_low_freq_factor": float(low),
          "rope_high_freq_factor": float(high), "rope_original_max_len": int(original)}


def hf_config(config: ModelConfig, dtype: str, bos_id: int, eos_id: int) -> dict:
  """The config.json of `config`'s model stored as `dtype`."""
  c = config
  hf = {"architectures": [ARCHITECTURE], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.embed_dim, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None, "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, "bos_token_id": bos_id, "eos_token_id": eos_id}
  if c.rope_scaling:
    hf["rope_scaling"] = {"rope_type": "llama3",
                          **dict(zip(LLAMA3_SCALING, c.rope_scaling))}
  return hf


def unexportable(config: ModelConfig) -> str | None:
  """Why `config`'s model has no `LlamaForCausalLM` layout, or None when it has one."""
  if config.num_experts:
    return (f"it has mixture-of-experts layers (num_experts={config.num_experts}), and "
            "Hugging Face's Llama has a dense MLP in every layer")
  if config.vision is not None:
    return "it has a vision tower and projector, and Hugging Face's Llama takes text only"
  return None


def hf_name(path: tuple) -> str:
  """The Hugging Face tensor name of a maxlm parameter path (`("blocks", 0, "attention",
  "q")`); a LoRA factor's is PEFT's."""
  match [str(key) for key in path]:
    case ["embedding"]:
      return "model.embed_tokens.weight"
    case ["unembedding"]:
      return "lm_head.weight"
    case ["final_norm", "scale"]:
      return "model.norm.weight"
    case ["blocks", layer, "attention_norm", "scale"]:
      return f"model.layers.{layer}.input_layernorm.weight"
    case ["blocks", layer, "mlp_norm", "scale"]:
      return f"model.layers.{layer}.post_attention_layernorm.weight"
    case ["blocks", layer, module, name]:
      base, _, factor = name.partition("_lora_")
      projection = (f"model.layers.{layer}.{_hf_module(module)}."
                    f"{PROJECTIONS[base]}")
      if factor:
        return f"base_model.model.{projection}.lora_{factor.upper()}.weight"
      return f"{projection}.weight"
  raise ValueError(f"no Hugging Face name for the parameter {'/'.join(map(str, path))}")


def _hf_module(module: str) -> str:
  return {"attention": "self_attn", "mlp": "mlp"}[module]


def input_dims(path: tuple) -> int | None:
  """How many leading axes of the kernel at `path` are its input (None: not a kernel)."""
  name = str(path[-1])
  if name in ("embedding", "scale"):
    return None
  if name.endswith("_lora_b"):
    return 1
  return 2 if name.partition("_lora_")[0] == "o" else 1


def to_hf(path: tuple, array: np.ndarray) -> np.ndarray:
  """maxlm's parameter at `path` as Hugging Face stores it ([out, in] for a kernel)."""
  in_dims = input_dims(path)
  if in_dims is None:
    return array
  in_size = math.prod(array.shape[:in_dims])
  return array.reshape(in_size, -1).T


def from_hf(path: tuple, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Hugging Face's tensor for maxlm's parameter at `path`, in maxlm's `shape`."""
  in_dims = input_dims(path)
  if in_dims is None:
    return array.reshape(shape)
  return array.T.reshape(shape)
