"""SigLIP (maxlm.model.contrastive and the SigLIP task) against a float64 NumPy reference, a
short contrastive training that learns to match images to captions, and init_from's rule for
the heads (the stage chain, a SigLIP run's ViT into the projector stage, is in test_vit.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maxlm import checkpoint
from maxlm.config_checks import check_same_model
from maxlm.errors import UserError
from maxlm.model import ModelConfig, Transformer, contrastive
from maxlm.model.vit import VisionConfig
from maxlm.vision_tasks import siglip_loss

IMAGE_ID = 7
VISION = VisionConfig(image_size=16, patch_size=4, num_layers=2, embed_dim=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=48, image_token_id=IMAGE_ID,
                      contrastive_dim=16)
CONFIG = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_seq_len=64, vision=VISION)


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_siglip(image_features, text_features, heads, captions):
  """(loss summed over real pairs, retrieval hits) in float64; `captions` holds each row's
  caption as a tuple of token ids, or None for a padding row."""
  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  # np.asarray first: a JAX array's astype(float64) stays float32 without jax_enable_x64.
  images = unit(np.asarray(image_features, np.float64) @ np.asarray(heads["image"], np.float64))
  texts = unit(np.asarray(text_features, np.float64) @ np.asarray(heads["text"], np.float64))
  logits = np.exp(float(heads["log_scale"])) * images @ texts.T + float(heads["bias"])
  real = [c is not None for c in captions]
  loss, hits = 0.0, 0
  for i, ci in enumerate(captions):
    if ci is None:
      continue
    for j, cj in enumerate(captions):
      if cj is not None:
        loss -= np_log_sigmoid(logits[i, j] if sorted(ci) == sorted(cj) else -logits[i, j])
    best = max((j for j in range(len(captions)) if real[j]), key=lambda j: logits[i, j])
    hits += sorted(ci) == sorted(captions[best])
  return loss, hits


def test_sigmoid_loss_and_retrieval_equal_a_float64_numpy_reference():
  rng = np.random.default_rng(0)
  heads = nnx.to_pure_dict(nnx.state(contrastive.ContrastiveHeads(6, 7, 4, rngs=nnx.Rngs(1))))
  heads["log_scale"], heads["bias"] = np.float32(1.5), np.float32(-2.0)
  image_features = rng.normal(size=(5, 6)).astype(np.float32)
  text_features = rng.normal(size=(5, 7)).astype(np.float32)
  # Rows 0 and 2 hold the same caption at other offsets; row 3 the same words reordered; row 4
  # is padding.
  tokens = np.array([[1, 9, 20, 21, 0, 0], [1, 9, 9, 22, 23, 0], [1, 9, 9, 20, 21, 0],
                     [1, 9, 21, 20, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
  mask = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0],
                   [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  captions = [tuple(t[m]) if m.any() else None for t, m in zip(tokens, mask)]
  model = contrastive.ContrastiveHeads(6, 7, 4, rngs=nnx.Rngs(1))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, heads)
  nnx.update(model, state)
  logits = model(jnp.asarray(image_features), jnp.asarray(text_features))
  positives = contrastive.same_text(jnp.asarray(tokens), jnp.asarray(mask), 64)
  real = jnp.asarray(mask.any(axis=1))
  want_loss, want_hits = np_siglip(image_features, text_features, heads, captions)
  np.testing.assert_allclose(float(contrastive.sigmoid_loss_sum(logits, positives, real)),
                             want_loss, rtol=1e-5)
  assert int(contrastive.retrieval_hits(logits, positives, real)) == want_hits


def test_masked_mean_averages_only_the_masked_positions():
  x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  mask = np.array([[1, 0, 1], [0, 0, 0]], bool)
  got = np.asarray(contrastive.masked_mean(jnp.asarray(x), jnp.asarray(mask)))
  np.testing.assert_array_equal(got, [(x[0, 0] + x[0, 2]) / 2, np.zeros(4)])


COLORS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90))  # class k: caption k


def color_batch(rng, rows=8):
  """Rows of one image each, a flat color (plus noise) of four, captioned [20 + 2k, 21 + 2k];
  the caption is the reply."""
  n = VISION.num_patches
  tokens, mask, images = [], [], []
  for k in rng.integers(0, len(COLORS), rows):
    tokens.append([1, *[IMAGE_ID] * n, 8, 20 + 2 * k, 21 + 2 * k, 2])
    mask.append([0] * (n + 2) + [1, 1, 0])
    noise = rng.integers(-20, 21, (16, 16, 3))
    images.append(np.clip(np.array(COLORS[k]) + noise, 0, 255).astype(np.uint8))
  tokens = np.array(tokens, np.int32)
  return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
          "positions": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).copy(),
          "loss_mask": np.array(mask, np.int32), "image": np.stack(images)}


def test_a_few_siglip_steps_learn_which_caption_goes_with_which_image():
  graphdef, trained, frozen = nnx.split(
      Transformer(CONFIG, rngs=nnx.Rngs(0)),
      lambda path, _: path[0] in ("vision", "contrastive"), ...)
  optimizer = optax.adam(3e-3)

  def loss_fn(trained, batch):
    return siglip_loss(nnx.merge(graphdef, trained, frozen), batch)

  @jax.jit
  def step(trained, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained, batch)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss, metrics

  rng = np.random.default_rng(0)
  held_out = color_batch(np.random.default_rng(99), rows=16)
  before = jax.jit(loss_fn)(trained, held_out)[1]
  opt_state = optimizer.init(trained)
  for _ in range(40):
    trained, opt_state, _, _ = step(trained, opt_state, color_batch(rng))
  after = jax.jit(loss_fn)(trained, held_out)[1]
  assert float(before["retrieval_hits"]) < 16 == float(after["retrieval_hits"])
  assert float(after["siglip_loss_sum"]) < 0.5 * float(before["siglip_loss_sum"])


def test_the_text_side_never_sees_the_image(monkeypatch):
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  batch = color_batch(np.random.default_rng(1), rows=4)
  texts, heads = [], contrastive.ContrastiveHeads.__call__

  def capture(self, image_features, text_features):
    texts.append(np.asarray(text_features))
    return heads(self, image_features, text_features)

  monkeypatch.setattr(contrastive.ContrastiveHeads, "__call__", capture)
  siglip_loss(model, batch)
  siglip_loss(model, {**batch, "image": 255 - batch["image"]})
  np.testing.assert_array_equal(texts[0], texts[1])


def test_init_from_lets_the_heads_come_and_go_but_not_change_width():
  with_heads = checkpoint.model_meta(CONFIG, tokenizer_sha256="t")
  without = ModelConfig(**{**CONFIG.__dict__,
                           "vision": VisionConfig(**{**VISION.__dict__, "contrastive_dim": 0})})
  check_same_model(with_heads, checkpoint.model_meta(without, tokenizer_sha256="t"), "runs/s",
                   without)
  check_same_model(checkpoint.model_meta(without, tokenizer_sha256="t"), with_heads, "runs/p",
                   CONFIG)
  wider = ModelConfig(**{**CONFIG.__dict__,
                         "vision": VisionConfig(**{**VISION.__dict__, "contrastive_dim": 8})})
  with pytest.raises(UserError, match=re.escape(  # the field that differs, not both configs
      f"another model shape (vision.contrastive_dim: {VISION.contrastive_dim} -> 8);")):
    check_same_model(with_heads, checkpoint.model_meta(wider, tokenizer_sha256="t"), "runs/s",
                     wider)
