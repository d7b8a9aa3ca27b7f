"""maxlm.convert: tiny random transformers Llamas in, maxlm run dirs out, and back; logits
compared against transformers' own forward pass."""

import collections
import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx
from test_serving import CONTEXT, save_random_checkpoint
from test_tokenizer import train_sentencepiece

from maxlm import checkpoint, steps
from maxlm import tokenizer as tokenizer_lib
from maxlm.convert import from_hf, hf_llama, safetensors_file, to_hf
from maxlm.errors import UserError
from maxlm.model import ModelConfig, vit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 288  # the byte-level tokenizer's 256 bytes, 3 special tokens and some merges
BASE = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "bos_token_id": 1,
        "eos_token_id": 2}
VARIANTS = {
    "gqa_untied": {},
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "rope_theta_llama3_scaling": {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "head_dim_not_hidden_over_heads": {"head_dim": 24},
}
TOLERANCE = 1e-4
GAPS = {}  # variant -> max |Δlogit|, printed for the report


def byte_level_tokenizer_json() -> str:
  """A small byte-level BPE (Llama 3's kind) trained here, nothing downloaded."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
  return tokenizer.to_str()


def make_hf_dir(directory, variant: str, dtype=torch.float32, seed: int = 0):
  """A random LlamaForCausalLM saved as safetensors, with a tokenizer.json; weights drawn wide
  enough that attention (and so RoPE) moves the logits."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**{**BASE, **VARIANTS[variant]})
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if name.endswith("norm.weight"):
        parameter.uniform_(0.5, 1.5)
      else:
        parameter.normal_(0.0, 0.3)
  model = model.to(dtype)
  model.save_pretrained(directory, safe_serialization=True)
  (directory / "tokenizer.json").write_text(TOKENIZER_JSON)
  return model


TOKENIZER_JSON = byte_level_tokenizer_json()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model.float()(torch.tensor(tokens)).logits.numpy()


def maxlm_logits(params: dict, config, tokens: np.ndarray) -> np.ndarray:
  graphdef, _ = steps.abstract_model(config)
  model = nnx.merge(graphdef, jax_tree(params))
  return np.asarray(model(jnp.asarray(tokens))[0])


def jax_tree(params: dict) -> dict:
  return {k: jax_tree(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in params.items()}


def run_params(run_dir) -> tuple[dict, object]:
  """(params as numpy, config) of a run dir's latest checkpoint, read as serving reads it."""
  step, meta = checkpoint.read_meta(run_dir)
  config = checkpoint.config_from_meta(meta)
  reader = to_hf.LayerReader(run_dir, config, step, merge=False)
  _, abstract_state = steps.abstract_model(config)
  return to_hf_tree(nnx.to_pure_dict(abstract_state), reader), config


def to_hf_tree(shapes: dict, reader, prefix=()) -> dict:
  return {key: to_hf_tree(value, reader, (*prefix, key)) if isinstance(value, dict)
          else reader((*prefix, key)) for key, value in shapes.items()}


def max_logit_gap(hf_model, run_dir, tokens, *, config_override=None) -> float:
  """The parity check: max |Δlogit| between transformers and the imported run."""
  params, config = run_params(run_dir)
  if config_override:
    config = dataclasses.replace(config, **config_override)
  return float(np.max(np.abs(hf_logits(hf_model, tokens) - maxlm_logits(params, config,
                                                                          tokens))))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_llama_variant_imports_with_logits_within_1e_4(tmp_path, variant):
  hf_model = make_hf_dir(tmp_path / "hf", variant)
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  GAPS[variant] = max_logit_gap(hf_model, tmp_path / "run", TOKENS)
  print(f"{variant}: max |Δlogit| {GAPS[variant]:.2e}")
  assert GAPS[variant] < TOLERANCE


def test_a_bfloat16_checkpoint_imports_exactly_and_computes_in_bfloat16(tmp_path):
  make_hf_dir(tmp_path / "hf", "gqa_untied", dtype=torch.bfloat16)
  config = from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  # Loaded afresh in float32: a model cast to bf16 and back keeps RoPE's frequencies rounded.
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              dtype=torch.float32).eval()
  assert config.dtype == "bfloat16"
  params, _ = run_params(tmp_path / "run")
  q = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(params["blocks"][1]["attention"]["q"], q.T.reshape(32, 4, 8))
  # The same bf16 weights computed in float32 on both sides agree to fp32 precision.
  gap = max_logit_gap(hf_model, tmp_path / "run", TOKENS, config_override={"dtype": "float32"})
  GAPS["bfloat16 (fp32 compute)"] = gap
  assert gap < TOLERANCE


def test_swapping_the_rotation_halves_of_q_and_k_fails_the_parity_check(tmp_path):
  hf_model = make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  params, config = run_params(tmp_path / "run")
  for block in params["blocks"].values():
    for name in ("q", "k"):
      first, second = np.split(block["attention"][name], 2, axis=-1)
      block["attention"][name] = np.concatenate([second, first], axis=-1)
  gap = float(np.max(np.abs(hf_logits(hf_model, TOKENS) - maxlm_logits(params, config, TOKENS))))
  assert gap > 100 * TOLERANCE


def test_export_then_import_is_the_identity_across_several_shards(tmp_path):
  make_hf_dir(tmp_path / "hf", "rope_theta_llama3_scaling")
  config = from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  to_hf.export(tmp_path / "run", tmp_path / "exported", max_shard_bytes=40_000)
  index = json.loads((tmp_path / "exported" / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert all((tmp_path / "exported" / s).stat().st_size <= 40_000 + 4096 for s in shards)
  reimported = from_hf.import_checkpoint(tmp_path / "exported", tmp_path / "again")
  assert reimported == config
  before, _ = run_params(tmp_path / "run")
  after, _ = run_params(tmp_path / "again")
  for (path, a), (_, b) in zip(to_hf._leaves(before), to_hf._leaves(after)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_an_imported_tokenizer_without_maxlm_chat_tokens_exports_without_its_chat_template(
    tmp_path):
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  to_hf.export(tmp_path / "run", tmp_path / "exported")
  config = json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())
  assert "chat_template" not in config  # its tokenizer would read <|user|> as plain text


def test_an_moe_run_is_refused_in_one_line_before_anything_is_written(tmp_path):
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  step, _ = checkpoint.read_meta(tmp_path / "run")
  metadata = tmp_path / "run" / checkpoint.CHECKPOINTS / str(step) / "meta" / "metadata"
  meta = json.loads(metadata.read_text())
  meta["model_config"].update(num_experts=4, experts_per_token=2, moe_mlp_dim=16)
  metadata.write_text(json.dumps(meta))
  with pytest.raises(UserError, match=r"cannot be exported as a Hugging Face Llama: it has "
                                      r"mixture-of-experts layers \(num_experts=4\)"):
    to_hf.export(tmp_path / "run", tmp_path / "exported")
  assert not (tmp_path / "exported").exists()


def test_an_export_that_fails_midway_leaves_the_output_dir_as_it_was(tmp_path, monkeypatch):
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  exported = tmp_path / "exported"
  to_hf.export(tmp_path / "run", exported, max_shard_bytes=40_000)
  before = {path.name: path.read_bytes() for path in exported.iterdir()}
  write = safetensors_file.write
  def disk_full_at_the_second_shard(path, *args, **kwargs):
    if "-00002-of-" in path.name:
      raise OSError(28, "No space left on device")
    return write(path, *args, **kwargs)
  monkeypatch.setattr(safetensors_file, "write", disk_full_at_the_second_shard)
  for output_dir in (exported, tmp_path / "new"):
    with pytest.raises(OSError, match="No space left"):
      to_hf.export(tmp_path / "run", output_dir, max_shard_bytes=40_000, dtype="bfloat16")
  assert {path.name: path.read_bytes() for path in exported.iterdir()} == before
  assert sorted(path.name for path in tmp_path.iterdir()) == ["exported", "hf", "run"]


def test_a_re_export_in_fewer_shards_leaves_no_weights_of_the_earlier_one(tmp_path):
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  exported = tmp_path / "exported"
  to_hf.export(tmp_path / "run", exported, max_shard_bytes=40_000)
  first_shards = sorted(path.name for path in exported.glob("model-*.safetensors"))
  (exported / "model.safetensors").write_bytes(b"another tool's single-file export")
  (exported / "README.md").write_text("the user's own notes")
  to_hf.export(tmp_path / "run", exported)  # one shard
  index = json.loads((exported / "model.safetensors.index.json").read_text())
  assert len(first_shards) > 1
  assert sorted(path.name for path in exported.glob("model*.safetensors")) == sorted(
      set(index["weight_map"].values())) == ["model-00001-of-00001.safetensors"]
  assert (exported / "README.md").read_text() == "the user's own notes"


def test_a_vision_model_has_no_llama_layout_and_a_text_model_has_one():
  text = hf_llama.model_config({**BASE, "model_type": "llama", "hidden_act": "silu"})
  assert hf_llama.unexportable(text) is None
  vision = dataclasses.replace(text, vision=vit.VisionConfig())
  assert "vision tower" in hf_llama.unexportable(vision)


def test_transformers_loads_the_export_and_gives_the_same_logits(tmp_path):
  hf_model = make_hf_dir(tmp_path / "hf", "head_dim_not_hidden_over_heads")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  to_hf.export(tmp_path / "run", tmp_path / "exported", max_shard_bytes=30_000)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
  np.testing.assert_allclose(hf_logits(loaded, TOKENS), hf_logits(hf_model, TOKENS),
                             atol=1e-6)


def test_our_safetensors_writer_is_read_back_by_the_safetensors_package(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.int64)}
  safetensors_file.write(tmp_path / "x.safetensors",
                         [(name, a.shape, a.dtype) for name, a in arrays.items()],
                         arrays.__getitem__)
  loaded = load_file(tmp_path / "x.safetensors")
  for name, array in arrays.items():
    np.testing.assert_array_equal(loaded[name], array)


def test_a_lora_run_exports_merged_and_its_adapters_in_peft_layout(tmp_path):
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  base = from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "base")
  params, _ = run_params(tmp_path / "base")
  lora = dataclasses.replace(base, lora_rank=2, lora_alpha=4.0, lora_targets=("q", "o", "down"))
  rng = np.random.default_rng(1)
  _, abstract_state = steps.abstract_model(lora)
  with_adapters = to_hf_tree(nnx.to_pure_dict(abstract_state), lambda path: (
      _at(params, path) if "_lora_" not in str(path[-1])
      else rng.normal(0, 0.3, _at(nnx.to_pure_dict(abstract_state), path).shape)
      .astype(np.float32)))
  (tmp_path / "lora").mkdir()
  tokenizer = tokenizer_lib.copy_into(tmp_path / "base" / "tokenizer.json", tmp_path / "lora")
  from_hf.write_run(tmp_path / "lora", with_adapters, lora, tokenizer)
  to_hf.export(tmp_path / "lora", tmp_path / "exported")
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
  np.testing.assert_allclose(hf_logits(merged, TOKENS), maxlm_logits(with_adapters, lora, TOKENS),
                             atol=TOLERANCE)
  adapter_config = json.loads((tmp_path / "exported/adapter/adapter_config.json").read_text())
  assert adapter_config["target_modules"] == ["q_proj", "o_proj", "down_proj"]
  adapters = safetensors_file.SafetensorsFile(tmp_path / "exported/adapter/"
                                              "adapter_model.safetensors")
  # PEFT's rule: W + lora_B @ lora_A * alpha / r, on the base model's weight.
  prefix = "base_model.model.model.layers.1.self_attn.o_proj"
  delta = (adapters.tensor(f"{prefix}.lora_B.weight") @ adapters.tensor(f"{prefix}.lora_A.weight")
           * adapter_config["lora_alpha"] / adapter_config["r"])
  base_o = params["blocks"][1]["attention"]["o"].reshape(-1, 32).T
  np.testing.assert_allclose(base_o + delta, merged.model.layers[1].self_attn.o_proj.weight
                             .detach().numpy(), atol=1e-6)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("field, value, named", [
    ("attention_bias", True, "attention_bias"),
    ("sliding_window", 4096, "sliding_window"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type"),
    ("torch_dtype", "float16", "torch_dtype"),
])
def test_a_config_field_outside_the_llama_variants_is_refused_naming_it(field, value, named):
  hf = {**BASE, "model_type": "llama", "hidden_act": "silu", field: value}
  with pytest.raises(UserError, match=f"config.json field {named}="):
    hf_llama.model_config(hf)


def test_the_import_command_refuses_an_unknown_field_in_one_line_with_exit_2(tmp_path):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**BASE, "attention_bias": True}))
  result = subprocess.run([sys.executable, "-m", "maxlm.convert.from_hf",
                           f"--hf_dir={tmp_path / 'hf'}", f"--output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.json field attention_bias=True is not supported; maxlm imports "
      "attention_bias=False only")


def test_an_imported_model_with_its_own_tokenizer_json_serves(tmp_path):
  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  hf_model = make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  engine = Engine.from_checkpoint(tmp_path / "run", max_len=32, slots=1)
  hf_tokenizer = tokenizers.Tokenizer.from_str(TOKENIZER_JSON)
  text = "the lazy fox"
  assert engine.encode(text) == [1] + hf_tokenizer.encode(text).ids
  assert engine.eos_id == 2
  assert b"".join(engine.token_bytes(t) for t in engine.encode(text)) == text.encode()
  ids = engine.encode(text)
  np.testing.assert_allclose(engine.logits_without_cache(ids),
                             hf_logits(hf_model, np.asarray([ids]))[0], atol=TOLERANCE)


def _greedy_completion(run_dir, prompt: str) -> dict:
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel

  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  from serving.server import create_app  # pylint: disable=import-outside-toplevel
  engine = Engine.from_checkpoint(run_dir, slots=1)
  with TestClient(create_app(engine, model_name="imported")) as client:
    response = client.post("/v1/completions", json={
        "model": "imported", "prompt": prompt, "max_tokens": 4, "temperature": 0,
        "logprobs": 1})
  assert response.status_code == 200, response.text
  return response.json()


def test_generation_stops_at_every_eos_id_the_generation_config_lists(tmp_path):
  """Llama 3's instruct models end a turn with <|eot_id|>, listed beside <|end_of_text|> in
  generation_config.json's eos_token_id: the server stops there as transformers does."""
  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "plain")
  engine = Engine.from_checkpoint(tmp_path / "plain", slots=1)
  prompt = "the lazy fox"
  first = int(np.argmax(engine.logits_without_cache(engine.encode(prompt))[-1]))
  assert first != engine.eos_id and engine.stop_ids == {2}
  plain = _greedy_completion(tmp_path / "plain", prompt)["choices"][0]
  assert plain["finish_reason"] == "length" and len(plain["logprobs"]["tokens"]) == 4

  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  (tmp_path / "hf" / "generation_config.json").write_text(
      json.dumps({**generation, "eos_token_id": [2, first]}))
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "listed")
  assert Engine.from_checkpoint(tmp_path / "listed", slots=1).stop_ids == {2, first}
  listed = _greedy_completion(tmp_path / "listed", prompt)
  assert listed["choices"][0]["finish_reason"] == "stop"
  assert listed["choices"][0]["text"] == "" and listed["usage"]["completion_tokens"] == 1
  to_hf.export(tmp_path / "listed", tmp_path / "exported")
  assert transformers.GenerationConfig.from_pretrained(
      tmp_path / "exported").eos_token_id == [2, first]


