"""The serving engine: a trained checkpoint on one device, in JetStream's shape.

`prefill` runs one prompt (padded to a length bucket), `insert` copies its cache into blocks
of the paged KV cache for one of `slots` decode slots, and `generate` advances every occupied
slot by one token, in a batch of the next compiled size; `release` hands a slot's blocks back.
The pool is sized by `kv_cache_memory` (GiB) or else holds `slots` full contexts;
`serving.kv_pages` keeps its books, `maxlm.sampling` and `maxlm.paged_sampling` hold the
jitted functions. `serving.orchestrator` drives these for
many requests at once. `greedy_decode_without_cache` recomputes the whole sequence every step
and exists as the independent reference for all of it.
"""

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm import checkpoint, paged_sampling, quantization, runs, sampling, sharding, steps
from maxlm import tokenizer as tokenizer_lib
from maxlm.errors import UserError
from maxlm.evals import text_ids
from maxlm.model import ModelConfig, merge_adapters, paged_kv
from serving import kv_pages, paged_prefill, prefix_cache, vision_prefill


class ContextLengthError(ValueError):
  """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  temperature: float = 1.0  # 0 is greedy
  top_p: float = 1.0
  top_k: int = 0            # 0 keeps every token
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Step:
  """What `generate` (or a prefill) chose for each slot, fetched to the host."""
  tokens: np.ndarray        # int32 [slots]
  logprobs: np.ndarray      # float32 [slots]
  top_tokens: np.ndarray    # int32 [slots, sampling.TOP_LOGPROBS]
  top_logprobs: np.ndarray  # float32 [slots, sampling.TOP_LOGPROBS]

  @classmethod
  def from_choice(cls, choice: sampling.TokenChoice) -> "Step":
    return cls(*jax.device_get((choice.token, choice.logprob, choice.top_tokens,
                                choice.top_logprobs)))


@dataclasses.dataclass(frozen=True)
class Prefilled:
  """A prefill's result on the device and its prompt's length, which the host needs to
  allocate blocks without waiting for the device."""
  prefix: sampling.Prefix
  length: int


def device_settings(settings: SamplingSettings) -> tuple:
  """(seed words, temperature, top_p, top_k) as the jitted prefill takes them. A top_k past
  int32 raises here; the server's request shapes refuse it (and every other range) first."""
  return (sampling.seed_words(settings.seed), np.float32(settings.temperature),
          np.float32(settings.top_p), np.int32(settings.top_k))


# generation_config.json's sampling fields a request's omitted ones default to, as vLLM's
# `--generation-config auto` takes them, with the ranges `serving.openai_api`'s request shapes
# allow (kept apart: the engine does not import the web stack); top_k reaches the device as
# int32 (`device_settings`).
SAMPLING_DEFAULTS = {
    "temperature": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: isinstance(v, int) and -1 <= v < 2**31,
              "an integer in [-1, 2147483647]"),
}


def sampling_defaults(path: Path) -> dict[str, float | int]:
  """The sampling settings a generation_config.json names ({} without one): what a request
  that leaves them out samples with. A value outside its range raises UserError naming the
  file and the field."""
  config = tokenizer_lib.read_generation_config(path)
  defaults = {}
  for name, (valid, what) in SAMPLING_DEFAULTS.items():
    if name in config and config[name] is not None:
      value = config[name]
      if isinstance(value, bool) or not valid(value):
        raise UserError(f"{path}: {name}={json.dumps(value)} must be {what}; fix it, or serve "
                        "with --generation_config=vllm to leave the file's defaults out")
      defaults[name] = value
  return defaults


def load_tokenizer(path: Path, expected_sha256: str | None) -> tokenizer_lib.Tokenizer:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; copy the training data dir's tokenizer.model "
                            "(or an imported model's tokenizer.json) into the run dir")
  sha256 = tokenizer_lib.sha256(path)
  if expected_sha256 is not None and sha256 != expected_sha256:
    raise ValueError(f"{path} has sha256 {sha256[:12]}… but the checkpoint was trained with "
                     f"{expected_sha256[:12]}…; copy the training data dir's {path.name} "
                     "into the run dir")
  return tokenizer_lib.load(path)


