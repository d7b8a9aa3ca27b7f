"""Mixture-of-experts feed-forward layer: a softmax top-k router and SwiGLU experts.

Each token goes to the `experts_per_token` experts its router scores highest, and their
outputs add up weighted by the router's probabilities renormalized over the chosen ones.
Two dispatches give the same result while no token is dropped:
- dropless: the token copies are sorted by expert and run through `jax.lax.ragged_dot`
  (a grouped matmul over contiguous groups), every copy computed;
- capacity: each expert takes at most `capacity` copies into a fixed [experts, capacity, embed]
  buffer (first choices of every token before second choices, then token order); the rest are
  dropped and contribute nothing.
On a mesh with an `expert` axis both run in `shard_map`: each device fills the buffer for its
own tokens, `all_to_all` sends each expert's slice to the devices holding that expert, and a
second `all_to_all` brings the outputs back (the dropless path then uses a capacity no expert
can exceed, its tokens per device).

With `ModelConfig.routing_bias`, a per-expert bias added to the router's logits chooses the
experts (not their weights), and the optimizer moves it against each expert's excess load
(`balance_signal`): DeepSeek-V3's auxiliary-loss-free balancing.

The layer records its router statistics with `sow` (`nnx.Intermediate`, name `router_stats`),
which only a forward pass under `nnx.capture` keeps (`run_with_router_stats`); `maxlm.tasks`
turns them into the auxiliary losses and metrics.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from maxlm import quantization, sharding
from maxlm.model import layers

DISPATCHES = ("dropless", "capacity")


def route(logits: jax.Array, experts_per_token: int, renormalize: bool = True,
          bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax top-k routing. logits: [tokens, experts] float32.

  Returns (weights float32 [tokens, k], experts int32 [tokens, k], best first). The weights
  are the chosen experts' probabilities, renormalized to sum to 1 per token unless
  `renormalize` is False: top-1 needs the raw probability, or its weight is always 1 and the
  router learns nothing from the task's loss. A `bias` [experts] (DeepSeek-V3's
  auxiliary-loss-free balancing) is added to the logits to choose the experts only; the
  weights stay the unbiased probabilities.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  if bias is None:
    top_probs, experts = jax.lax.top_k(probs, experts_per_token)
  else:
    _, experts = jax.lax.top_k(logits + bias, experts_per_token)
    top_probs = jnp.take_along_axis(probs, experts, axis=-1)
  if renormalize:
    top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  return top_probs, experts.astype(jnp.int32)


def expert_fractions(experts: jax.Array, num_experts: int) -> jax.Array:
  """experts: int [tokens, k] -> float32 [num_experts], the share of token copies each gets."""
  counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
  return counts / experts.size


def load_balancing_loss(logits: jax.Array, experts: jax.Array) -> jax.Array:
  """Switch Transformer's N * sum_i f_i P_i: f_i the share of token copies routed to expert i,
  P_i its mean router probability. 1 for a uniform router, N when one expert takes all.
  logits: [tokens, N] float32; experts: int [tokens, k]."""
  num_experts = logits.shape[-1]
  mean_probs = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
  return num_experts * jnp.sum(expert_fractions(experts, num_experts) * mean_probs)


# Small enough that the routing biases' gradients barely count in the global norm that
# clipping measures; Adam's normalized step does not see the scale.
BALANCE_SIGNAL_SCALE = 1e-4


def balance_signal(bias: jax.Array, fractions: jax.Array) -> jax.Array:
  """0 in value; its gradient with respect to the routing `bias` [experts] is each expert's
  share of this pass's token copies (`fractions`, as `expert_fractions` gives them) minus the
  mean share, times BALANCE_SIGNAL_SCALE. Added to the loss, it makes the optimizer lower an
  overloaded expert's bias and raise an idle one's, the load-driven update of DeepSeek-V3's
  auxiliary-loss-free balancing (there a fixed step against the excess's sign; here AdamW's
  step, close to that, or `make_optimizer.routing_bias_update_rate`'s step in proportion to
  `load_excess`)."""
  excess = jax.lax.stop_gradient(fractions - jnp.mean(fractions))
  return BALANCE_SIGNAL_SCALE * jnp.sum(excess * (bias - jax.lax.stop_gradient(bias)))


def load_excess(balance_gradient: jax.Array) -> jax.Array:
  """Each expert's share over the mean share, minus 1, from `balance_signal`'s gradient with
  respect to the routing bias [experts] (the shares' mean is 1 / experts)."""
  return balance_gradient * balance_gradient.shape[-1] / BALANCE_SIGNAL_SCALE


def router_z_loss(logits: jax.Array) -> jax.Array:
  """Mean over tokens of logsumexp(logits)**2 (ST-MoE), which keeps router logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def capacity_of(tokens: int, experts_per_token: int, num_experts: int, factor: float) -> int:
  """Token copies one expert takes: `factor` times an even share, at most every token."""
  return max(1, min(tokens, math.ceil(factor * tokens * experts_per_token / num_experts)))


def slots(experts: jax.Array, num_experts: int) -> jax.Array:
  """Each token copy's place in its expert's queue: first choices of all tokens, in token
  order, then second choices, and so on. experts: int [tokens, k] -> int32 [tokens, k]."""
  by_choice = experts.T.reshape(-1)                                    # [k * tokens]
  order = jnp.argsort(by_choice, stable=True)
  counts = jnp.zeros((num_experts,), jnp.int32).at[by_choice].add(1)
  group_start = jnp.cumsum(counts) - counts
  sorted_experts = by_choice[order]
  rank = jnp.arange(by_choice.size, dtype=jnp.int32) - group_start[sorted_experts]
  place = jnp.zeros_like(by_choice).at[order].set(rank)
  return place.reshape(experts.shape[::-1]).T


def per_expert(x: jax.Array, kernel) -> jax.Array:
  """x [..., experts, capacity, in] through each expert's kernel [experts, in, out] (float,
  or int8 for serving)."""
  if quantization.is_quantized(kernel):
    return quantization.per_group_dense(x, kernel)
  return jnp.einsum("...ecd,edf->...ecf", x, kernel)


def grouped(copies: jax.Array, kernel, group_sizes: jax.Array,
            row_experts: jax.Array) -> jax.Array:
  """Token copies [rows, in] sorted by expert through their experts' kernels (float, or int8
  for serving); row_experts [rows]: each copy's expert."""
  if quantization.is_quantized(kernel):
    return quantization.grouped_dense(copies, kernel, group_sizes, row_experts)
  return jax.lax.ragged_dot(copies, kernel, group_sizes)