def test_a_request_that_leaves_out_sampling_settings_takes_the_generation_configs(tmp_path):
  """As vLLM's --generation-config auto: the model's top_k=1 makes a request without one
  greedy; the request's own value, or the API's defaults (--generation_config=vllm), win."""
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel

  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  from serving.server import create_app  # pylint: disable=import-outside-toplevel
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": 2, "temperature": 0.9, "top_k": 1, "do_sample": True}))
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  engine = Engine.from_checkpoint(tmp_path / "run", slots=2)
  assert engine.sampling_defaults == {"temperature": 0.9, "top_k": 1}
  request = {"model": "imported", "prompt": "the lazy fox", "max_tokens": 8, "seed": 5,
             "ignore_eos": True}

  def texts(client, *extras) -> list[str]:
    return [client.post("/v1/completions", json={**request, **extra}).json()[
        "choices"][0]["text"] for extra in extras]

  with TestClient(create_app(engine, model_name="imported")) as client:
    model_defaults, greedy, own_top_k, api_values = texts(
        client, {}, {"temperature": 0}, {"top_k": -1}, {"temperature": 1, "top_k": 0})
  assert model_defaults == greedy and own_top_k != greedy
  engine = Engine.from_checkpoint(tmp_path / "run", slots=2, generation_defaults=False)
  with TestClient(create_app(engine, model_name="imported")) as client:
    [api_defaults] = texts(client, {})
  assert api_defaults == api_values != greedy  # temperature 1, top_k off, the same seed