def kv_cache_dtype_of(config: ModelConfig, requested: str | None) -> str:
  """The paged pool's dtype: "int8" (a float32 scale per token and head) or, for None or
  "auto", the model's compute dtype."""
  if requested in (None, "auto"):
    return config.dtype
  if requested != "int8":
    raise ValueError(f"--kv_cache_dtype={requested}; use auto or int8")
  return requested


SERVING_DTYPES = ("float32", "bfloat16")


def with_serving_dtype(params, config: ModelConfig, dtype: str | None):
  """(params, config) computing in `dtype`, every float weight stored in it too (bfloat16:
  half of float32's bytes, and a bfloat16 KV cache unless --kv_cache_dtype says otherwise);
  None or "auto" keeps the checkpoint's."""
  if dtype in (None, "auto"):
    return params, config
  if dtype not in SERVING_DTYPES:
    raise ValueError(f"--dtype={dtype}; use auto, " + " or ".join(SERVING_DTYPES))
  def cast(leaf):
    return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
  return jax.tree.map(cast, params), dataclasses.replace(config, dtype=dtype)


def with_canonical_unembedding(params: dict, config: ModelConfig, quantize: str | None):
  """(params, config) with a tied embedding [vocab, embed] also stored transposed, as an
  untied model's unembedding [embed, vocab], where the engine multiplies in bfloat16 on the
  CPU. XLA:CPU multiplies bfloat16 in YNNPACK only when the lhs contracts its last axis and
  the rhs its first (see `layers.WEIGHT_GRADIENT_GROUPS`): a tied `x @ embedding.T` contracts
  the embedding's last axis, so XLA converted all of it to float32 for every step (a 2-layer
  model of width 1,024, vocab 32,000, 8 rows: 52 ms a decode step against 10 ms with the
  copy, float32 15 ms). Costs vocab x embed more weight bytes; anywhere else the params come
  back as they are."""
  if not (config.tie_embeddings and config.dtype == "bfloat16" and not quantize
          and jax.default_backend() == "cpu"):
    return params, config
  return ({**params, "unembedding": jnp.transpose(params["embedding"])},
          dataclasses.replace(config, tie_embeddings=False))


