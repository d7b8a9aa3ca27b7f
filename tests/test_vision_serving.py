"""serving.vision_prefill through the engine, the orchestrator and the server, on a tiny random
vision model: image chat gives the greedy tokens of an independent reference (the training
forward pass, no cache, over the expanded sequence, rerun for every token), and a text request
served beside image requests gives the tokens it gets alone.
"""

import base64
import dataclasses
import functools
import hashlib
import io
import shutil
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import sentencepiece as spm
from fastapi.testclient import TestClient
from flax import nnx
from PIL import Image
from test_serving import save_random_checkpoint

from beam_pipelines.chat_template import (
  CHAT_STOPS,
  IMAGE_TOKEN,
  RESERVED_TOKENS,
  chat_prompt,
)
from maxlm import checkpoint, sampling
from maxlm.model import ModelConfig, multimodal
from maxlm.model.vit import VisionConfig
from serving import kv_pages, vision_prefill
from serving.engine import Engine, SamplingSettings, Step
from serving.orchestrator import Orchestrator
from serving.server import create_app

IMAGE_SIZE, PATCH_SIZE = 16, 8  # 4 patches an image
CONTEXT = 128
QUESTION = "def wrap(text, width=70):"


def train_tokenizer(directory):
  lines = [line for line in Path(textwrap.__file__).read_text().splitlines() if line.strip()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(directory / "spm"), model_type="bpe",
      vocab_size=384, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
      user_defined_symbols=list(RESERVED_TOKENS), minloglevel=2)
  return directory / "spm.model"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run dir holding a random vision model's checkpoint and a tokenizer with `<|image|>`."""
  tokenizer_file = train_tokenizer(tmp_path_factory.mktemp("tokenizer"))
  tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
  vision = VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_layers=1, embed_dim=32,
                        num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
                        image_token_id=tokenizer.piece_to_id(IMAGE_TOKEN))
  config = ModelConfig(vocab_size=tokenizer.vocab_size(), num_layers=2, embed_dim=64,
                       num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                       max_seq_len=CONTEXT, vision=vision)
  workdir = tmp_path_factory.mktemp("vision_run")
  save_random_checkpoint(workdir, config, hashlib.sha256(tokenizer_file.read_bytes()).hexdigest())
  shutil.copy(tokenizer_file, workdir / checkpoint.TOKENIZER)
  return workdir


@pytest.fixture(scope="module")
def engine(run_dir) -> Engine:
  return Engine.from_checkpoint(run_dir, slots=4)


@pytest.fixture(scope="module")
def app(engine):
  """The server's app; its orchestrator, the only one driving `engine`, serves every test."""
  app = create_app(engine)
  yield app
  app.state.orchestrator.shutdown(grace_s=10)


@pytest.fixture(scope="module")
def orchestrator(app) -> Orchestrator:
  return app.state.orchestrator


def random_images(count: int, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) for _ in range(count)]


