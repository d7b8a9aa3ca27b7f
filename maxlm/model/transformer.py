"""A Llama-style decoder-only transformer in Flax NNX.

Token embedding, RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, optional tied
embeddings, optional LoRA adapters beside the attention and MLP projections. Every parameter
carries `logical_axes` metadata that `maxlm.sharding` maps onto the mesh. The KV cache is a
plain pytree passed in and returned, so serving can jit it.
"""

import dataclasses
import math
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from maxlm import quantization
from maxlm.model import attention, contrastive, kv_cache, layers, moe, vit
from maxlm.model.kv_cache import KVCache
from maxlm.sharding import constrain


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")
# What a decoder layer keeps from its forward pass for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,                                       # keep everything (no rematerialization)
    "full": jax.checkpoint_policies.nothing_saveable,   # keep only the layer's input
    # keep the weight matmuls' outputs; recompute attention scores (too big: [heads, seq, seq])
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter can join


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's shape; `vocab_size=None` means "take it from the data's tokenizer"."""
  vocab_size: int | None = None
  num_layers: int = 4
  embed_dim: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_dim: int = 768
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  # Llama 3's RoPE frequency scaling (Hugging Face's rope_scaling of type "llama3"); 0: off
  rope_scaling_factor: float = 0.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = "float32"  # activation/compute dtype; parameters stay float32
  attention: str = "auto"  # training attention: "xla", "pallas" (flash kernel), "cudnn" or
                           # "auto" (`attention.implementation_for`: cuDNN on a GPU in
                           # 16-bit where it takes the shapes, else XLA)
  remat: str = "none"      # per-layer rematerialization: "none", "full" or "save_dots"
  lora_rank: int = 0       # rank of the LoRA adapters beside each target projection; 0: none
  lora_alpha: float = 16.0  # an adapter's term scales by lora_alpha / lora_rank
  lora_targets: tuple[str, ...] = LORA_TARGETS
  vision: vit.VisionConfig | None = None  # a vision tower and projector; None: text only
  num_experts: int = 0          # routed experts in each MoE layer; 0: a dense model
  experts_per_token: int = 2    # top-k: the experts each token's router picks
  moe_mlp_dim: int | None = None  # one expert's hidden width; None: mlp_dim
  num_shared_experts: int = 0   # experts every token of an MoE layer goes through as well
  moe_every: int = 1            # after the first dense layers, every moe_every-th layer is MoE
  first_dense_layers: int = 0   # leading layers that keep a dense MLP
  moe_dispatch: str = "dropless"  # "dropless" (grouped matmul) or "capacity" (drops overflow)
  capacity_factor: float = 1.25   # "capacity": an expert takes this times an even share
  renormalize_routing: bool = True  # chosen experts' weights sum to 1; False: raw softmax
  # A per-expert bias on the router's logits that only chooses the experts, moved toward even
  # load by the optimizer (moe.balance_signal): DeepSeek-V3's auxiliary-loss-free balancing.
  routing_bias: bool = False

  def __post_init__(self):
    if isinstance(self.vision, dict):  # as a checkpoint's JSON holds it
      object.__setattr__(self, "vision", vit.VisionConfig(**self.vision))
    # gin may bind a list, a checkpoint's JSON holds one; a tuple keeps the config hashable.
    targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else self.lora_targets
    object.__setattr__(self, "lora_targets", tuple(targets))
    if unknown := sorted(set(self.lora_targets) - set(LORA_TARGETS)):
      raise ValueError(f"ModelConfig.lora_targets names {', '.join(unknown)}; choose from "
                       f"{', '.join(LORA_TARGETS)}")
    if self.lora_rank < 0:
      raise ValueError(f"ModelConfig.lora_rank={self.lora_rank}; use 0 (no adapters) or more")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention={self.attention!r}; choose one of "
                       f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r}; choose one of "
                       f"{', '.join(REMAT_POLICIES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"ModelConfig.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.moe_dispatch not in moe.DISPATCHES:
      raise ValueError(f"ModelConfig.moe_dispatch={self.moe_dispatch!r}; choose one of "
                       f"{', '.join(moe.DISPATCHES)}")
    if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
      raise ValueError(f"ModelConfig.experts_per_token={self.experts_per_token} must be "
                       f"between 1 and ModelConfig.num_experts={self.num_experts}")
    if self.num_experts and self.first_dense_layers >= self.num_layers:
      raise ValueError(f"ModelConfig.first_dense_layers={self.first_dense_layers} must be below "
                       f"ModelConfig.num_layers={self.num_layers}, else no layer is MoE; set "
                       "ModelConfig.num_experts=0 for a dense model")
    if self.num_experts and not self.num_moe_layers:
      raise ValueError(f"ModelConfig.moe_every={self.moe_every} must be at most "
                       f"{self.num_layers - self.first_dense_layers} (the layers after "
                       f"ModelConfig.first_dense_layers={self.first_dense_layers}), else no "
                       "layer is MoE; set ModelConfig.num_experts=0 for a dense model")
    mlp_targets = [name for name in ("gate", "up", "down") if name in self.lora_targets]
    if self.lora_rank and mlp_targets and self.num_moe_layers == self.num_layers:
      # experts (and the shared expert) take no adapters, so these would join no layer
      raise ValueError(f"ModelConfig.lora_targets={self.lora_targets} must name only q, k, v "
                       f"or o when every layer is MoE: {', '.join(mlp_targets)} would get no "
                       "adapter; bind ModelConfig.lora_targets = ['q', 'k', 'v', 'o']")

  @property
  def rope_scaling(self) -> tuple[float, float, float, int] | None:
    """`layers.rope`'s scaling argument: None when off."""
    if not self.rope_scaling_factor:
      return None
    return (self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
            self.rope_original_max_len)

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  @property
  def expert_mlp_dim(self) -> int:
    return self.mlp_dim if self.moe_mlp_dim is None else self.moe_mlp_dim

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(layer) for layer in range(self.num_layers))

  def is_moe_layer(self, layer: int) -> bool:
    """Layers 0..first_dense_layers-1 are dense; after them every moe_every-th layer, counted
    from the first, is MoE (moe_every=2: dense, MoE, dense, MoE, ...)."""
    after = layer - self.first_dense_layers
    return bool(self.num_experts) and after >= 0 and (after + 1) % self.moe_every == 0


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """`dtype`: the cache's (int8 keeps a scale per token and head); None: the compute dtype."""
  return kv_cache.empty(config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim,
                        jnp.dtype(dtype or config.dtype))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...],
           fan_in: int) -> nnx.Param:
  init = jax.nn.initializers.normal(stddev=fan_in ** -0.5)
  return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


