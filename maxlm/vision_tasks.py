"""The vision task: next-token loss on the text of image-text records, images as a prefix.

Records hold packed chat (`tokens`, `segment_ids`, `positions`, `loss_mask`, as SFT's) whose
`<|image|>` placeholders are already expanded to `VisionConfig.num_patches` positions each,
and `image`: uint8 [height, width, 3] (one image a row) or [images, height, width, 3]. The
model puts the images' patch embeddings at the placeholders (`maxlm.model.multimodal`); the
loss falls on the supervised text only, never on or from an image position.

Stages differ by gin only (`configs/vision_tiny_projector.gin`: LM and ViT frozen, the
projector trains; `configs/vision_tiny_sft.gin`: LM and projector train).
"""

import dataclasses

import gin
import jax
import jax.numpy as jnp

from beam_pipelines.records import fields_of_manifest
from maxlm import post_training, tasks
from maxlm.errors import UserError
from maxlm.model import contrastive, multimodal, training_flops_per_token

VISION_FIELDS = ("tokens", "segment_ids", "positions", "loss_mask", "image")


def images_of(batch: dict[str, jax.Array]) -> jax.Array:
  """The batch's images as [batch, images, height, width, 3]."""
  images = batch["image"]
  return images[:, None] if images.ndim == 4 else images


def text_targets(tokens: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array,
                 image_token_id: int) -> tuple[jax.Array, jax.Array]:
  """SFT's (targets, weights) [batch, seq], less every pair touching an image position: no
  patch is a target and no patch's logits predict anything."""
  targets, weights = post_training.supervised_targets(tokens, segment_ids, loss_mask)
  is_image = tokens == image_token_id
  next_is_image = jnp.pad(is_image[:, 1:], ((0, 0), (0, 1)))
  return targets, weights & ~is_image & ~next_is_image


