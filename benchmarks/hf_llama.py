"""maxlm parameters -> a Hugging Face `transformers` LlamaForCausalLM with the same weights.

For benchmarks against what a user would script with `transformers`; torch and transformers
come from the `bench` extra, not from maxlm's runtime dependencies. Both models rotate the two
halves of each head (HF's `rotate_half`) and normalize in float32, so the logits agree to
float32 rounding; `max_logit_difference` checks that on every use.
"""

import numpy as np
import torch
import transformers

from maxlm.model import ModelConfig


def llama_config(config: ModelConfig) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.embed_dim,
      intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, max_position_embeddings=config.max_seq_len,
      rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
      tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
      torch_dtype=torch.float32)


def hf_state_dict(params: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
  """Our pure-dict parameters under HF Llama's names, matrices transposed to [out, in]."""
  tensor = lambda x: torch.from_numpy(np.array(x, np.float32))
  state = {"model.embed_tokens.weight": tensor(params["embedding"]),
           "model.norm.weight": tensor(params["final_norm"]["scale"])}
  for i in range(config.num_layers):
    block, prefix = params["blocks"][i], f"model.layers.{i}."
    attention, mlp = block["attention"], block["mlp"]
    embed = config.embed_dim
    state.update({
        prefix + "input_layernorm.weight": tensor(block["attention_norm"]["scale"]),
        prefix + "post_attention_layernorm.weight": tensor(block["mlp_norm"]["scale"]),
        prefix + "self_attn.q_proj.weight": tensor(np.reshape(attention["q"], (embed, -1)).T),
        prefix + "self_attn.k_proj.weight": tensor(np.reshape(attention["k"], (embed, -1)).T),
        prefix + "self_attn.v_proj.weight": tensor(np.reshape(attention["v"], (embed, -1)).T),
        prefix + "self_attn.o_proj.weight": tensor(np.reshape(attention["o"], (-1, embed)).T),
        prefix + "mlp.gate_proj.weight": tensor(np.asarray(mlp["gate"]).T),
        prefix + "mlp.up_proj.weight": tensor(np.asarray(mlp["up"]).T),
        prefix + "mlp.down_proj.weight": tensor(np.asarray(mlp["down"]).T),
    })
  if not config.tie_embeddings:
    state["lm_head.weight"] = tensor(np.asarray(params["unembedding"]).T)
  return state


def to_hf_llama(params: dict, config: ModelConfig) -> transformers.LlamaForCausalLM:
  model = transformers.LlamaForCausalLM(llama_config(config))
  missing, unexpected = model.load_state_dict(hf_state_dict(params, config), strict=False)
  missing = [name for name in missing if "rotary_emb" not in name]
  if missing or unexpected:
    raise ValueError(f"weights do not line up: missing {missing}, unexpected {unexpected}")
  return model.eval()


def max_logit_difference(model: transformers.LlamaForCausalLM, token_ids: list[int],
                         our_logits: np.ndarray) -> float:
  """max |HF logits - ours| over one sequence (ours: [len, vocab])."""
  with torch.no_grad():
    hf_logits = model(torch.tensor([token_ids])).logits[0].numpy()
  return float(np.abs(hf_logits - our_logits).max())