def _add_adapters(module: nnx.Module, config: ModelConfig, rngs: nnx.Rngs | None,
                  names: tuple[str, ...], in_dims: int = 1):
  """Puts LoRA adapters `<name>_lora_a` [*in, rank] (random) and `<name>_lora_b` [rank, *out]
  (zero, so a new adapter changes nothing) beside each projection in `names` that
  `config.lora_targets` lists; `in_dims` of the kernel's axes are its input."""
  for name in names:
    if not config.lora_rank or name not in config.lora_targets:
      continue
    kernel = getattr(module, name)
    shape, axes = kernel.get_value().shape, kernel.get_metadata()["logical_axes"]
    in_shape, in_axes = shape[:in_dims], axes[:in_dims]
    setattr(module, f"{name}_lora_a", _param(rngs, (*in_shape, config.lora_rank),
                                              (*in_axes, "lora_rank"), math.prod(in_shape)))
    setattr(module, f"{name}_lora_b", nnx.Param(
        jnp.zeros((config.lora_rank, *shape[in_dims:]), jnp.float32),
        logical_axes=("lora_rank", *axes[in_dims:])))


def _project(module: nnx.Module, name: str, x: jax.Array, contracting_dims: int = 1):
  """x through the module's projection `name`, plus its adapter's term when it has one."""
  kernel = getattr(module, name).get_value()
  if quantization.is_quantized(kernel):  # int8 serving: the matmul takes the int8 values
    out = quantization.dense(x, kernel, contracting_dims)
  else:
    out = layers.dense(x, kernel.astype(x.dtype), contracting_dims)
  if hasattr(module, f"{name}_lora_a"):
    a, b = (getattr(module, f"{name}_lora_{part}")[...].astype(x.dtype) for part in "ab")
    out = out + layers.low_rank(x, a, b, module.config.lora_scale, contracting_dims)
  return out


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
    self.eps = eps

  def __call__(self, x):
    return layers.rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, adapter_rngs: nnx.Rngs | None = None):
    c = config
    self.config = c
    self.q = _param(rngs, (c.embed_dim, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                    c.embed_dim)
    self.k = _param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                    ("embed", "kv_heads", "head_dim"), c.embed_dim)
    self.v = _param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                    ("embed", "kv_heads", "head_dim"), c.embed_dim)
    self.o = _param(rngs, (c.num_heads, c.head_dim, c.embed_dim), ("heads", "head_dim", "embed"),
                    c.num_heads * c.head_dim * c.num_layers * 2)
    _add_adapters(self, c, adapter_rngs, ("q", "k", "v"))
    _add_adapters(self, c, adapter_rngs, ("o",), in_dims=2)

  def __call__(self, x, positions, segment_ids, cache, bidirectional_ids=None, branch_ids=None):
    """x: [batch, seq, embed]; positions, bidirectional_ids, branch_ids: [batch, seq]. Returns
    (out, updated cache or None)."""
    q, k, v = (_project(self, name, x) for name in ("q", "k", "v"))
    q = layers.rope(q, positions, self.config.rope_theta, self.config.rope_scaling)
    k = layers.rope(k, positions, self.config.rope_theta, self.config.rope_scaling)
    implementation = attention.implementation_for(
        self.config.attention, dtype=q.dtype, head_dim=q.shape[-1], seq_len=q.shape[1],
        with_branches=branch_ids is not None)
    if cache is None and implementation != "xla":
      out = attention.fused_attention(q, k, v, segment_ids, implementation, bidirectional_ids,
                                      branch_ids)
    elif cache is None:
      out = layers.causal_attention(q, k, v, segment_ids, bidirectional_ids=bidirectional_ids,
                                    branch_ids=branch_ids)
    elif branch_ids is not None:
      raise ValueError("branch_ids (a preference pair's replies) with a KV cache are not "
                       "supported; run the pair without a cache")
    elif bidirectional_ids is not None:  # a prefill with images, written from position 0
      cache = kv_cache.write(cache, k, v, positions)
      out = layers.causal_attention(q, k, v, segment_ids, bidirectional_ids=bidirectional_ids)
    else:
      cache = kv_cache.write(cache, k, v, positions)
      out = kv_cache.attend(cache, q, positions)
    return _project(self, "o", out, contracting_dims=2), cache