def data_url(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits_without_cache(graphdef, params, tokens, images):
  return multimodal.image_and_text_logits(nnx.merge(graphdef, params), tokens, images)


def greedy_reference(engine: Engine, prompt_ids: list[int], images: list[np.ndarray],
                     max_new_tokens: int) -> list[int]:
  """Argmax decoding that reruns the training forward pass (no cache) over the whole expanded
  sequence for every token, at one fixed width."""
  pixels = jnp.asarray(np.stack(images)[None])
  token_ids = list(prompt_ids)
  for _ in range(max_new_tokens):
    padded = np.full((1, CONTEXT), sampling.PAD_ID, np.int32)
    padded[0, :len(token_ids)] = token_ids
    logits = _logits_without_cache(engine.graphdef, engine.params, padded, pixels)
    token_ids.append(int(np.argmax(logits[0, len(token_ids) - 1])))
    if token_ids[-1] == engine.eos_id:
      break
  return token_ids[len(prompt_ids):]


def image_prompt(images: int, question: str = QUESTION) -> str:
  return chat_prompt([("user", IMAGE_TOKEN * images + question)])


def tokens_of(orchestrator, prompt_ids, **request_args) -> list[int]:
  """The greedy tokens the orchestrator serves for one request."""
  deltas = orchestrator.generate(prompt_ids, settings=SamplingSettings(temperature=0.0),
                                 **request_args)
  return [delta.token_id for delta in deltas]


def test_each_placeholder_expands_to_one_position_per_patch(engine):
  prompt_ids, _ = engine.image_prompt_ids(image_prompt(2), 2, 4)
  image_id = engine.config.vision.image_token_id
  assert prompt_ids.count(image_id) == 2 * (IMAGE_SIZE // PATCH_SIZE) ** 2
  assert [t for t in prompt_ids if t != image_id] == [
      t for t in engine.encode(image_prompt(2)) if t != image_id]
  with pytest.raises(ValueError, match="2 image placeholders for 3 images"):
    engine.image_prompt_ids(image_prompt(2), 3, 4)


def test_images_pad_to_a_power_of_two_count_with_black_images():
  padded = vision_prefill.padded_images(random_images(3, seed=0))
  assert padded.shape == (1, 4, IMAGE_SIZE, IMAGE_SIZE, 3) and padded.dtype == np.uint8
  assert not padded[0, 3].any() and padded[0, 2].any()


@pytest.mark.parametrize("count", [1, 2])
def test_an_image_prompt_decodes_the_references_greedy_tokens(engine, orchestrator, count):
  images = random_images(count, seed=count)
  prompt_ids, _ = engine.image_prompt_ids(image_prompt(count), count, 12)
  expected = greedy_reference(engine, prompt_ids, images, 12)
  assert tokens_of(orchestrator, prompt_ids, images=images, max_tokens=12) == expected


def test_the_references_logits_depend_on_the_images(engine):
  """So that an engine ignoring the images could not pass the tests above."""
  prompt_ids, _ = engine.image_prompt_ids(image_prompt(1), 1, 1)
  padded = np.full((1, CONTEXT), sampling.PAD_ID, np.int32)
  padded[0, :len(prompt_ids)] = prompt_ids
  logits = [_logits_without_cache(engine.graphdef, engine.params, padded,
                                  jnp.asarray(np.stack(random_images(1, seed))[None]))
            for seed in (1, 2)]
  last = len(prompt_ids) - 1
  assert not np.allclose(logits[0][0, last], logits[1][0, last], atol=1e-3)


def test_image_chat_through_the_openai_client_gives_the_references_text(engine, app):
  [image] = random_images(1, seed=3)
  with TestClient(app) as http:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
    response = client.chat.completions.create(
        model=engine.model_name, max_tokens=10, temperature=0, messages=[{
            "role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": QUESTION}]}])
    card = client.models.list().data[0]
  prompt_ids, _ = engine.image_prompt_ids(image_prompt(1), 1, 10)
  text = engine.decode(greedy_reference(engine, prompt_ids, [image], 10))
  cut = min([text.index(stop) for stop in CHAT_STOPS if stop in text] + [len(text)])
  assert response.choices[0].message.content == text[:cut]
  assert response.usage.prompt_tokens == len(prompt_ids)
  assert card.model_extra["capabilities"] == {"vision": True}