def test_a_sentencepiece_models_generation_config_comes_in_and_goes_out_with_it(tmp_path):
  """Llama 2's kind: tokenizer.model, and a generation_config.json with sampling defaults."""
  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  tokenizer_file = tmp_path / "spm.model"  # as beam_pipelines.prepare_text trains them
  tokenizer_file.write_bytes(train_sentencepiece("bpe"))
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
  config = ModelConfig(vocab_size=sp.vocab_size(), num_layers=1, embed_dim=32, num_heads=2,
                       num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=CONTEXT)
  save_random_checkpoint(tmp_path / "run", config,
                         hashlib.sha256(tokenizer_file.read_bytes()).hexdigest())
  shutil.copy(tokenizer_file, tmp_path / "run" / "tokenizer.model")
  to_hf.export(tmp_path / "run", tmp_path / "hf")
  generation = {"eos_token_id": [sp.eos_id(), 7], "temperature": 0.5}
  (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(generation))
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "imported")
  assert (tmp_path / "imported" / "tokenizer.model").is_file()
  engine = Engine.from_checkpoint(tmp_path / "imported", slots=1)
  assert engine.stop_ids == {sp.eos_id(), 7} and engine.sampling_defaults == {"temperature": 0.5}
  to_hf.export(tmp_path / "imported", tmp_path / "exported")
  assert json.loads((tmp_path / "exported" / "generation_config.json").read_text()) == generation