class MLP(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, adapter_rngs: nnx.Rngs | None = None):
    c = config
    self.config = c
    self.gate = _param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c.embed_dim)
    self.up = _param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c.embed_dim)
    self.down = _param(rngs, (c.mlp_dim, c.embed_dim), ("mlp", "embed"), c.mlp_dim * c.num_layers * 2)
    _add_adapters(self, c, adapter_rngs, ("gate", "up", "down"))

  def __call__(self, x):
    hidden = layers.swiglu(_project(self, "gate", x), _project(self, "up", x))
    return _project(self, "down", hidden)


class Block(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, adapter_rngs: nnx.Rngs | None = None,
               layer: int = 0):
    self.attention_norm = RMSNorm(config.embed_dim, config.norm_eps)
    self.attention = Attention(config, rngs, adapter_rngs)
    self.mlp_norm = RMSNorm(config.embed_dim, config.norm_eps)
    if not config.is_moe_layer(layer):
      self.mlp = MLP(config, rngs, adapter_rngs)
      return
    self.mlp = moe.MoE(config, rngs)
    if config.num_shared_experts:  # one MLP as wide as all shared experts together
      self.shared_mlp = MLP(dataclasses.replace(
          config, mlp_dim=config.expert_mlp_dim * config.num_shared_experts, lora_rank=0), rngs)

  def __call__(self, x, positions, segment_ids, cache, bidirectional_ids=None, branch_ids=None):
    attended, cache = self.attention(self.attention_norm(x), positions, segment_ids, cache,
                                     bidirectional_ids, branch_ids)
    x = constrain(x + attended, ("batch", "length", "act_embed"))
    normed = self.mlp_norm(x)
    out = self.mlp(normed)
    if hasattr(self, "shared_mlp"):
      out = out + self.shared_mlp(normed)
    x = constrain(x + out, ("batch", "length", "act_embed"))
    return x, cache


