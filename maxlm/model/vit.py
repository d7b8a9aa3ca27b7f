"""A vision transformer (ViT) and the projector from its patches into the LM's embedding width.

Images [batch, images, height, width, 3] uint8 are cut into square patches, each flattened
and projected to the ViT's width, plus a learned position per patch; pre-norm blocks of the
decoder's layers (RMSNorm, SwiGLU, grouped attention) follow, except that every patch sees
every other one. The projector (one linear map, or two with a GELU between) turns each patch
into one embedding of the language model's width: an image is `num_patches` tokens.
Parameters carry logical axes like the decoder's, so `maxlm.sharding`'s table places them.
"""

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.model import layers
from maxlm.sharding import constrain

PROJECTORS = ("linear", "mlp")


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower's shape; `image_token_id=None` means "take it from the data's tokenizer"
  (the id of `<|image|>`, the placeholder each patch embedding replaces)."""
  image_size: int = 32
  patch_size: int = 8
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  norm_eps: float = 1e-6
  projector: str = "mlp"  # "linear", or "mlp": linear, GELU, linear
  image_token_id: int | None = None
  contrastive_dim: int = 0  # > 0: SigLIP's heads of this width (maxlm.model.contrastive)

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig.patch_size={self.patch_size} must divide "
                       f"VisionConfig.image_size={self.image_size}")
    if self.projector not in PROJECTORS:
      raise ValueError(f"VisionConfig.projector={self.projector!r}; choose one of "
                       f"{', '.join(PROJECTORS)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"VisionConfig.num_heads={self.num_heads} must be a multiple of "
                       f"VisionConfig.num_kv_heads={self.num_kv_heads}")

  @property
  def num_patches(self) -> int:
    """Tokens per image: each `<|image|>` placeholder stands for this many positions."""
    return (self.image_size // self.patch_size) ** 2


def patches(images: jax.Array, patch_size: int) -> jax.Array:
  """images: [..., height, width, channels] -> [..., num_patches, patch_size**2 * channels],
  patches in row-major order, each flattened (row, column, channel)."""
  *leading, height, width, channels = images.shape
  rows, cols = height // patch_size, width // patch_size
  x = images.reshape(*leading, rows, patch_size, cols, patch_size, channels)
  x = jnp.moveaxis(x, -4, -3)                    # [..., rows, cols, patch, patch, channels]
  return x.reshape(*leading, rows * cols, patch_size * patch_size * channels)


def pixels_to_unit_range(images: jax.Array, dtype) -> jax.Array:
  """uint8 pixels [0, 255] -> [-1, 1] in `dtype`."""
  return (images.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...],
           fan_in: int) -> nnx.Param:
  init = jax.nn.initializers.normal(stddev=fan_in ** -0.5)
  return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


class VisionBlock(nnx.Module):
  """Pre-norm: x + attention(norm(x)), then x + SwiGLU(norm(x)); every patch sees all."""

  def __init__(self, c: VisionConfig, rngs: nnx.Rngs):
    self.config = c
    self.attention_norm = nnx.Param(jnp.ones((c.embed_dim,), jnp.float32), logical_axes=("embed",))
    self.q = _param(rngs, (c.embed_dim, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                    c.embed_dim)
    self.k = _param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                    ("embed", "kv_heads", "head_dim"), c.embed_dim)
    self.v = _param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                    ("embed", "kv_heads", "head_dim"), c.embed_dim)
    self.o = _param(rngs, (c.num_heads, c.head_dim, c.embed_dim), ("heads", "head_dim", "embed"),
                    c.num_heads * c.head_dim * c.num_layers * 2)
    self.mlp_norm = nnx.Param(jnp.ones((c.embed_dim,), jnp.float32), logical_axes=("embed",))
    self.gate = _param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c.embed_dim)
    self.up = _param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c.embed_dim)
    self.down = _param(rngs, (c.mlp_dim, c.embed_dim), ("mlp", "embed"),
                       c.mlp_dim * c.num_layers * 2)

  def _joined(self, *names: str, dtype) -> jax.Array:
    """The kernels `names` side by side on their first output axis: one matmul instead of
    several smaller ones, which XLA:CPU runs at a lower rate; the parameters keep their own
    shapes, so checkpoints do too."""
    return jnp.concatenate([getattr(self, name)[...].astype(dtype) for name in names], axis=1)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, patches, embed]."""
    c, dtype = self.config, x.dtype
    normed = layers.rms_norm(x, self.attention_norm[...], c.norm_eps)
    qkv = layers.dense(normed, self._joined("q", "k", "v", dtype=dtype))
    q, k, v = jnp.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=2)
    attended = layers.full_attention(q, k, v)
    x = x + layers.dense(attended, self.o[...].astype(dtype), contracting_dims=2)
    x = constrain(x, ("batch", "length", "act_embed"))
    normed = layers.rms_norm(x, self.mlp_norm[...], c.norm_eps)
    hidden = layers.packed_swiglu(layers.dense(normed, self._joined("gate", "up", dtype=dtype)))
    x = x + layers.dense(hidden, self.down[...].astype(dtype))
    return constrain(x, ("batch", "length", "act_embed"))


class VisionEncoder(nnx.Module):
  """Images -> patch features [batch, images, num_patches, vision embed_dim]."""

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    patch_pixels = c.patch_size * c.patch_size * 3
    self.patch_embedding = _param(rngs, (patch_pixels, c.embed_dim), ("patch", "embed"),
                                  patch_pixels)
    self.position_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (c.num_patches, c.embed_dim), jnp.float32) * 0.02,
        logical_axes=("image_length", "embed"))
    self.blocks = nnx.List([VisionBlock(c, rngs) for _ in range(c.num_layers)])
    self.final_norm = nnx.Param(jnp.ones((c.embed_dim,), jnp.float32), logical_axes=("embed",))

  def __call__(self, images: jax.Array, dtype=jnp.float32) -> jax.Array:
    """images: uint8 [batch, images, height, width, 3]; returns `dtype` features."""
    c = self.config
    batch, count = images.shape[:2]
    x = patches(pixels_to_unit_range(images, dtype), c.patch_size)
    x = x.reshape(batch * count, c.num_patches, -1)         # each image its own sequence
    x = layers.dense(x, self.patch_embedding[...].astype(dtype))
    x = constrain(x + self.position_embedding[...].astype(dtype),
                  ("batch", "length", "act_embed"))
    for block in self.blocks:
      x = block(x)
    x = layers.rms_norm(x, self.final_norm[...], c.norm_eps)
    return x.reshape(batch, count, c.num_patches, c.embed_dim)


class Projector(nnx.Module):
  """ViT features -> LM embeddings: `linear`, or `mlp` (linear, GELU, linear) as LLaVA-1.5."""

  def __init__(self, config: VisionConfig, lm_embed_dim: int, *, rngs: nnx.Rngs):
    self.config = config
    width = config.embed_dim
    if config.projector == "mlp":
      self.hidden = _param(rngs, (width, lm_embed_dim), ("embed", "mlp"), width)
      width = lm_embed_dim
    self.out = _param(rngs, (width, lm_embed_dim), ("mlp", "embed"), width)

  def __call__(self, features: jax.Array) -> jax.Array:
    """features: [..., vision embed_dim] -> [..., lm embed_dim], in features' dtype."""
    dtype = features.dtype
    if self.config.projector == "mlp":
      features = jax.nn.gelu(layers.dense(features, self.hidden[...].astype(dtype)))
    return layers.dense(features, self.out[...].astype(dtype))
