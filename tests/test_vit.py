"""The vision model against float64 NumPy references: ViT and projector forward, placeholder
expansion, the prefix-LM mask (XLA path; the kernel's is in test_flash_attention.py), the text-only
loss, sharded steps, and a projector-only run that leaves the LM and the ViT as they were."""

import contextlib
import functools
import json
import math
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import gin
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx

from beam_pipelines import prepare_text
from beam_pipelines.chat_template import IMAGE_TOKEN, expand_image_placeholders
from beam_pipelines.records import (MANIFEST_NAME, RECORD_FORMAT, encode_record, field,
                                    manifest_fields)
from maxlm import checkpoint, optim, runs, sharding, steps
from maxlm.errors import UserError
from maxlm import train as train_module
from maxlm.model import ModelConfig, Transformer, layers, multimodal
from maxlm.model.vit import Projector, VisionConfig, VisionEncoder
from maxlm.vision_tasks import VisionSFT, text_targets

from conftest import TINY_MODEL, kill_after_step, train_subprocess

IMAGE_ID = 7
VISION = VisionConfig(image_size=16, patch_size=4, num_layers=2, embed_dim=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=48, image_token_id=IMAGE_ID)
CONFIG = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_seq_len=64, vision=VISION)
N = VISION.num_patches  # 16


