"""Mesh construction and the logical-axis rules: the only place mesh axes are named.

Every parameter and activation axis carries a logical name ("embed", "mlp", "batch", ...).
`LOGICAL_RULES` maps each logical name onto zero or more mesh axes; a mesh axis that does not
divide a dimension (or is already used by another dimension of the same array) is dropped
for that array, so small configs still run on big meshes by replicating what cannot split.
"""

from collections.abc import Sequence

import gin
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# "expert" splits an MoE layer's experts, and the batch like "data" everywhere else.
MESH_AXES = ("data", "expert", "fsdp", "tensor")  # room for "sequence" when it lands

LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", ()),
    ("embed", ("fsdp",)),
    ("act_embed", ()),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("lora_rank", ()),  # a few columns: replicated, while the adapter's other axis splits
    ("patch", ()),         # a patch's pixels (ViT input), a few hundred
    ("image_length", ()),  # patches per image (ViT positions)
    ("expert", ("expert",)),  # an MoE layer's experts; tokens reach them by all-to-all
)
_RULES = dict(LOGICAL_RULES)


@gin.configurable(module="maxlm")
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, expert, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_sizes(data, fsdp, tensor, expert, len(devices))
  device_grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
  return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_sizes(data: int, fsdp: int, tensor: int, expert: int, num_devices: int) -> dict:
  """{mesh axis: size} of `make_mesh`'s arguments on `num_devices`, the -1 axis resolved.
  Sizes that do not fit raise ValueError in the form "make_mesh.AXIS=value must be ..."."""
  sizes = dict(zip(MESH_AXES, (data, expert, fsdp, tensor)))
  shown = lambda names: ", ".join(f"make_mesh.{n}={sizes[n]}" for n in names)  # noqa: E731
  if len(rest := [axis for axis, size in sizes.items() if size == -1]) > 1:
    raise ValueError(f"{shown(rest)} must be -1 on one axis at most (it takes the devices "
                     "the others leave); give the others sizes")
  known = int(np.prod([size for size in sizes.values() if size != -1]))
  if rest:
    others = [axis for axis in MESH_AXES if axis not in rest]
    if num_devices % known:
      raise ValueError(f"{shown(rest)} must take the devices the other axes leave, but "
                       f"{shown(others)} make {known}, which does not divide the {num_devices} "
                       "available devices; choose sizes whose product divides them")
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"{shown(MESH_AXES)} must multiply to the {num_devices} available devices, "
                     f"not {known}; change a size, or set one to -1 to take the rest")
  return sizes


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh_shape: dict[str, int]) -> PartitionSpec:
  """Maps one array's logical axis names to a PartitionSpec valid for `shape`."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in _RULES:
      raise KeyError(f"logical axis {name!r} has no rule in maxlm.sharding.LOGICAL_RULES")
    chosen = []
    for mesh_axis in _RULES.get(name, ()):
      size = mesh_shape.get(mesh_axis, 1)
      split = int(np.prod([mesh_shape[a] for a in chosen])) * size
      if size > 1 and mesh_axis not in used and dim % split == 0:
        chosen.append(mesh_axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
  """NamedShardings for a model's parameters, as a pure dict matching `nnx.to_pure_dict`."""
  def sharding_of(variable):
    shape = variable.get_value().shape
    axes = variable.get_metadata().get("logical_axes") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, dict(mesh.shape)))
  shardings = jax.tree.map(sharding_of, abstract_state,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch over (data, fsdp, expert), the rest
  replicated."""
  axes = ("batch",) + (None,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(axes, (batch_divisor(mesh),) + (1,) * (ndim - 1),
                                             dict(mesh.shape)))


def batch_divisor(mesh: Mesh) -> int:
  """How many ways the batch dimension is split: the global batch must divide by it."""
  return int(np.prod([mesh.shape[a] for a in _RULES["batch"]]))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation, a no-op outside a `jax.set_mesh` context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_spec(logical_axes, x.shape, dict(mesh.shape)))
