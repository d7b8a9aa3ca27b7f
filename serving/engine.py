"""The serving engine: a trained checkpoint on one device, text in, text out.

`stream` runs the KV-cached generation of `maxlm.sampling` token by token, with the text each
token makes stable; `complete` collects it. `greedy_decode_without_cache` recomputes the whole
sequence every step and exists as the independent reference for it.
"""

import dataclasses
import functools
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import sentencepiece as spm
from flax import nnx

from maxlm import checkpoint, sampling, sharding, steps
from maxlm.model import ModelConfig
from serving.detokenize import TextStream


class ContextLengthError(ValueError):
  """The prompt (plus the tokens asked for) does not fit the model's context."""


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  token_ids: list[int]  # the generated tokens, the eos that ended them included
  prompt_tokens: int
  finish_reason: Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class Delta:
  """One generated token and the text it made stable (often "", e.g. mid-character)."""
  text: str
  token_id: int
  finish_reason: Literal["stop", "length"] | None  # set on the last delta only


def load_tokenizer(path: Path, expected_sha256: str | None) -> spm.SentencePieceProcessor:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; copy the training data dir's tokenizer.model "
                            "into the run dir")
  model_bytes = path.read_bytes()
  sha256 = hashlib.sha256(model_bytes).hexdigest()
  if expected_sha256 is not None and sha256 != expected_sha256:
    raise ValueError(f"{path} has sha256 {sha256[:12]}… but the checkpoint was trained with "
                     f"{expected_sha256[:12]}…; copy the training data dir's tokenizer.model "
                     "into the run dir")
  return spm.SentencePieceProcessor(model_proto=model_bytes)