def vision_loss(model, batch: dict[str, jax.Array],
                z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Mean cross-entropy over the supervised text tokens of image-text rows."""
  tokens = batch["tokens"]
  logits = multimodal.image_and_text_logits(model, tokens, images_of(batch), batch["positions"],
                                            batch["segment_ids"])
  targets, weights = text_targets(tokens, batch["segment_ids"], batch["loss_mask"],
                                  model.config.vision.image_token_id)
  nll, count, z_loss_sum = tasks.cross_entropy_with_mask(logits, targets, weights, z_loss)
  loss = (nll + z_loss_sum) / jnp.maximum(count, 1.0)
  return loss, {"nll_sum": nll, "z_loss_sum": z_loss_sum, "target_tokens": count}


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class VisionSFT(post_training.SFT):
  """Image-text fine-tuning (captions, image chat): SFT's loss with images at placeholders."""
  batch_fields: tuple[str, ...] = VISION_FIELDS

  def check_model(self, config) -> None:
    if getattr(config, "vision", None) is None:
      raise UserError(f"the {type(self).__name__} task needs a vision tower; bind "
                      "ModelConfig.vision = @VisionConfig()")

  def loss(self, model, batch):
    self.check_model(model.config)
    return vision_loss(model, batch, self.z_loss)


def check_image_data(task, config, manifest: dict, data_dir,
                     built_by: str | None = None) -> None:
  """Before anything is built: a vision task needs the tower its loss reads, and the tower
  must cut the data's images into as many patches as each `<|image|>` was expanded to (a
  wrong size fails in the first step's trace; other patches per image train silently on
  misplaced patches). `built_by`: the function that built the data dir (the embedded set's
  `ensure_default_vision`), whose binding a refusal names too."""
  if isinstance(task, VisionSFT):
    task.check_model(config)
  image = {field.name: field for field in fields_of_manifest(manifest)}.get("image")
  vision = config.vision
  if image is None or vision is None:
    return
  def rebuild(name: str, value: int) -> str:
    return (f"bind {built_by}.{name}={value}" if built_by else
            f"rerun beam_pipelines.prepare_images with --{name}={value}")

  height, width = image.shape[-3:-1]
  if (height, width) != (vision.image_size, vision.image_size):
    raise UserError(f"--data_dir {data_dir} holds {height}x{width} images, but "
                    f"VisionConfig.image_size={vision.image_size}; bind VisionConfig.image_size="
                    f"{height} or {rebuild('image_size', vision.image_size)}")
  prepared = manifest.get("vision", {})
  if prepared.get("num_patches", vision.num_patches) != vision.num_patches:
    raise UserError(f"--data_dir {data_dir} expands each image to {prepared['num_patches']} "
                    f"patches (--patch_size={prepared.get('patch_size')}), but "
                    f"VisionConfig.patch_size={vision.patch_size} cuts {vision.num_patches}; "
                    f"bind VisionConfig.patch_size={prepared.get('patch_size')} or "
                    f"{rebuild('patch_size', vision.patch_size)}")


def siglip_loss(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """SigLIP's sigmoid loss per real row (one image and its caption, the supervised text)
  over the batch's image-caption pairs (`maxlm.model.contrastive`)."""
  tokens = batch["tokens"]
  captions = (batch["loss_mask"] > 0) & (batch["segment_ids"] > 0)
  features = model.vision(images_of(batch), jnp.dtype(model.config.dtype))
  image_features = features[:, 0].mean(axis=1)                  # each row's first image
  hidden, _ = model.decode(model.embed(tokens), batch["positions"], batch["segment_ids"])
  text_features = contrastive.masked_mean(model.final_norm(hidden), captions)
  logits = model.contrastive(image_features, text_features)
  positives = contrastive.same_text(tokens, captions, model.config.vocab_size)
  real = jnp.any(captions, axis=1)
  loss_sum = contrastive.sigmoid_loss_sum(logits, positives, real)
  rows = jnp.sum(real.astype(jnp.float32))
  hits = contrastive.retrieval_hits(logits, positives, real).astype(jnp.float32)
  return loss_sum / jnp.maximum(rows, 1.0), {"siglip_loss_sum": loss_sum, "rows": rows,
                                             "retrieval_hits": hits}


@gin.configurable(module="maxlm")
@dataclasses.dataclass(frozen=True)
class SigLIP(VisionSFT):
  """Contrastive pretraining of the ViT on image-caption rows (SigLIP's sigmoid loss), the LM
  reading the captions; train the tower and the heads alone with
  `train.trainable = "(vision|contrastive)/.*"`. A batch's rows are each other's negatives
  (a microbatch's, with `train.microbatches`)."""

  def check_model(self, config) -> None:
    if getattr(config, "vision", None) is None or not config.vision.contrastive_dim:
      raise UserError("the SigLIP task needs a vision tower with contrastive heads; bind "
                      "ModelConfig.vision = @VisionConfig() and VisionConfig.contrastive_dim")

  def loss(self, model, batch):
    self.check_model(model.config)
    return siglip_loss(model, batch)

  def step_cost(self, config, seq_len):
    """The LM reads each caption row forward only (a third of a training token's FLOPs), as
    with the LM frozen; the ViT's FLOPs are left out, as in every vision run's MFU."""
    return seq_len, seq_len * training_flops_per_token(config, seq_len) / 3

  def train_scalars(self, metrics):
    return {**super().train_scalars(metrics), "retrieval_accuracy": float(
        metrics["retrieval_hits"]) / max(float(metrics["rows"]), 1.0)}

  def eval_scalars(self, sums):
    rows = max(float(sums["rows"]), 1.0)
    return {"eval_loss": float(sums["siglip_loss_sum"]) / rows,
            "eval_retrieval_accuracy": float(sums["retrieval_hits"]) / rows}

  def summary(self, eval_scalars, manifest, step):
    del manifest
    print(f"\nheld-out after {step} steps: image-to-caption retrieval accuracy "
          f"{eval_scalars['eval_retrieval_accuracy']:.3f} within each batch | SigLIP loss "
          f"{eval_scalars['eval_loss']:.3f}", flush=True)
    return {**eval_scalars, "step": step}