def test_a_text_request_beside_image_requests_gets_the_tokens_it_gets_alone(engine, orchestrator):
  text_ids, _ = engine.prompt_ids(chat_prompt([("user", QUESTION)]), 16)
  alone = engine.greedy_decode_without_cache(text_ids, 16)
  requests = [(text_ids, {}, alone)]
  for seed in (4, 5):
    images = random_images(1, seed)
    prompt_ids, _ = engine.image_prompt_ids(image_prompt(1), 1, 16)
    requests.append((prompt_ids, {"images": images},
                     greedy_reference(engine, prompt_ids, images, 16)))
  got = [None] * len(requests)

  def run(index, prompt_ids, extra):
    got[index] = tokens_of(orchestrator, prompt_ids, max_tokens=16, **extra)

  threads = [threading.Thread(target=run, args=(index, ids, extra))
             for index, (ids, extra, _) in enumerate(requests)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert got == [expected for _, _, expected in requests]


def until_eos(tokens: list[int], eos_id: int) -> list[int]:
  return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def test_image_prompts_prefilled_in_one_call_each_decode_the_references_tokens(run_dir):
  """Three image prompts of different lengths and image counts, admitted in one turn, share
  one prefill call; each then decodes the greedy tokens of its own no-cache reference."""
  engine = Engine.from_checkpoint(run_dir, slots=4)  # its own pool: the app's is in use
  prompts = []
  for count, question, seed in [(1, QUESTION, 6), (2, "x = 1", 7), (1, "", 8)]:
    prompt_ids, _ = engine.image_prompt_ids(image_prompt(count, question), count, 8)
    prompts.append((prompt_ids, random_images(count, seed)))
  state = engine.init_decode_state()
  for slot, (prompt_ids, images) in enumerate(prompts):
    engine.begin_image_prefill(slot, prompt_ids, images, SamplingSettings(temperature=0.0))
  assert engine.image_prefill_plan() == [[0, 1, 2]]
  state, choice = engine.prefill_image_prompts(state, [0, 1, 2])
  tokens = [[int(token)] for token in Step.from_choice(choice).tokens[:3]]
  for _ in range(7):
    state, choice = engine.generate(state)
    for slot, token in enumerate(Step.from_choice(choice).tokens[:3]):
      tokens[slot].append(int(token))
  assert [until_eos(got, engine.eos_id) for got in tokens] == [
      greedy_reference(engine, prompt_ids, images, 8) for prompt_ids, images in prompts]


class RecordedPrefill:
  def __init__(self):
    self.calls = []

  def __call__(self, params, state, tokens, lengths, images, counts, table, slots, *settings):
    self.calls.append((tokens.shape, images.shape, slots.tolist()))
    return state, None


def test_image_prompts_group_into_calls_of_at_most_max_tokens_padded_tokens():
  pages = kv_pages.PageTables(kv_pages.BlockAllocator(64), 4, 16, 16)
  prefill = RecordedPrefill()
  prefills = vision_prefill.ImagePrefills(pages, prefill, 4, CONTEXT, max_tokens=128)
  settings = (np.zeros(2, np.uint32), np.float32(0), np.float32(1), np.int32(0))
  for slot, (length, images) in enumerate([(20, 1), (30, 2), (40, 1), (100, 1)]):
    prefills.begin(slot, [7] * length, random_images(images, slot), settings)
  # 20 and 30 tokens: 2 rows of 32; with 40 (a bucket of 64) 4 rows of 64 pass 128: a new
  # call; so do 40 and 100 (2 rows of 128).
  assert prefills.plan() == [[0, 1], [2], [3]]
  for slots in prefills.plan():
    prefills.run(None, None, slots)
  assert prefill.calls == [((2, 32), (2, 2, IMAGE_SIZE, IMAGE_SIZE, 3), [0, 1]),
                           ((1, 64), (1, 1, IMAGE_SIZE, IMAGE_SIZE, 3), [2]),
                           ((1, 128), (1, 1, IMAGE_SIZE, IMAGE_SIZE, 3), [3])]
  assert not prefills.pending


def test_a_resumed_image_prompt_reads_a_generated_placeholder_as_the_token_it_decoded(run_dir):
  """A preempted image request is prefilled again with its generated tokens; a generated
  `<|image|>` among them is text there, as the decode step that made it read it: the next
  token's log-probabilities equal those of decoding it (before, it took an image patch)."""
  engine = Engine.from_checkpoint(run_dir, slots=4)  # its own pool: the app's is in use
  image_id = engine.config.vision.image_token_id
  prompt_ids, _ = engine.image_prompt_ids(image_prompt(1), 1, 8)
  images, greedy = random_images(1, 9), SamplingSettings(temperature=0.0)
  state = engine.init_decode_state()
  engine.begin_image_prefill(0, prompt_ids, images, greedy)
  state, _ = engine.prefill_image_prompts(state, [0])
  state = dataclasses.replace(state, tokens=state.tokens.at[0].set(image_id))
  state, decoded = engine.generate(state)  # reads the placeholder as a token at len(prompt)
  engine.release(0)
  engine.begin_image_prefill(1, prompt_ids + [image_id], images, greedy)
  state, resumed = engine.prefill_image_prompts(state, [1])
  np.testing.assert_allclose(np.asarray(resumed.top_logprobs[0]),
                             np.asarray(decoded.top_logprobs[0]), atol=2e-5)
  assert int(resumed.token[0]) == int(decoded.token[0])