def test_a_sampling_default_outside_its_range_is_refused_naming_the_file(tmp_path):
  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"temperature": 3}))
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  with pytest.raises(UserError, match=re.escape(
      f"{tmp_path / 'run' / 'generation_config.json'}: temperature=3 must be a number in "
      "[0, 2]; fix it, or serve with --generation_config=vllm")):
    Engine.from_checkpoint(tmp_path / "run", slots=1)
  # past int32, as a request's top_k is refused (it would fail every request on the device)
  (tmp_path / "run" / "generation_config.json").write_text(json.dumps({"top_k": 2**31}))
  with pytest.raises(UserError, match=re.escape(
      "top_k=2147483648 must be an integer in [-1, 2147483647]")):
    Engine.from_checkpoint(tmp_path / "run", slots=1)
  # what --generation_config=vllm serves with: the file's defaults are not read
  assert Engine.from_checkpoint(tmp_path / "run", slots=1,
                                generation_defaults=False).sampling_defaults == {}


def test_a_list_of_eos_ids_in_config_json_alone_becomes_the_run_dirs_generation_config(
    tmp_path):
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  (tmp_path / "hf" / "generation_config.json").unlink()
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": [2, 7]}))
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  tokenizer = tokenizer_lib.load(tmp_path / "run" / "tokenizer.json")
  assert tokenizer.eos_id() == 2 and tokenizer.stop_ids() == (2, 7)