def one_device_params(checkpoint_dir: str | os.PathLike, config: ModelConfig, step: int):
  """(graphdef, params) of a checkpoint written on any mesh, restored onto one device; a run
  that trained only some parameters (LoRA's adapters) gets the others from its init_from."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, abstract_state = steps.abstract_model(config)
  abstract_params = jax.tree.map(
      lambda shape, sharding_: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding_),
      nnx.to_pure_dict(abstract_state), sharding.param_shardings(abstract_state, mesh))
  return graphdef, runs.restore_params(checkpoint_dir, abstract_params, step)


def verified_params(checkpoint_dir: str | os.PathLike, step: int | None):
  """(step, meta, graphdef, params) of a checkpoint whose parameters pass their checksums."""
  step, meta = checkpoint.read_meta(checkpoint_dir, step)
  return (step, meta, *one_device_params(checkpoint_dir, checkpoint.config_from_meta(meta), step))


def free_device_bytes() -> int | None:
  """Memory the first device has free (a CPU: the host's available memory), or None where
  the backend does not say."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


class Engine:
  """One model, its tokenizer, a paged KV cache and up to `slots` sequences decoding at once.

  Not thread-safe: one thread (the orchestrator's) drives prefill/insert/generate.
  """

  def __init__(self, graphdef, params, config: ModelConfig,
               tokenizer: tokenizer_lib.Tokenizer, *, model_name: str,
               max_len: int | None = None, slots: int | None = None,
               quantize: str | None = None, kv_cache_memory: float | None = None,
               block_size: int = 16, prefix_caching: bool = True,
               max_prefill_chunk: int | None = None, kv_cache_dtype: str | None = None,
               step: int | None = None):
    tokenizer = tokenizer_lib.as_tokenizer(tokenizer)
    if tokenizer.vocab_size() > config.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.vocab_size()} pieces but the model only "
                       f"{config.vocab_size}; serve the checkpoint with its own tokenizer")
    if slots is not None and slots < 1:
      raise ValueError(f"slots={slots}; serve with at least one decode slot")
    self.graphdef, self.config = graphdef, config
    self.params = quantization.quantize_params(params, quantize)
    self.quantize = quantize or "none"
    self.kv_cache_dtype = kv_cache_dtype_of(config, kv_cache_dtype)
    self.tokenizer = tokenizer
    self.model_name = model_name
    self.step = step  # the checkpoint step of `params`, when they come from one
    self._size_cache(sampling.context_length(config, max_len), slots, kv_cache_memory,
                     block_size)
    self.eos_id = tokenizer.eos_id()
    # what a request's omitted sampling settings default to: a run dir's generation_config.json
    self.sampling_defaults: dict[str, float | int] = {}
    # eos and an imported model's generation_config.json ids: every token that ends a request
    self.stop_ids = frozenset(tokenizer.stop_ids())
    self._prefill, _ = sampling.bind(graphdef)
    self._scored_prefill = jax.jit(functools.partial(sampling.scored_prefill_fn, graphdef))
    self._insert, self._step = paged_sampling.bind(graphdef)
    self._chunk_prefill = paged_sampling.bind_prefill(graphdef)
    self.prefix_caching, self.max_prefill_chunk = prefix_caching, max_prefill_chunk
    self.vision = (vision_prefill.ImagePrefill(graphdef, config, self.context_length)
                   if config.vision else None)
    self.image_size = self.vision.image_size if self.vision else None  # the server's hook
    self._image_prefill = vision_prefill.bind(graphdef) if config.vision else None
    self.image_prefills: vision_prefill.ImagePrefills | None = None
    self.pages: kv_pages.PageTables | None = None
    self.prefills: paged_prefill.Prefills | None = None
    # The Orchestrator whose KV pool `pages` indexes (one at a time: `Orchestrator.start`).
    self.driven_by = None
    self._token_bytes = [tokenizer.piece_bytes(i) for i in range(tokenizer.vocab_size())]

  @classmethod
  def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, *, step: int | None = None,
                      model_name: str | None = None, max_len: int | None = None,
                      slots: int | None = None, quantize: str | None = None,
                      kv_cache_memory: float | None = None, prefix_caching: bool = True,
                      max_prefill_chunk: int | None = None,
                      kv_cache_dtype: str | None = None, dtype: str | None = None,
                      generation_defaults: bool = True) -> "Engine":
    """The latest (or given) checkpoint of a run dir (or of its checkpoints/ dir). A corrupt
    one is refused, naming the newest intact step to serve instead: serving an older model
    than the one asked for is the user's decision. `generation_defaults`: take the sampling
    defaults of the run dir's generation_config.json (`sampling_defaults`)."""
    checkpoints, tokenizer_file = checkpoint.run_paths(checkpoint_dir)
    try:
      step, meta, graphdef, params = verified_params(checkpoint_dir, step)
    except checkpoint.CorruptCheckpointError as error:
      older = [s for s in checkpoint.all_steps(checkpoint_dir) if s < error.step]
      intact, _, _ = checkpoint.newest_intact(
          older, functools.partial(verified_params, checkpoint_dir))
      advice = (f"the newest intact one is step {intact}: serve it with --step={intact}"
                if intact is not None else "no older checkpoint is intact")
      raise checkpoint.CorruptCheckpointError(checkpoints, error.step,
                                              f"{error.reason}; {advice}") from None
    tokenizer = load_tokenizer(tokenizer_file, meta.get("tokenizer_sha256"))
    params, config = merge_adapters(params, checkpoint.config_from_meta(meta))
    # Capacity dispatch would let a request's tokens drop each other's: serve without drops.
    config = dataclasses.replace(config, moe_dispatch="dropless")
    params, config = with_canonical_unembedding(*with_serving_dtype(params, config, dtype),
                                                quantize)
    graphdef, _ = steps.abstract_model(config)  # LoRA merged: no adapter cost per token
    engine = cls(graphdef, params, config, tokenizer,
                 model_name=model_name or checkpoints.parent.name, max_len=max_len,
                 slots=slots, quantize=quantize, kv_cache_memory=kv_cache_memory,
                 prefix_caching=prefix_caching, max_prefill_chunk=max_prefill_chunk,
                 kv_cache_dtype=kv_cache_dtype, step=step)
    if generation_defaults:
      engine.sampling_defaults = sampling_defaults(
          tokenizer_file.with_name(tokenizer_lib.HF_GENERATION_CONFIG))
    return engine

  def _size_cache(self, context_length: int, slots: int | None, kv_cache_memory: float | None,
                  block_size: int):
    """The pool, the slots and the context: a memory budget decides the slots unless given,
    and a sequence never outgrows the pool (so one alone always fits)."""
    c = self.config
    block_bytes = paged_kv.block_bytes(c.num_layers, block_size, c.num_kv_heads, c.head_dim,
                                       self.kv_cache_dtype)
    if slots is None:
      slots = 8 if kv_cache_memory is None else kv_pages.MAX_SLOTS
    self.capacity = kv_pages.capacity(block_bytes, block_size, kv_cache_memory, slots,
                                      context_length)
    kv_pages.check_fits(self.capacity, free_device_bytes())
    self.slots = min(slots, self.capacity.blocks)
    self.context_length = min(context_length, self.capacity.tokens)
    self.block_size = block_size
    self.max_blocks = -(-self.context_length // block_size)

  def describe_weights(self) -> str:
    kind = self.config.dtype if self.quantize == "none" else self.quantize
    return f"weights {kind}: {quantization.nbytes(self.params) / 2**20:.2f} MiB"

  def describe_cache(self) -> str:
    return (f"{self.kv_cache_dtype} {self.capacity.describe(self.context_length, self.slots)}; "
            f"{paged_prefill.describe(self.prefix_caching, self.max_prefill_chunk)}")

  # --- JetStream's three calls -----------------------------------------------------------------

  def init_decode_state(self) -> paged_sampling.PagedState:
    """An empty pool, every block free (the books start over with it)."""
    allocator = (prefix_cache.CachingAllocator if self.prefix_caching
                 else kv_pages.BlockAllocator)(self.capacity.blocks)
    self.pages = kv_pages.PageTables(allocator, self.slots, self.block_size, self.max_blocks)
    self.prefills = paged_prefill.Prefills(self.pages, self._chunk_prefill, self.prefix_caching,
                                           self.max_prefill_chunk, self.context_length)
    if self.vision:
      self.image_prefills = vision_prefill.ImagePrefills(
          self.pages, self._image_prefill, self.slots, self.context_length,
          self.max_prefill_chunk or paged_prefill.DEFAULT_PREFILL_CHUNK)
    state = paged_sampling.init_state(self.config, self.slots, self.capacity.blocks + 1,
                                      self.block_size, self.kv_cache_dtype)
    # Placed as every jitted step's outputs are (whole, beside the weights): a fresh state's
    # uncommitted arrays would make the server's first prefill of a bucket compile again.
    placement = jax.tree.leaves(self.params)[0].sharding
    if isinstance(placement, jax.sharding.NamedSharding):
      placement = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(state, placement)

  # Each call returns as soon as its work is queued on the device; a TokenChoice stays there
  # until `Step.from_choice` fetches it, so the caller can queue the next step first.

  def prefill(self, prompt_ids: list[int], settings: SamplingSettings
              ) -> tuple[Prefilled, sampling.TokenChoice]:
    """The prompt's cache rows and its first new token (one row)."""
    prefix = self._prefill(
        self.params, sampling.padded_prompt(prompt_ids, self.context_length),
        len(prompt_ids), *device_settings(settings))
    return Prefilled(prefix, len(prompt_ids)), prefix.choice

  def prefill_scored(self, prompt_ids: list[int], settings: SamplingSettings
                     ) -> tuple["Prefilled", sampling.TokenChoice, sampling.PromptScores]:
    """`prefill`, plus the log-probability of each prompt token (`echo` with `logprobs`),
    from the same forward pass; rows past the prompt's length are padding."""
    prefix, scores = self._scored_prefill(
        self.params, sampling.padded_prompt(prompt_ids, self.context_length),
        len(prompt_ids), *device_settings(settings))
    return Prefilled(prefix, len(prompt_ids)), prefix.choice, scores

  def prefill_images(self, prompt_ids: list[int], images: list[np.ndarray],
                     settings: SamplingSettings) -> tuple[Prefilled, sampling.TokenChoice]:
    """`prefill` of a prompt whose placeholders (num_patches each) hold `images` (uint8
    [image_size, image_size, 3] each), run through the vision tower here."""
    prefix = self.vision(self.params, prompt_ids, images, device_settings(settings))
    return Prefilled(prefix, len(prompt_ids)), prefix.choice

  def fits(self, tokens: int) -> bool:
    """Whether the free blocks hold a new sequence of `tokens` tokens now."""
    return self.pages.fits(tokens)

  def insert(self, prefilled: Prefilled, state: paged_sampling.PagedState,
             slot: int) -> paged_sampling.PagedState:
    """Gives `slot` the blocks of the prompt (raises PoolExhausted if they are not free)."""
    blocks = self.pages.assign(slot, prefilled.length)
    bucket = prefilled.prefix.cache[0]["v"].shape[2]
    block_row = np.full(-(-bucket // self.block_size), paged_kv.TRASH_BLOCK, np.int32)
    block_row[:len(blocks)] = blocks[:len(block_row)]
    return self._insert(prefilled.prefix, state, np.int32(slot), block_row)

  def release(self, slot: int):
    """Hands the slot's blocks back; its sequence is over (or preempted)."""
    self.prefills.discard(slot)
    if self.image_prefills:
      self.image_prefills.discard(slot)
    self.pages.release(slot)

  # A prompt can instead be prefilled straight into its blocks, after what the prefix cache
  # holds of it and in chunks between decode steps (see serving.paged_prefill).

  def begin_prefill(self, slot: int, prompt_ids: list[int], settings: SamplingSettings) -> int:
    """Gives `slot` the blocks of the prompt (raises PoolExhausted if they are not free); the
    number of its tokens served from the prefix cache."""
    return self.prefills.begin(slot, prompt_ids, device_settings(settings))

  def awaits_prefix(self, prompt_ids: list[int]) -> bool:
    """Whether a prompt now being prefilled will soon publish more of this one's prefix."""
    return self.prefills.awaits_prefix(prompt_ids)

  def prefill_plan(self) -> list[tuple[int, int]]:
    """(slot, tokens) to prefill before the next decode step."""
    return self.prefills.plan()

  def prefill_chunk(self, state: paged_sampling.PagedState, slot: int, tokens: int
                    ) -> tuple[paged_sampling.PagedState, sampling.TokenChoice | None]:
    """Queues the next `tokens` of the slot's prompt; the first new token once it is done."""
    return self.prefills.run(self.params, state, slot, tokens)

  # An image prompt is prefilled whole, straight into its blocks, beside the other image
  # prompts admitted in the same turn (see serving.vision_prefill.ImagePrefills).

  def begin_image_prefill(self, slot: int, prompt_ids: list[int], images: list[np.ndarray],
                          settings: SamplingSettings):
    """Gives `slot` the blocks of a prompt whose placeholders hold `images` (raises
    PoolExhausted if they are not free); `prefill_image_prompts` runs it."""
    self.image_prefills.begin(slot, prompt_ids, images, device_settings(settings))

  def image_prefill_plan(self) -> list[list[int]]:
    """The slots of the begun image prompts, grouped into one call each."""
    return self.image_prefills.plan() if self.image_prefills else []

  def prefill_image_prompts(self, state: paged_sampling.PagedState, slots: list[int]
                            ) -> tuple[paged_sampling.PagedState, sampling.TokenChoice]:
    """Queues one group of `image_prefill_plan`: its choice has a row per slot, in order."""
    return self.image_prefills.run(self.params, state, slots)

  def generate(self, state: paged_sampling.PagedState
               ) -> tuple[paged_sampling.PagedState, sampling.TokenChoice]:
    """One token for every occupied slot; the choice's rows are slots. Raises PoolExhausted,
    touching nothing on the device, when some slot's next token has no free block."""
    slots = [slot for slot in self.pages.active() if slot not in self.prefills.pending]
    self.pages.grow(slots)
    rows = kv_pages.bucket(len(slots), self.slots)
    row_slots = np.full(rows, self.slots, np.int32)
    row_slots[:len(slots)] = slots
    state, choice = self._step(self.params, state, row_slots,
                               self.pages.table(slots, rows, self.max_blocks))
    self.pages.advance(slots)
    return state, choice

  def warmup(self):
    """Compiles every chunk prefill shape (and image prefill, for a vision model) and the
    decode step for every batch size, so no request the server takes waits on XLA. A decode
    step's table is always `max_blocks` wide: its attention reads only up to the furthest
    position's blocks (`paged_kv.attend`), so a wider table costs nothing and one compile per
    batch size serves every context. The whole-prompt `prefill`, `prefill_scored` and `insert`
    (JetStream's engine calls; the server's orchestrator takes them only for an `echo` request
    that also generates more than one token, lm-eval's scoring goes to `serving.scoring`)
    compile on first use."""
    state = self.init_decode_state()
    for bucket, width in self.prefills.buckets():
      state, _ = self._chunk_prefill(self.params, state, np.zeros((1, bucket), np.int32),
                                     np.int32(0), np.int32(1), np.zeros((1, width), np.int32),
                                     np.int32(self.slots), *device_settings(SamplingSettings()))
    if self.vision:
      vision = self.config.vision
      state = self.image_prefills.warmup(self.params, state, vision.image_token_id,
                                         vision.num_patches, vision.image_size,
                                         device_settings(SamplingSettings()))
    for rows in kv_pages.buckets(self.slots):
      state, _ = self._step(self.params, state, np.full(rows, self.slots, np.int32),
                            np.zeros((rows, self.max_blocks), np.int32))
    jax.block_until_ready(state)

  # --- text ------------------------------------------------------------------------------------

  def encode(self, prompt: str) -> list[int]:
    return [self.tokenizer.bos_id()] + self.tokenizer.encode(prompt)

  def decode(self, token_ids: list[int]) -> str:
    """Their text; eos (every stop id) and the ids past the tokenizer's (the model's padded
    vocabulary rows, which an undertrained model may still pick) have none."""
    stops, vocab = self.stop_ids, len(self._token_bytes)
    return self.tokenizer.decode([t for t in token_ids if t not in stops and t < vocab])

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes one token stands for (a byte-fallback piece is one raw byte)."""
    return self._token_bytes[token_id] if token_id < len(self._token_bytes) else b""

  def check_fits(self, prompt_tokens: int, max_tokens: int, *, scored: bool = False):
    """ContextLengthError unless the prompt and its new tokens fit the context. A `scored`
    prompt (its logprobs and at most one new token, which no position holds: the Scorer's)
    may fill the whole context, as lm-eval's full-length windows do."""
    if scored and prompt_tokens <= self.context_length:
      return
    if prompt_tokens >= self.context_length:
      raise ContextLengthError(
          f"the prompt is {prompt_tokens} tokens but the model's context is "
          f"{self.context_length}; shorten the prompt")
    if prompt_tokens + max_tokens > self.context_length:
      raise ContextLengthError(
          f"the prompt's {prompt_tokens} tokens plus max_tokens={max_tokens} exceed the "
          f"model's {self.context_length}-token context; lower max_tokens to at most "
          f"{self.context_length - prompt_tokens} or shorten the prompt")

  def prompt_ids(self, prompt: str, max_tokens: int | None, *, scored: bool = False
                 ) -> tuple[list[int], int]:
    """(token ids, max_tokens) of a request, `max_tokens=None` meaning the rest of the context
    (`scored`: see `check_fits`)."""
    prompt_ids = self.encode(prompt)
    if max_tokens is None:
      max_tokens = max(1, self.context_length - len(prompt_ids))
    self.check_fits(len(prompt_ids), max_tokens, scored=scored)
    return prompt_ids, max_tokens

  def image_prompt_ids(self, prompt: str, images: int, max_tokens: int | None
                       ) -> tuple[list[int], int]:
    """`prompt_ids` of a prompt holding one placeholder per image, each expanded to the
    vision tower's patches."""
    if not images:
      return self.prompt_ids(prompt, max_tokens)
    prompt_ids = vision_prefill.expanded_ids(self.encode(prompt), self.config, images)
    if max_tokens is None:
      max_tokens = max(1, self.context_length - len(prompt_ids))
    self.check_fits(len(prompt_ids), max_tokens)
    return prompt_ids, max_tokens

  def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """/tokenize: a special token's text (`</s>`) is its id; `add_special_tokens` puts bos
    first."""
    return text_ids.encode(self.tokenizer, text, add_special_tokens)

  def token_prompt(self, prompt_ids: list[int], max_tokens: int | None, *, scored: bool = False
                   ) -> tuple[list[int], int]:
    """`prompt_ids` as a request gives them (token ids, no bos added), checked like a text
    prompt's; ValueError for an id the model has no row for."""
    if not prompt_ids:
      raise ValueError("the prompt has no tokens; send at least one token id")
    if min(prompt_ids) < 0 or max(prompt_ids) >= self.config.vocab_size:
      bad = next(t for t in prompt_ids if not 0 <= t < self.config.vocab_size)
      raise ValueError(f"token id {bad} is not in [0, {self.config.vocab_size}); tokenize the "
                       "prompt with this model's tokenizer (POST /tokenize)")
    if max_tokens is None:
      max_tokens = max(1, self.context_length - len(prompt_ids))
    self.check_fits(len(prompt_ids), max_tokens, scored=scored)
    return list(prompt_ids), max_tokens

  def tokenizer_info(self) -> dict:
    """/tokenizer_info, as vLLM answers it: the special tokens' texts and the context."""
    piece = lambda token_id: (self.tokenizer.id_to_piece(token_id)  # noqa: E731
                              if token_id >= 0 else None)
    return {"tokenizer_class": "SentencePiece", "bos_token": piece(self.tokenizer.bos_id()),
            "eos_token": piece(self.eos_id), "pad_token": piece(self.tokenizer.pad_id()),
            "unk_token": piece(self.tokenizer.unk_id()),
            "model_max_length": self.context_length}

  # --- the reference ---------------------------------------------------------------------------

  def logits_without_cache(self, token_ids: list[int]) -> np.ndarray:
    """float32 [len, vocab]: the full causal forward pass over `token_ids`, no cache."""
    width = max(self.context_length, len(token_ids))
    padded = np.full((1, width), sampling.PAD_ID, np.int32)
    padded[0, :len(token_ids)] = token_ids
    logits = _full_forward_logits(self.graphdef, self.params, padded)
    return np.asarray(logits)[0, :len(token_ids)]

  def greedy_decode_without_cache(self, prompt_ids: list[int], max_new_tokens: int, *,
                                  stop_at_eos: bool = True) -> list[int]:
    """Argmax decoding that reruns the full sequence every step, without a KV cache.

    Every step runs at one fixed width; causal attention keeps the tail padding invisible
    to the real tokens, so a single compilation serves every length.
    """
    token_ids = list(prompt_ids)
    for _ in range(max_new_tokens):
      token_ids.append(int(np.argmax(self.logits_without_cache(token_ids)[-1])))
      if stop_at_eos and token_ids[-1] in self.stop_ids:
        break
    return token_ids[len(prompt_ids):]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_logits(graphdef, params, tokens):
  """tokens: [batch, seq] -> logits [batch, seq, vocab], causal attention, no cache."""
  logits, _ = nnx.merge(graphdef, params)(tokens)
  return logits