def one_device_params(checkpoint_dir: str | os.PathLike, config: ModelConfig, step: int):
  """(graphdef, params) of a checkpoint, restored whole onto the first local device."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, abstract_state = steps.abstract_model(config)
  abstract_params = jax.tree.map(
      lambda shape, sharding_: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding_),
      nnx.to_pure_dict(abstract_state), sharding.param_shardings(abstract_state, mesh))
  return graphdef, checkpoint.restore_params(checkpoint_dir, abstract_params, step)


class Engine:
  """One model and its tokenizer; not thread-safe for concurrent calls (callers serialize)."""

  def __init__(self, graphdef, params, config: ModelConfig,
               tokenizer: spm.SentencePieceProcessor, *, model_name: str,
               max_len: int | None = None):
    if tokenizer.vocab_size() > config.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.vocab_size()} pieces but the model only "
                       f"{config.vocab_size}; serve the checkpoint with its own tokenizer.model")
    self.graphdef, self.params, self.config = graphdef, params, config
    self.tokenizer = tokenizer
    self.model_name = model_name
    self.context_length = sampling.context_length(config, max_len)

  @classmethod
  def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, *, model_name: str | None = None,
                      max_len: int | None = None) -> "Engine":
    """The latest checkpoint of a run dir (or of its checkpoints/ dir)."""
    checkpoints, tokenizer_file = checkpoint.run_paths(checkpoint_dir)
    step, meta = checkpoint.read_meta(checkpoint_dir)
    config = checkpoint.config_from_meta(meta)
    tokenizer = load_tokenizer(tokenizer_file, meta.get("tokenizer_sha256"))
    graphdef, params = one_device_params(checkpoint_dir, config, step)
    return cls(graphdef, params, config, tokenizer,
               model_name=model_name or checkpoints.parent.name, max_len=max_len)

  def warmup(self):
    """Compiles every prefill bucket and the decode step, so no request waits on XLA."""
    buckets = sampling.prefill_buckets(self.context_length)
    for prompt_len in [1] + [smaller + 1 for smaller in buckets[:-1]]:
      new_tokens = min(2, self.context_length - prompt_len)
      sampling.generate(self.graphdef, self.params, [self.tokenizer.bos_id()] * prompt_len,
                        max_new_tokens=new_tokens, config=self.config,
                        max_len=self.context_length)

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id()

  def encode(self, prompt: str) -> list[int]:
    return [self.tokenizer.bos_id()] + self.tokenizer.encode(prompt)

  def decode(self, token_ids: list[int]) -> str:
    return self.tokenizer.decode([t for t in token_ids if t != self.eos_id])

  def check_fits(self, prompt_tokens: int, max_tokens: int):
    if prompt_tokens >= self.context_length:
      raise ContextLengthError(
          f"the prompt is {prompt_tokens} tokens but the model's context is "
          f"{self.context_length}; shorten the prompt")
    if prompt_tokens + max_tokens > self.context_length:
      raise ContextLengthError(
          f"the prompt's {prompt_tokens} tokens plus max_tokens={max_tokens} exceed the "
          f"model's {self.context_length}-token context; lower max_tokens to at most "
          f"{self.context_length - prompt_tokens} or shorten the prompt")

  def prompt_ids(self, prompt: str, max_tokens: int | None) -> tuple[list[int], int]:
    """(token ids, max_tokens) of a request, `max_tokens=None` meaning the rest of the context."""
    prompt_ids = self.encode(prompt)
    if max_tokens is None:
      max_tokens = max(1, self.context_length - len(prompt_ids))
    self.check_fits(len(prompt_ids), max_tokens)
    return prompt_ids, max_tokens

  def stream(self, prompt_ids: list[int], *, max_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None,
             stop: list[str] | None = None) -> Iterator[Delta]:
    """One Delta per generated token, ending at eos, a stop string or `max_tokens`.

    Lazy: closing the iterator stops generation before the next decode step.
    """
    tokens = sampling.stream_tokens(
        self.graphdef, self.params, prompt_ids, config=self.config, max_new_tokens=max_tokens,
        temperature=temperature, top_p=top_p,
        seed=secrets.randbits(31) if seed is None else seed, eos_id=self.eos_id,
        max_len=self.context_length)
    text = TextStream(self.decode, stop)
    for count, token_id in enumerate(tokens, 1):
      if token_id == self.eos_id:
        yield Delta(text.flush(), token_id, "stop")
        return
      new_text, stopped = text.push(token_id)
      if stopped:
        yield Delta(new_text, token_id, "stop")
        return
      if count == max_tokens:
        yield Delta(new_text + text.flush(), token_id, "length")
        return
      yield Delta(new_text, token_id, None)

  def complete(self, prompt: str, *, max_tokens: int | None = 16, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None) -> Completion:
    """Continues `prompt`; `max_tokens=None` means up to the end of the context."""
    prompt_ids, max_tokens = self.prompt_ids(prompt, max_tokens)
    deltas = list(self.stream(prompt_ids, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, stop=stop))
    return Completion("".join(d.text for d in deltas), [d.token_id for d in deltas],
                      len(prompt_ids), deltas[-1].finish_reason)

  def greedy_decode_without_cache(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Argmax decoding that reruns the full sequence every step, without a KV cache.

    Every step runs at one fixed width; causal attention keeps the tail padding invisible
    to the real tokens, so a single compilation serves every length.
    """
    width = max(self.context_length, len(prompt_ids) + max_new_tokens)
    token_ids = list(prompt_ids)
    for _ in range(max_new_tokens):
      padded = np.full((1, width), sampling.PAD_ID, np.int32)
      padded[0, :len(token_ids)] = token_ids
      logits = np.asarray(_full_forward_logits(self.graphdef, self.params, padded))
      token_ids.append(int(np.argmax(logits[0, len(token_ids) - 1])))
      if token_ids[-1] == self.eos_id:
        break
    return token_ids[len(prompt_ids):]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward_logits(graphdef, params, tokens):
  """tokens: [batch, seq] -> logits [batch, seq, vocab], causal attention, no cache."""
  logits, _ = nnx.merge(graphdef, params)(tokens)
  return logits
