"""The optimizer against plain AdamW: the router's learning-rate scale."""

import jax.numpy as jnp
import numpy as np
import optax

from maxlm import optim

PARAMS = {"blocks": {0: {"mlp": {"router": jnp.full((4, 3), 0.5), "gate": jnp.full((4, 3), 0.5)},
                         "mlp_norm": {"scale": jnp.ones((4,))}}}}
GRADS = {"blocks": {0: {"mlp": {"router": jnp.full((4, 3), 0.2), "gate": jnp.full((4, 3), -0.3)},
                        "mlp_norm": {"scale": jnp.full((4,), 0.1)}}}}


def _update(optimizer):
  return optimizer.update(GRADS, optimizer.init(PARAMS), PARAMS)[0]


def test_the_router_scale_multiplies_only_the_routers_update_weight_decay_included():
  schedule = optim.learning_rate_schedule(10, 1e-2, warmup_steps=0)
  plain = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                  mask=lambda p: {"blocks": {0: {
                                      "mlp": {"router": True, "gate": True},
                                      "mlp_norm": {"scale": False}}}}))
  want = _update(plain)
  got = _update(optim.make_optimizer(schedule, router_learning_rate_scale=0.25))
  mlp, want_mlp = got["blocks"][0]["mlp"], want["blocks"][0]["mlp"]
  np.testing.assert_allclose(mlp["router"], 0.25 * want_mlp["router"], rtol=1e-6)
  np.testing.assert_allclose(mlp["gate"], want_mlp["gate"], rtol=1e-6)
  np.testing.assert_allclose(got["blocks"][0]["mlp_norm"]["scale"],
                             want["blocks"][0]["mlp_norm"]["scale"], rtol=1e-6)


def test_the_default_scale_keeps_the_optimizer_state_checkpoints_hold():
  schedule = optim.learning_rate_schedule(10)
  default = optim.make_optimizer(schedule).init(PARAMS)
  scaled = optim.make_optimizer(schedule, router_learning_rate_scale=0.5).init(PARAMS)
  assert len(default) == 2 and len(scaled) == 3