@pytest.mark.parametrize("content, named", [
    ('{"eos_token_id": [2, 9999]}', "generation_config.json: eos_token_id=[2, 9999]; give a "
     "token id or a list of them, each in [0, 288)"),
    ('{"eos_token_id": "</s>"}', 'generation_config.json: eos_token_id="</s>"'),
    ('{"eos_token_id": [2,', "generation_config.json is not valid JSON"),
])
def test_a_bad_generation_config_is_refused_at_import_naming_the_file(tmp_path, content, named):
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  (tmp_path / "hf" / "generation_config.json").write_text(content)
  with pytest.raises(UserError, match=re.escape(str(tmp_path / "hf" / named))):
    from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_an_imported_model_refuses_chat_in_one_line_and_still_completes(tmp_path):
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel

  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  from serving.server import create_app  # pylint: disable=import-outside-toplevel
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  engine = Engine.from_checkpoint(tmp_path / "run", slots=1)
  with TestClient(create_app(engine, model_name="imported")) as client:
    chat = client.post("/v1/chat/completions", json={
        "model": "imported", "messages": [{"role": "user", "content": "the fox"}],
        "max_tokens": 4})
    completion = client.post("/v1/completions", json={
        "model": "imported", "prompt": "the fox", "max_tokens": 4, "temperature": 0})
  assert chat.status_code == 400, chat.text
  assert chat.json()["error"]["message"] == (
      "this model's tokenizer has no <|end|> <|system|> <|user|> <|assistant|> tokens (not "
      "prepared by beam_pipelines.prepare_text: an imported model?) and its "
      "tokenizer_config.json no chat_template, so it has no chat template; send the prompt in "
      "the model's own format to /v1/completions")
  assert completion.status_code == 200, completion.text


# A Llama-3-like template: the bos, each turn after its role's header, a check of its own.
HF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if not message['content'] %}{{ raise_exception('a message is empty') }}{% endif %}"
    "<<{{ message['role'] }}>>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}")