def float64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_masked_attention(q, k, v, mask):
  """q: [seq, heads, d]; k, v: [seq, kv_heads, d]; mask: bool [seq, seq]; loop over pairs."""
  group = q.shape[1] // k.shape[1]
  out = np.zeros_like(q)
  for head in range(q.shape[1]):
    for i in range(q.shape[0]):
      seen = np.flatnonzero(mask[i])
      scores = np.array([q[i, head] @ k[j, head // group] for j in seen]) / np.sqrt(q.shape[2])
      weights = np.exp(scores - scores.max())
      out[i, head] = (weights / weights.sum()) @ v[seen, head // group]
  return out


def np_vit(p, image, c: VisionConfig):
  """One uint8 image [h, w, 3] -> [num_patches, embed], written from the ViT recipe."""
  pixels = image.astype(np.float64) / 127.5 - 1.0
  side = c.image_size // c.patch_size
  x = np.stack([pixels[r * c.patch_size:(r + 1) * c.patch_size,
                       col * c.patch_size:(col + 1) * c.patch_size].reshape(-1)
                for r in range(side) for col in range(side)])
  x = x @ p["patch_embedding"] + p["position_embedding"]
  everything = np.ones((len(x), len(x)), bool)
  for block in p["blocks"].values():
    h = np_rms_norm(x, block["attention_norm"], c.norm_eps)
    q, k, v = (np.einsum("se,ehd->shd", h, block[name]) for name in "qkv")
    x = x + np.einsum("shd,hde->se", np_masked_attention(q, k, v, everything), block["o"])
    h = np_rms_norm(x, block["mlp_norm"], c.norm_eps)
    gate = h @ block["gate"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ block["up"])) @ block["down"]
  return np_rms_norm(x, p["final_norm"], c.norm_eps)


def np_projector(p, x, c: VisionConfig):
  if c.projector == "mlp":
    h = x @ p["hidden"]
    x = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # tanh GELU
  return x @ p["out"]


def random_images(rng, *shape):
  return rng.integers(0, 256, (*shape, VISION.image_size, VISION.image_size, 3), dtype=np.uint8)


@pytest.mark.parametrize("projector", ["mlp", "linear"])
def test_vit_and_projector_forward_equal_a_float64_numpy_reference(projector):
  c = VisionConfig(**{**VISION.__dict__, "projector": projector})
  encoder, project = VisionEncoder(c, rngs=nnx.Rngs(0)), Projector(c, 40, rngs=nnx.Rngs(1))
  images = random_images(np.random.default_rng(0), 2, 3)
  got = project(encoder(jnp.asarray(images)))
  vit_params, projector_params = (float64(nnx.to_pure_dict(nnx.state(m)))
                                  for m in (encoder, project))
  assert got.shape == (2, 3, c.num_patches, 40)
  for b in range(2):
    for i in range(3):
      want = np_projector(projector_params, np_vit(vit_params, images[b, i], c), c)
      np.testing.assert_allclose(np.asarray(got[b, i]), want, atol=2e-5, rtol=2e-4)


def plain_vit(p, images, c: VisionConfig):
  """The ViT recipe in plain jnp (a softmax of all scores, SiLU times up), for autodiff."""
  x = layers.dense(vit_patches(images, c), p["patch_embedding"]) + p["position_embedding"]
  group = c.num_heads // c.num_kv_heads
  for block in p["blocks"].values():
    h = layers.rms_norm(x, block["attention_norm"], c.norm_eps)
    q, k, v = (jnp.einsum("bse,ehd->bshd", h, block[name]) for name in "qkv")
    k, v = (jnp.repeat(t, group, axis=2) for t in (k, v))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim))
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    x = x + jnp.einsum("bshd,hde->bse", attended, block["o"])
    h = layers.rms_norm(x, block["mlp_norm"], c.norm_eps)
    x = x + (jax.nn.silu(h @ block["gate"]) * (h @ block["up"])) @ block["down"]
  return layers.rms_norm(x, p["final_norm"], c.norm_eps)


def vit_patches(images, c: VisionConfig):
  pixels = images.astype(jnp.float32) / 127.5 - 1.0                   # [b, h, w, 3]
  side = c.image_size // c.patch_size
  x = pixels.reshape(-1, side, c.patch_size, side, c.patch_size, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, side * side, c.patch_size * c.patch_size * 3)


def test_vit_gradients_equal_autodiff_of_the_plain_recipe():
  """The ViT's own gradients (full attention keeping its probabilities, SwiGLU from one packed
  matmul, q/k/v from one) against autodiff through plain jnp, grouped heads included."""
  encoder = VisionEncoder(VISION, rngs=nnx.Rngs(0))
  images = jnp.asarray(random_images(np.random.default_rng(0), 3, 1))
  weights = jax.random.normal(jax.random.key(1), (3, VISION.num_patches, VISION.embed_dim))
  params = nnx.to_pure_dict(nnx.state(encoder))
  graphdef, state = nnx.split(encoder)
  got = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(images)[:, 0] * weights))(state)
  want = jax.grad(lambda p: jnp.sum(plain_vit(p, images[:, 0], VISION) * weights))(params)
  got = nnx.to_pure_dict(got)
  for path, expected in jax.tree_util.tree_leaves_with_path(want):
    actual = functools.reduce(lambda tree, key: tree[key.key], path, got)
    np.testing.assert_allclose(actual, expected, atol=1e-5 * float(jnp.max(jnp.abs(expected))),
                               rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_placeholders_expand_to_one_position_per_patch_and_take_the_patches_in_order():
  ids = expand_image_placeholders([1, 9, IMAGE_ID, 10, 11, IMAGE_ID, 12], IMAGE_ID, 3)
  assert ids == [1, 9, *[IMAGE_ID] * 3, 10, 11, *[IMAGE_ID] * 3, 12]
  rng = np.random.default_rng(0)
  tokens = np.array([ids, [IMAGE_ID] * 3 + [4, 5, 6, 13] + [IMAGE_ID] * 3 + [8]])
  text = rng.standard_normal((2, tokens.shape[1], 5)).astype(np.float32)
  patches = rng.standard_normal((2, 2, 3, 5)).astype(np.float32)
  is_image = multimodal.image_positions(jnp.asarray(tokens), IMAGE_ID, 3)
  got = np.asarray(multimodal.insert_image_embeddings(jnp.asarray(text), is_image,
                                                      jnp.asarray(patches)))
  for row in range(2):
    placeholders = [t for t in range(tokens.shape[1]) if tokens[row, t] == IMAGE_ID]
    for k, t in enumerate(placeholders):
      np.testing.assert_array_equal(got[row, t], patches[row, k // 3, k % 3])
    for t in sorted(set(range(tokens.shape[1])) - set(placeholders)):
      np.testing.assert_array_equal(got[row, t], text[row, t])
  block_ids = multimodal.image_block_ids(is_image, 3)
  np.testing.assert_array_equal(block_ids, [[0, 0, 1, 1, 1, 0, 0, 2, 2, 2, 0],
                                            [1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 0]])


def test_placeholders_past_a_rows_image_count_stay_text():
  """A served prompt's images fill its first count x num_patches placeholders; one after
  them (a generated `<|image|>` that a preempted request's prefill meets again) keeps its
  token embedding and its causal attention."""
  tokens = np.array([[1, IMAGE_ID, IMAGE_ID, 9, IMAGE_ID, 4], [IMAGE_ID, IMAGE_ID, 5, 6, 7, 8]])
  is_image = multimodal.image_positions(jnp.asarray(tokens), IMAGE_ID, 2,
                                        jnp.asarray([1, 1]))
  np.testing.assert_array_equal(is_image, [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
  rng = np.random.default_rng(1)
  text = rng.standard_normal((2, 6, 5)).astype(np.float32)
  patches = rng.standard_normal((2, 2, 2, 5)).astype(np.float32)  # a black image pads each row
  got = np.asarray(multimodal.insert_image_embeddings(jnp.asarray(text), is_image,
                                                      jnp.asarray(patches)))
  np.testing.assert_array_equal(got[0, 1:3], patches[0, 0])
  np.testing.assert_array_equal(got[0, 4], text[0, 4])  # the placeholder past the image
  np.testing.assert_array_equal(multimodal.image_block_ids(is_image, 2),
                                [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])


def np_prefix_lm_mask(segment_ids, block_ids):
  """bool [seq, seq] by pairs: causal within a segment, or both in one nonzero block."""
  seq = len(segment_ids)
  mask = np.zeros((seq, seq), bool)
  for i in range(seq):
    for j in range(seq):
      same_block = block_ids[i] != 0 and block_ids[i] == block_ids[j]
      mask[i, j] = segment_ids[i] == segment_ids[j] and (j <= i or same_block)
  return mask


@pytest.mark.parametrize("query_block", [8, 128])
def test_xla_attention_with_a_prefix_lm_mask_equals_numpy(query_block):
  """Images straddle the query blocks of 8; a second document holds an image of its own."""
  rng = np.random.default_rng(1)
  seq = 24
  segment_ids = np.array([[1] * 14 + [2] * 8 + [0] * 2, [1] * 24])
  block_ids = np.zeros((2, seq), np.int32)
  block_ids[0, 5:11], block_ids[0, 15:18] = 1, 2
  block_ids[1, 0:4], block_ids[1, 6:13] = 1, 2
  q = rng.standard_normal((2, seq, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((2, seq, 2, 8)).astype(np.float32) for _ in range(2))
  got = layers.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                jnp.asarray(segment_ids), query_block,
                                bidirectional_ids=jnp.asarray(block_ids))
  for row in range(2):
    mask = np_prefix_lm_mask(segment_ids[row], block_ids[row])
    want = np_masked_attention(*(x[row].astype(np.float64) for x in (q, k, v)), mask)
    np.testing.assert_allclose(np.asarray(got[row]), want, atol=2e-5, rtol=2e-5)


def vision_params(config=CONFIG, seed=0):
  return nnx.to_pure_dict(nnx.state(Transformer(config, rngs=nnx.Rngs(seed))))


def image_row(rng, seq_len=40):
  """tokens, loss_mask: [bos] text, one image's placeholders, text, a supervised reply; padded."""
  prompt = list(rng.integers(10, 64, 3))
  reply = list(rng.integers(10, 64, 5))
  tokens = [1, *prompt, *[IMAGE_ID] * N, 8, *reply]
  loss_mask = [0] * (len(tokens) - len(reply)) + [1] * len(reply)
  pad = seq_len - len(tokens)
  return {"tokens": np.array(tokens + [0] * pad, np.int32),
          "segment_ids": np.array([1] * len(tokens) + [0] * pad, np.int32),
          "positions": np.array(list(range(len(tokens))) + [0] * pad, np.int32),
          "loss_mask": np.array(loss_mask + [0] * pad, np.int32),
          "image": random_images(rng)}


def image_batch(seed, rows=8):
  rng = np.random.default_rng(seed)
  examples = [image_row(rng) for _ in range(rows)]
  return {name: np.stack([e[name] for e in examples]) for name in examples[0]}


def test_patches_see_their_whole_image_and_text_never_sees_later_text():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  batch = image_batch(0, rows=1)
  def logits(tokens, image):
    return np.asarray(multimodal.image_and_text_logits(
        model, jnp.asarray(tokens), jnp.asarray(image)[:, None]))
  base = logits(batch["tokens"], batch["image"])
  first_patch, last_patch = 4, 4 + N - 1
  later_text = batch["tokens"].copy()
  later_text[0, last_patch + 3] = 11 if later_text[0, last_patch + 3] != 11 else 12
  changed = logits(later_text, batch["image"])
  np.testing.assert_array_equal(changed[0, :last_patch + 3], base[0, :last_patch + 3])
  corner = batch["image"].copy()
  corner[0, -4:, -4:] = 255 - corner[0, -4:, -4:]  # the last patch's pixels
  seen = np.abs(logits(batch["tokens"], corner) - base).max(-1)[0]
  assert seen[first_patch] > 1e-4            # the first patch sees the image's last one
  np.testing.assert_array_equal(seen[:first_patch], 0.0)  # text before the image does not


def test_no_loss_target_is_an_image_position_or_predicted_from_one():
  tokens = np.array([[1, 9, IMAGE_ID, IMAGE_ID, 10, 11, 12, 0]])
  segment_ids = np.array([[1, 1, 1, 1, 1, 1, 1, 0]])
  loss_mask = np.ones_like(tokens)  # even a mask that asks for every position
  _, weights = text_targets(jnp.asarray(tokens), jnp.asarray(segment_ids),
                            jnp.asarray(loss_mask), IMAGE_ID)
  # 1->9 yes, 9->image no, image->image no, image->10 no, 10->11, 11->12 yes, 12->pad no.
  np.testing.assert_array_equal(weights, [[1, 0, 0, 0, 1, 1, 0, 0]])


def run_steps(mesh_shape, microbatches=1, num_steps=3):
  """Losses of `num_steps` VisionSFT train steps on a mesh of that shape."""
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, warmup_steps=0))
  graphdef, abstract_state = steps.abstract_model(CONFIG)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  state = steps.train_state_from_params(jax.device_put(vision_params(), shardings.params),
                                        optimizer, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = steps.make_train_step(graphdef, VisionSFT().loss, optimizer, shardings,
                                     batch_sharding, microbatches)
  losses = []
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      batch = {k: jax.device_put(v, batch_sharding) for k, v in image_batch(seed=i).items()}
      state, metrics = train_step(state, batch)
      losses.append(float(metrics["loss"]))
  return losses


def test_vision_steps_on_a_2x2x2_mesh_match_one_device():
  """Two microbatches on the mesh: the sharded step and the accumulation both match."""
  np.testing.assert_allclose(run_steps((2, 2, 2), microbatches=2), run_steps((1, 1, 1)),
                             rtol=1e-5)


def test_the_pallas_kernel_gives_the_xla_logits_with_images():
  batch = image_batch(0, rows=2)
  def logits(attention):
    config = ModelConfig(**{**CONFIG.__dict__, "attention": attention})
    model = nnx.merge(steps.abstract_model(config)[0], vision_params(config))
    return multimodal.image_and_text_logits(model, jnp.asarray(batch["tokens"]),
                                            jnp.asarray(batch["image"])[:, None],
                                            jnp.asarray(batch["positions"]),
                                            jnp.asarray(batch["segment_ids"]))
  np.testing.assert_allclose(logits("pallas"), logits("xla"), atol=2e-4, rtol=2e-4)


# --- whole runs: a text run, then the projector-only stage from it -----------------------------

TINY_BINDINGS = TINY_MODEL + """
train.checkpoint_every = 4
train.eval_every = 4
train.eval_batches = 1
train.log_every = 1
train.sample_prompt = None
learning_rate_schedule.warmup_steps = 1
"""
PROJECTOR_STAGE = """
ModelConfig.vision = @VisionConfig()
VisionConfig.image_size = 16
VisionConfig.patch_size = 4
VisionConfig.num_layers = 1
VisionConfig.embed_dim = 32
VisionConfig.num_heads = 2
VisionConfig.num_kv_heads = 2
VisionConfig.head_dim = 16
VisionConfig.mlp_dim = 64
train.task = @VisionSFT()
train.trainable = "projector/.*"
learning_rate_schedule.peak_learning_rate = 1e-2
"""


@contextlib.contextmanager
def gin_bindings(*texts: str):
  gin.clear_config()
  gin.parse_config("\n".join((TINY_BINDINGS, *texts)))
  try:
    yield
  finally:
    gin.clear_config()


def write_image_dir(root: Path, text_dir: Path, rows: int, seq_len: int = 64) -> str:
  """A v2 data dir of one-image rows (image field uint8 [16, 16, 3]) with the text dir's
  tokenizer, its `<|image|>` id in the placeholders."""
  root.mkdir()
  text_manifest = json.loads((text_dir / MANIFEST_NAME).read_text())
  image_id = text_manifest["tokenizer"]["special_tokens"][IMAGE_TOKEN]
  rng = np.random.default_rng(0)
  splits, fields = {}, None
  for split, count in (("train", rows), ("validation", 8)):
    examples = []
    for _ in range(count):
      row = image_row(rng, seq_len)
      row["tokens"] = np.where(row["tokens"] == IMAGE_ID, image_id, row["tokens"])
      examples.append(row)
    fields = tuple(field(name, value.dtype, value.shape) for name, value in examples[0].items())
    shard = f"{split}-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(root / shard), "group_size:1")
    for example in examples:
      writer.write(encode_record(example, fields))
    writer.close()
    splits[split] = {"sequences": count, "shards": [shard]}
  manifest = {"format": RECORD_FORMAT, "kind": "image_chat", "seq_len": seq_len,
              "fields": manifest_fields(fields), "tokenizer": text_manifest["tokenizer"],
              "vision": {"image_size": VISION.image_size, "patch_size": VISION.patch_size,
                         "num_patches": N, "image_token_id": image_id, "max_images": 1},
              "splits": splits}
  (root / MANIFEST_NAME).write_text(json.dumps(manifest))
  shutil.copy(text_dir / text_manifest["tokenizer"]["file"], root)
  return str(root)


def whole_params(run_dir, config) -> dict:
  """A run's whole parameter set (trained from its checkpoint, the rest as it started)."""
  abstract = nnx.to_pure_dict(steps.abstract_model(config)[1])
  return jax.device_get(runs.restore_params(run_dir, jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      abstract)))


@pytest.fixture(scope="module")
def text_run_and_images(tmp_path_factory) -> tuple[Path, str]:
  """(a one-step text run, an image data dir with its tokenizer)."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  text_dir, text_run = tmp_path_factory.mktemp("text"), tmp_path_factory.mktemp("text_run")
  prepare_text.run([str(stdlib / name) for name in ("textwrap.py", "string.py", "heapq.py")],
                   str(text_dir), vocab_size=400, seq_len=64, validation_fraction=0.2)
  with gin_bindings():
    train_module.train(workdir=str(text_run), data_dir=str(text_dir), steps=1)
  return text_run, write_image_dir(tmp_path_factory.mktemp("images") / "images", text_dir,
                                   rows=32)


def test_projector_stage_from_a_text_run_trains_the_projector_alone(text_run_and_images,
                                                                    tmp_path, capsys):
  text_run, image_dir = text_run_and_images
  vision_run = tmp_path / "vision_run"
  with gin_bindings(PROJECTOR_STAGE):
    train_module.train(workdir=str(vision_run), data_dir=image_dir, steps=4,
                       init_from=str(text_run))
  assert f"vision tower and projector initialized fresh: {text_run} is text-only" in (
      capsys.readouterr().out)
  vision_config = train_module.checkpoint.config_from_meta(
      train_module.checkpoint.read_meta(vision_run)[1])
  text_config = ModelConfig(**{**vision_config.__dict__, "vision": None})
  after, text = whole_params(vision_run, vision_config), whole_params(text_run, text_config)
  start = vision_params(vision_config)
  for path, value in jax.tree_util.tree_leaves_with_path(after):
    keys = [key.key for key in path]
    if keys[0] == "projector":
      assert not np.array_equal(value, functools.reduce(dict.__getitem__, keys, start)), keys
    elif keys[0] == "vision":  # frozen, so not saved: the seed's tower, made again
      # under jit, which JAX 0.11.2 rounds a last bit apart from the eager `start` (0.12: equal)
      np.testing.assert_allclose(value, functools.reduce(dict.__getitem__, keys, start),
                                 rtol=1e-6, atol=0)
    else:  # the text run's LM, untouched
      np.testing.assert_array_equal(value, functools.reduce(dict.__getitem__, keys, text))


@pytest.mark.parametrize("binding, message", [
    ("VisionConfig.image_size = 30",
     "VisionConfig.patch_size=4 must divide VisionConfig.image_size=30"),
    ('VisionConfig.projector = "mpl"', "VisionConfig.projector='mpl'; choose one of linear, mlp"),
])
def test_a_vision_config_that_contradicts_itself_is_one_line_before_the_workdir_is_made(
    binding, message, tmp_path):
  workdir = tmp_path / "run"
  with gin_bindings(PROJECTOR_STAGE, binding), pytest.raises(UserError) as refused:
    train_module.train(workdir=str(workdir), data_dir=str(tmp_path / "data"), steps=1)
  assert str(refused.value).splitlines()[0] == message  # the line `maxlm.train` prints
  assert not workdir.exists()


@pytest.mark.parametrize("binding, message", [
    ("VisionConfig.image_size = 32", "holds 16x16 images, but VisionConfig.image_size=32; bind "
     "VisionConfig.image_size=16 or rerun beam_pipelines.prepare_images with --image_size=32"),
    ("VisionConfig.patch_size = 8", "expands each image to 16 patches (--patch_size=4), but "
     "VisionConfig.patch_size=8 cuts 4; bind VisionConfig.patch_size=4 or rerun "
     "beam_pipelines.prepare_images with --patch_size=8"),
    ("ModelConfig.vision = None", "the VisionSFT task needs a vision tower"),
    ("train.task = @SigLIP()", "the SigLIP task needs a vision tower with contrastive heads"),
])
def test_a_tower_that_does_not_fit_the_image_data_is_refused_before_a_model_is_built(
    data_dir, binding, message, tmp_path, monkeypatch):
  image_dir = write_image_dir(tmp_path / "images", Path(data_dir), rows=8)
  def built(*args, **kwargs):
    raise AssertionError("a model was built")
  monkeypatch.setattr(train_module.train_steps, "abstract_model", built)
  workdir = tmp_path / "run"
  with gin_bindings(PROJECTOR_STAGE, binding), pytest.raises(UserError, match=re.escape(message)):
    train_module.train(workdir=str(workdir), data_dir=image_dir, steps=1)
  assert not workdir.exists()


def test_a_default_set_of_another_image_size_names_the_binding_that_builds_it_again(
    data_dir, tmp_path, monkeypatch):
  image_dir = write_image_dir(tmp_path / "images", Path(data_dir), rows=8)  # 16x16, patch 4

  def ensure_small_images():  # as configs/vision_*.gin's train.data_dir = @ensure_default_vision
    return image_dir
  monkeypatch.setattr(train_module.train_steps, "abstract_model", None)  # never reached
  with gin_bindings(PROJECTOR_STAGE, "VisionConfig.image_size = 32"), pytest.raises(
      UserError, match=re.escape("holds 16x16 images, but VisionConfig.image_size=32; bind "
                                 "VisionConfig.image_size=16 or bind "
                                 "ensure_small_images.image_size=32")):
    train_module.train(workdir=str(tmp_path / "run"), data_dir=ensure_small_images, steps=1)


# SigLIP (stage 0): the ViT trains contrastively, and the projector stage starts from it.
SIGLIP_STAGE = PROJECTOR_STAGE.replace("train.task = @VisionSFT()", "train.task = @SigLIP()")
SIGLIP_STAGE = SIGLIP_STAGE.replace('train.trainable = "projector/.*"',
                                    'train.trainable = "(vision|contrastive)/.*"')
SIGLIP_STAGE += "VisionConfig.contrastive_dim = 16\n"


@pytest.mark.slow  # 37 s of compiles (two stages); the heads' init_from rule is in test_contrastive
def test_the_projector_stage_takes_a_siglip_runs_tower(text_run_and_images, tmp_path, capsys):
  text_run, image_dir = text_run_and_images
  siglip_run, projector_run = tmp_path / "siglip", tmp_path / "projector"
  with gin_bindings(SIGLIP_STAGE):
    train_module.train(workdir=str(siglip_run), data_dir=image_dir, steps=1,
                       init_from=str(text_run))
  assert "image-to-caption retrieval accuracy" in capsys.readouterr().out
  with gin_bindings(PROJECTOR_STAGE):
    train_module.train(workdir=str(projector_run), data_dir=image_dir, steps=1,
                       init_from=str(siglip_run))
  read_config = lambda run: checkpoint.config_from_meta(checkpoint.read_meta(run)[1])
  siglip, projector = (whole_params(run, read_config(run)) for run in (siglip_run, projector_run))
  start = whole_params(text_run, read_config(text_run))
  for path, value in jax.tree_util.tree_leaves_with_path(projector["vision"]):
    keys = [key.key for key in path]
    np.testing.assert_array_equal(value, functools.reduce(dict.__getitem__, keys,
                                                          siglip["vision"]))
  np.testing.assert_array_equal(siglip["embedding"], start["embedding"])  # the LM stayed frozen
  assert "contrastive" not in projector


# --- resume and reshard hold for vision runs as for text ----------------------------------------

# Joint SFT: the ViT, the projector and the LM all train, so every vision parameter and its
# optimizer state must come back from the checkpoint exactly.
VISION_SFT_STAGE = PROJECTOR_STAGE.replace('train.trainable = "projector/.*"',
                                           "train.trainable = None")
SFT_STEPS = 8


def vision_train_process(workdir, data_dir, init_from) -> subprocess.Popen:
  """`python -m maxlm.train` with the in-process run's bindings, a checkpoint every step."""
  bindings = [line for line in (TINY_BINDINGS + VISION_SFT_STAGE).strip().splitlines() if line]
  return train_subprocess(workdir, data_dir, bindings, f"--init_from={init_from}",
                          f"--steps={SFT_STEPS}", "--checkpoint_every=1")


def computed_rows(run_dir) -> list[dict]:
  """What a run computed per step (losses, norms, eval scalars), without its timings."""
  rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  kept = ("step", "loss", "grad_norm", "learning_rate")
  return [{k: v for k, v in row.items() if k in kept or k.startswith("eval_")} for row in rows]


@pytest.mark.slow  # two 8-step vision runs and a subprocess's compiles: ~40 s on 2 cores
def test_a_vision_run_killed_midway_and_rerun_gives_the_uninterrupted_metrics_bitwise(
    text_run_and_images, tmp_path):
  text_run, image_dir = text_run_and_images
  uninterrupted, run = tmp_path / "uninterrupted", tmp_path / "run"
  with gin_bindings(VISION_SFT_STAGE):
    train_module.train(workdir=str(uninterrupted), data_dir=image_dir, steps=SFT_STEPS,
                       init_from=str(text_run))
  kill_after_step(vision_train_process(run, image_dir, text_run), 5)
  with gin_bindings(VISION_SFT_STAGE):
    train_module.train(workdir=str(run), data_dir=image_dir, steps=SFT_STEPS,
                       init_from=str(text_run))
  want = computed_rows(uninterrupted)
  assert [row["step"] for row in want] == list(range(1, SFT_STEPS + 1))
  assert "eval_loss" in want[3]
  assert computed_rows(run) == want


@pytest.mark.slow  # 13-26 s on 2 shared cores: two 8-device state inits and a restore
def test_a_vision_checkpoint_restores_onto_other_meshes_with_identical_parameters(tmp_path):
  def shardings_on(mesh_shape):
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
    optimizer = optim.make_optimizer(optim.learning_rate_schedule(10))
    _, abstract_state = steps.abstract_model(CONFIG)
    return optimizer, abstract_state, steps.state_shardings(abstract_state, optimizer, mesh)

  optimizer, _, saved_shardings = shardings_on((1, 8, 1))
  state = steps.init_train_state(CONFIG, optimizer, saved_shardings, seed=3)
  state = steps.TrainState(step=state.step + 5, params=state.params,
                           opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
  dataset = grain.MapDataset.range(10).to_iter_dataset()
  saver = checkpoint.Checkpointer(tmp_path, save_every=1)
  saver.save(5, state, grain.checkpoint.CheckpointSave(iter(dataset)),
             checkpoint.model_meta(CONFIG))
  saver.wait()
  saver.close()
  assert any(path[0].key == "vision" for path, _ in
             jax.tree_util.tree_leaves_with_path(state.params))
  for mesh_shape in [(2, 2, 2)]:  # fsdp 8 -> data, fsdp and tensor 2 each
    optimizer, abstract_state, target_shardings = shardings_on(mesh_shape)
    target = steps.abstract_train_state(abstract_state, optimizer, target_shardings)
    loader = checkpoint.Checkpointer(tmp_path, save_every=1)
    restored, meta = loader.restore(5, target, grain.checkpoint.CheckpointRestore(iter(dataset)))
    loader.close()
    assert checkpoint.config_from_meta(meta) == CONFIG
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(target.params)):
      assert got.sharding == want.sharding