def swiglu_experts(x: jax.Array, gate, up, down) -> jax.Array:
  """Every expert on its own buffer. x: [..., experts, capacity, embed]; gate, up:
  [experts, embed, mlp]; down: [experts, mlp, embed]. Returns x's shape."""
  hidden = layers.swiglu(per_expert(x, gate), per_expert(x, up))
  return per_expert(hidden, down)


def dropless(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array,
             up: jax.Array, down: jax.Array) -> jax.Array:
  """x: [tokens, embed]; weights, experts: [tokens, k]; kernels as in `swiglu_experts`.
  Every token copy is computed: sorted by expert, one grouped matmul per kernel."""
  num_experts, k = gate.shape[0], experts.shape[1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  copies = x[order // k]                                               # [tokens * k, embed]
  row_experts = flat[order]
  hidden = layers.swiglu(grouped(copies, gate, group_sizes, row_experts),
                         grouped(copies, up, group_sizes, row_experts))
  out = jnp.zeros_like(copies).at[order].set(grouped(hidden, down, group_sizes, row_experts))
  return jnp.einsum("tkd,tk->td", out.reshape(*experts.shape, -1), weights.astype(x.dtype))


def dispatch(x: jax.Array, experts: jax.Array, places: jax.Array, num_experts: int,
             capacity: int) -> jax.Array:
  """The [experts, capacity, embed] buffer of token copies; copies past capacity are left out.
  x: [tokens, embed]; experts, places: [tokens, k]."""
  k = experts.shape[1]
  buffer = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
  copies = jnp.repeat(x, k, axis=0)
  return buffer.at[experts.reshape(-1), places.reshape(-1)].set(copies, mode="drop")


def combine(buffer: jax.Array, weights: jax.Array, experts: jax.Array,
            places: jax.Array) -> jax.Array:
  """Inverse of `dispatch` on the experts' outputs, weighted: [tokens, embed]; a dropped copy
  adds nothing."""
  out = buffer.at[experts, places].get(mode="fill", fill_value=0)      # [tokens, k, embed]
  return jnp.einsum("tkd,tk->td", out, weights.astype(buffer.dtype))


def with_capacity(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array,
                  up: jax.Array, down: jax.Array, capacity: int) -> jax.Array:
  """Capacity-based dispatch on one device; arguments as in `dropless`."""
  places = slots(experts, gate.shape[0])
  buffer = dispatch(x, experts, places, gate.shape[0], capacity)
  return combine(swiglu_experts(buffer, gate, up, down), weights, experts, places)


def expert_parallel(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array,
                    up: jax.Array, down: jax.Array, factor: float | None,
                    token_axes) -> jax.Array:
  """Capacity dispatch across the mesh's `expert` axis (`factor=None`: no drops). Tokens
  [tokens, ...] are split over `token_axes`, which include "expert"; kernels over "expert"."""
  num_experts, k = gate.shape[0], experts.shape[1]
  token_spec, kernel_spec = PartitionSpec(token_axes), PartitionSpec("expert")

  def local(x, weights, experts, gate, up, down):
    tokens = x.shape[0]
    capacity = tokens if factor is None else capacity_of(tokens, k, num_experts, factor)
    places = slots(experts, num_experts)
    buffer = dispatch(x, experts, places, num_experts, capacity)
    # [experts, capacity, embed] -> [source device, local experts, capacity, embed]
    received = jax.lax.all_to_all(buffer, "expert", 0, 0, tiled=True)
    received = received.reshape(-1, gate.shape[0], capacity, x.shape[-1])
    out = swiglu_experts(received, gate, up, down).reshape(buffer.shape)
    return combine(jax.lax.all_to_all(out, "expert", 0, 0, tiled=True), weights, experts,
                   places)

  return jax.shard_map(local, in_specs=(token_spec,) * 3 + (kernel_spec,) * 3,
                       out_specs=token_spec)(x, weights, experts, gate, up, down)


def run_with_router_stats(model, *args, **kwargs) -> tuple:
  """(model(*args, **kwargs), {block index: that pass's `router_stats`}) for a Transformer
  `model`; the dict is empty for a dense model."""
  out, intermediates = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
  blocks = intermediates.get("blocks", {})
  return out, {int(index): block["mlp"]["router_stats"].get_value()[-1]
               for index, block in blocks.items() if "router_stats" in block.get("mlp", {})}


def router_metrics(stats: dict[int, dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Scalar metrics of `run_with_router_stats`' stats, named `moe/layer{i}/...`, plus
  `moe/passes` (1): microbatches add them up, so a reader divides by `moe/passes`."""
  metrics = {"moe/passes": jnp.float32(1)}
  for index, layer in stats.items():
    prefix = f"moe/layer{index}/"
    fractions = layer["expert_fractions"]
    metrics.update({f"{prefix}expert{expert}_fraction": fraction
                    for expert, fraction in enumerate(fractions)})
    metrics[f"{prefix}load_max_over_mean"] = jnp.max(fractions) * fractions.size
    metrics.update({prefix + name: layer[name] for name in
                    ("dropped_fraction", "load_balancing_loss", "router_z_loss")})
  return metrics


def _expert_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...],
                  fan_in: int) -> nnx.Param:
  init = jax.nn.initializers.normal(stddev=fan_in ** -0.5)
  return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


class MoE(nnx.Module):
  """Routed SwiGLU experts in place of a block's MLP (shared experts live beside it, in the
  block). config: a ModelConfig."""

  def __init__(self, config, rngs: nnx.Rngs):
    c = config
    self.config = c
    experts, dim, hidden = c.num_experts, c.embed_dim, c.expert_mlp_dim
    self.router = _expert_param(rngs, (dim, experts), ("embed", None), dim)
    if c.routing_bias:
      self.routing_bias = nnx.Param(jnp.zeros((experts,), jnp.float32), logical_axes=(None,))
    self.gate = _expert_param(rngs, (experts, dim, hidden), ("expert", "embed", "mlp"), dim)
    self.up = _expert_param(rngs, (experts, dim, hidden), ("expert", "embed", "mlp"), dim)
    self.down = _expert_param(rngs, (experts, hidden, dim), ("expert", "mlp", "embed"),
                              hidden * c.num_layers * 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, embed] -> the same shape."""
    c = self.config
    tokens = x.reshape(-1, x.shape[-1])
    logits = layers.dense(tokens.astype(jnp.float32), self.router[...])
    bias = self.routing_bias[...] if c.routing_bias else None
    weights, experts = route(logits, c.experts_per_token, c.renormalize_routing, bias)
    gate, up, down = (_as_dtype(kernel.get_value(), x.dtype)
                      for kernel in (self.gate, self.up, self.down))
    factor = c.capacity_factor if c.moe_dispatch == "capacity" else None
    token_axes = _expert_token_axes(tokens.shape, c.num_experts)
    if token_axes is not None:
      out = expert_parallel(tokens, weights, experts, gate, up, down, factor, token_axes)
    elif factor is None:
      out = dropless(tokens, weights, experts, gate, up, down)
    else:
      capacity = capacity_of(tokens.shape[0], c.experts_per_token, c.num_experts, factor)
      out = with_capacity(tokens, weights, experts, gate, up, down, capacity)
    self.sow(nnx.Intermediate, "router_stats",
             router_stats(logits, experts, factor, token_axes, bias), capture_noop=True)
    return out.reshape(x.shape)


def _as_dtype(kernel, dtype):
  """A float kernel in the compute dtype; an int8 one (serving) as it is."""
  return kernel if quantization.is_quantized(kernel) else kernel.astype(dtype)


def router_stats(logits: jax.Array, experts: jax.Array, factor: float | None,
                 token_axes, bias: jax.Array | None = None) -> dict[str, jax.Array]:
  """One layer's unweighted auxiliary losses, per-expert shares and the share of token copies
  the capacity dispatch drops (0 for dropless), all float32; with a routing `bias`, its
  `balance_signal` too."""
  num_experts, k = logits.shape[-1], experts.shape[1]
  if factor is None:
    dropped = jnp.float32(0)
  else:
    # Each device of the expert axis fills its own buffers, so capacity holds per device.
    shards = 1 if token_axes is None else _axes_size(token_axes)
    local = experts.reshape(shards, -1, k)
    capacity = capacity_of(local.shape[1], k, num_experts, factor)
    places = jax.vmap(lambda e: slots(e, num_experts))(local)
    dropped = jnp.mean((places >= capacity).astype(jnp.float32))
  fractions = expert_fractions(experts, num_experts)
  stats = {"load_balancing_loss": load_balancing_loss(logits, experts),
           "router_z_loss": router_z_loss(logits),
           "expert_fractions": fractions,
           "dropped_fraction": dropped}
  if bias is not None:
    stats["balance_signal"] = balance_signal(bias, fractions)
  return stats


def _expert_token_axes(shape: tuple[int, ...], num_experts: int):
  """The mesh axes a [tokens, embed] array splits over when it crosses an `expert` mesh
  axis of more than one device, else None (one device, or tokens that do not split)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("expert", 1) == 1:
    return None
  if num_experts % mesh.shape["expert"]:
    raise ValueError(f"ModelConfig.num_experts={num_experts} does not split over "
                     f"make_mesh.expert={mesh.shape['expert']}; make it a multiple")
  spec = sharding.logical_to_spec(("batch", None), shape, dict(mesh.shape))
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return axes if "expert" in axes else None


def _axes_size(axes) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[axis] for axis in axes)