class Transformer(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.vocab_size is None:
      raise ValueError("ModelConfig.vocab_size is unset; maxlm.train fills it from the data's "
                       "tokenizer, other callers must set it")
    c = config
    self.config = c
    # Adapters draw from a stream of their own: a seed gives the same base weights with or
    # without them.
    adapter_rngs = nnx.Rngs(jax.random.split(rngs.params.key[...])[1]) if c.lora_rank else None
    # Tied, the embedding is also the output projection: drawn at 1/sqrt(embed_dim) like one, so
    # that a new model's logits have std ~1 and its loss starts near ln(vocab_size).
    self.embedding = _param(rngs, (c.vocab_size, c.embed_dim), ("vocab", "embed"),
                            c.embed_dim if c.tie_embeddings else 1)
    self.blocks = nnx.List([Block(c, rngs, adapter_rngs, layer) for layer in range(c.num_layers)])
    self.final_norm = RMSNorm(c.embed_dim, c.norm_eps)
    if not c.tie_embeddings:
      self.unembedding = _param(rngs, (c.embed_dim, c.vocab_size), ("embed", "vocab"), c.embed_dim)
    if c.vision is not None:  # drawn last: a seed gives the same LM with or without them
      self.vision = vit.VisionEncoder(c.vision, rngs=rngs)
      self.projector = vit.Projector(c.vision, c.embed_dim, rngs=rngs)
      if c.vision.contrastive_dim:
        self.contrastive = contrastive.ContrastiveHeads(c.vision.embed_dim, c.embed_dim,
                                                        c.vision.contrastive_dim, rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               logits_at: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """tokens, positions, segment_ids: [batch, seq] int.

    Without a cache: causal attention within each segment (packed documents never see
    each other). With a cache: the tokens are written at their positions and attend to
    every earlier slot (prefill and decode alike).
    `logits_at` ([batch] int), when given, computes the logits of that one position of each
    row only, as a prefill needs (the vocabulary projection is most of a short prompt's work).
    Returns (logits float32 [batch, seq or 1, vocab], updated cache or None).
    """
    x, new_cache = self.decode(self.embed(tokens), positions, segment_ids, cache)
    return self.logits(x, logits_at), new_cache

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, seq] int -> [batch, seq, embed] in the compute dtype. Other inputs
    (image patches) enter `decode` beside these."""
    embedding, dtype = self.embedding.get_value(), jnp.dtype(self.config.dtype)
    if quantization.is_quantized(embedding):
      x = quantization.take_rows(embedding, tokens, dtype)
    else:
      x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    return constrain(x, ("batch", "length", "act_embed"))

  def decode(self, x: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None, cache: KVCache | None = None,
             bidirectional_ids: jax.Array | None = None,
             branch_ids: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """x: [batch, seq, embed] through every block. Returns (hidden states before the final
    norm, updated cache or None); see `__call__` for the attention each case gets, and
    `layers.attention_mask` for `bidirectional_ids` ([batch, seq]: image patches) and
    `branch_ids` ([batch, seq]: a preference pair's replies after their shared prompt). With a
    cache, `bidirectional_ids` means a prefill: x is the whole prompt from position 0, which
    attends within itself and is written to the cache."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    if cache is None:
      run_block = _rematerialized(self.config.remat)
      for block in self.blocks:
        x = run_block(block, x, positions, segment_ids, bidirectional_ids, branch_ids)
      return x, None
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block(x, positions, segment_ids, layer_cache, bidirectional_ids,
                             branch_ids)
      new_cache.append(layer_cache)
    return x, new_cache

  def logits(self, x: jax.Array, logits_at: jax.Array | None = None) -> jax.Array:
    """Hidden states [batch, seq, embed] -> float32 logits [batch, seq or 1, vocab]."""
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    x = self.final_norm(x)
    dtype = jnp.dtype(self.config.dtype)
    kernel = (self.embedding if self.config.tie_embeddings else self.unembedding).get_value()
    if quantization.is_quantized(kernel):
      logits = (quantization.dense_transposed(x, kernel) if self.config.tie_embeddings
                else quantization.dense(x, kernel))
    elif self.config.tie_embeddings:
      logits = layers.dense(x, kernel.astype(dtype).T)
    else:
      logits = layers.dense(x, kernel.astype(dtype))
    return logits.astype(jnp.float32)


def merge_adapters(params: dict, config: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, config) of the same function without adapters: each adapted kernel W becomes
  W + A B * scale, so a merged model costs nothing extra per token. params: a pure dict as
  `nnx.to_pure_dict` gives it."""
  if not config.lora_rank:
    return params, config
  def merged(node):
    if not isinstance(node, dict):
      return node
    node = {key: merged(value) for key, value in node.items()}
    for name in LORA_TARGETS:
      if f"{name}_lora_a" in node:
        node[name] = layers.merged_kernel(node[name], node.pop(f"{name}_lora_a"),
                                          node.pop(f"{name}_lora_b"), config.lora_scale)
    return node
  return merged(params), dataclasses.replace(config, lora_rank=0)


def _run_block(block: Block, x, positions, segment_ids, bidirectional_ids=None,
               branch_ids=None):
  return block(x, positions, segment_ids, None, bidirectional_ids, branch_ids)[0]


def _rematerialized(remat: str):
  """`run_block(block, x, positions, segment_ids, bidirectional_ids, branch_ids) -> x` under
  the named remat policy."""
  if remat == "none":
    return _run_block
  return nnx.remat(_run_block, policy=REMAT_POLICIES[remat], prevent_cse=True)


def count_params(config: ModelConfig, active: bool = False) -> int:
  """Closed-form parameter count (adapters aside), independent of the module code, the vision
  tower and projector included. `active`: only the weights one token multiplies (its
  experts_per_token routed experts, not all)."""
  return language_model_params(config, active) + vision_params(config)


def vision_params(config: ModelConfig) -> int:
  """The ViT's, the projector's and SigLIP's heads' parameters (0 without a vision tower)."""
  if config.vision is None:
    return 0
  v = config.vision
  attention = v.embed_dim * v.head_dim * (2 * v.num_heads + 2 * v.num_kv_heads)
  per_layer = attention + 3 * v.embed_dim * v.mlp_dim + 2 * v.embed_dim
  embedding = (v.patch_size ** 2 * 3 + v.num_patches) * v.embed_dim
  projector = (v.embed_dim * config.embed_dim + config.embed_dim ** 2 if v.projector == "mlp"
               else v.embed_dim * config.embed_dim)
  heads = (v.embed_dim + config.embed_dim) * v.contrastive_dim + 2 if v.contrastive_dim else 0
  return v.num_layers * per_layer + embedding + v.embed_dim + projector + heads


def language_model_params(config: ModelConfig, active: bool = False) -> int:
  """`count_params` of the decoder alone: what every token's FLOPs come from."""
  c = config
  attention = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  moe_layers = c.num_moe_layers
  experts = (c.experts_per_token if active else c.num_experts) + c.num_shared_experts
  router = (c.embed_dim + c.routing_bias) * c.num_experts
  moe_mlp = router + 3 * c.embed_dim * c.expert_mlp_dim * experts
  mlps = (c.num_layers - moe_layers) * 3 * c.embed_dim * c.mlp_dim + moe_layers * moe_mlp
  per_layer = attention + 2 * c.embed_dim
  embeddings = c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
  return c.num_layers * per_layer + mlps + embeddings + c.embed_dim


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward): 6 per weight it multiplies
  (the input embedding is a lookup; of an MoE layer, the router and the token's experts),
  plus causal attention's scores and weighted sum. The decoder's only: a vision tower runs
  once per image, not per token, so a vision run's MFU leaves its FLOPs out."""
  c = config
  matmul_params = (language_model_params(c, active=True)
                   - c.vocab_size * c.embed_dim * (0 if c.tie_embeddings else 1)
                   - c.routing_bias * c.num_experts * c.num_moe_layers)
  attention = 6 * c.num_layers * c.num_heads * c.head_dim * seq_len  # 2 matmuls, half masked
  return 6.0 * matmul_params + attention