@pytest.mark.parametrize("saved_in", ["tokenizer_config.json", "chat_template.jinja"])
def test_an_imported_model_chats_in_the_template_its_tokenizer_brought(tmp_path, saved_in):
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel

  from serving.engine import Engine  # pylint: disable=import-outside-toplevel
  from serving.server import create_app  # pylint: disable=import-outside-toplevel
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  if saved_in == "tokenizer_config.json":  # the named-templates form
    (tmp_path / "hf" / saved_in).write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": HF_CHAT_TEMPLATE}]}))
  else:  # where transformers >= 4.50 saves it
    (tmp_path / "hf" / saved_in).write_text(HF_CHAT_TEMPLATE)
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  engine = Engine.from_checkpoint(tmp_path / "run", slots=1)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the fox"}]
  with TestClient(create_app(engine, model_name="imported")) as client:
    chat = client.post("/v1/chat/completions", json={
        "model": "imported", "messages": messages, "max_tokens": 6, "temperature": 0,
        "ignore_eos": True})
    # the template rendered by hand; the server puts the bos in front of any prompt
    completion = client.post("/v1/completions", json={
        "model": "imported", "prompt": "<<system>>Be brief.\n<<user>>the fox\n<<assistant>>",
        "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    refused = client.post("/v1/chat/completions", json={
        "model": "imported", "messages": [{"role": "user", "content": ""}], "max_tokens": 2})
  assert chat.status_code == completion.status_code == 200, (chat.text, completion.text)
  assert chat.json()["usage"] == completion.json()["usage"]  # the same prompt ids
  assert chat.json()["choices"][0]["message"]["content"] == completion.json()["choices"][0]["text"]
  assert refused.status_code == 400, refused.text  # the template's own check, in its words
  assert refused.json()["error"]["message"] == (
      "messages: the model's chat template refused the messages: a message is empty")


@pytest.mark.slow  # 33-49 s: a pipeline run, an import and two compiled training steps
def test_an_imported_model_trains_on_text_prepared_with_its_own_tokenizer_json(tmp_path):
  from conftest import gin_config  # pylint: disable=import-outside-toplevel

  from beam_pipelines import prepare_text, records  # pylint: disable=import-outside-toplevel
  from maxlm import train as train_module  # pylint: disable=import-outside-toplevel
  make_hf_dir(tmp_path / "hf", "gqa_untied")
  from_hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  texts = [f"the quick fox {i} jumps over the lazy dog" for i in range(200)]
  (tmp_path / "docs").mkdir()
  for i, text in enumerate(texts):
    (tmp_path / "docs" / f"{i}.txt").write_text(text)
  manifest = prepare_text.run(
      [str(tmp_path / "docs" / "*.txt")], str(tmp_path / "data"), vocab_size=0, seq_len=64,
      validation_fraction=0.2, tokenizer=str(tmp_path / "run"),
      stages=prepare_text.StageFlags(normalize=False, langid=False, quality=False, pii=False,
                                     near_dedup=False))
  assert (manifest["tokenizer"]["file"], manifest["tokenizer"]["vocab_size"]) == (
      "tokenizer.json", VOCAB)
  hf_tokenizer = tokenizers.Tokenizer.from_str(TOKENIZER_JSON)
  expected = collections.Counter(token for text in texts
                                 for token in [1, *hf_tokenizer.encode(text).ids, 2])
  written = collections.Counter()
  for split in ("train", "validation"):  # packing may split a document across rows
    for shard in manifest["splits"][split]["shards"]:
      for row in records.read_shard(str(tmp_path / "data" / shard), 64):
        written.update(row["tokens"][row["segment_ids"] > 0].tolist())
  assert written == expected
  shape = "".join(f"ModelConfig.{name} = {value}\n" for name, value in (
      ("vocab_size", VOCAB), ("num_layers", 2), ("embed_dim", 32), ("num_heads", 4),
      ("num_kv_heads", 2), ("head_dim", 8), ("mlp_dim", 48), ("max_seq_len", 64)))
  mesh = "make_mesh.data = 2\nmake_mesh.fsdp = 2\nmake_mesh.tensor = 2\n"
  with gin_config(shape + mesh + "train.global_batch_size = 8\ntrain.eval_batches = 1\n"):
    summary = train_module.train(workdir=str(tmp_path / "tuned"),
                                 data_dir=str(tmp_path / "data"), steps=2,
                                 init_from=str(tmp_path / "run"), sample_prompt=None)
  assert np.isfinite(summary["eval_loss"])
