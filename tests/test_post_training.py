"""SFT and DPO against NumPy references: the masked loss, the DPO formulas, per-pair
log-probabilities of packed rows, sharded steps, resume after SIGKILL, and tiny end-to-end runs
(pretrain -> SFT -> DPO)."""

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx

from beam_pipelines import chat_examples, prepare_text
from beam_pipelines.chat_template import render_ids
from beam_pipelines.records import (MANIFEST_NAME, RECORD_FORMAT, encode_record, field,
                                    manifest_fields)
from maxlm import checkpoint, default_chat, optim, post_training, runs, sharding, steps, tasks
from maxlm import train as train_module
from maxlm.errors import UserError
from maxlm.model import ModelConfig, Transformer, training_flops_per_token
from maxlm.post_training import DPO, SFT
from conftest import TINY_RUN, gin_config, kill_after_step, train_subprocess

CONFIG = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1,
                     head_dim=16, mlp_dim=64, max_seq_len=64)
BOS = 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# --- the losses against NumPy ------------------------------------------------------------------

def test_sft_loss_is_the_mean_cross_entropy_over_hand_picked_supervised_targets():
  logits = np.random.default_rng(0).normal(size=(1, 12, 7)).astype(np.float32)
  # [bos user user reply reply end | bos user reply end | pad pad]; the second conversation's
  # bos is (wrongly) marked supervised: a target across conversations must still not count.
  tokens = np.array([[1, 2, 3, 4, 5, 6, 1, 3, 2, 6, 0, 0]], np.int32)
  segment_ids = np.array([[1] * 6 + [2] * 4 + [0] * 2], np.int32)
  loss_mask = np.array([[0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0]], np.int32)
  positions = np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0]], np.int32)
  predicting = [2, 3, 4, 7, 8]  # positions whose next token is a supervised reply token
  expected = -np.mean([log_softmax(logits[0])[t, tokens[0, t + 1]] for t in predicting])

  model = lambda tokens, positions, segment_ids: (jnp.asarray(logits), None)  # noqa: E731
  batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
           "loss_mask": loss_mask}
  loss, metrics = SFT().loss(model, batch)
  assert float(metrics["target_tokens"]) == len(predicting)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def numpy_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
              loss_type, label_smoothing=0.0):
  """The papers' per-pair losses and the implicit rewards, in float64."""
  chosen_reward = beta * (policy_chosen - reference_chosen)
  rejected_reward = beta * (policy_rejected - reference_rejected)
  h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
  if loss_type == "sigmoid":
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    loss = (-(1 - label_smoothing) * np.log(sigmoid(beta * h))
            - label_smoothing * np.log(sigmoid(-beta * h)))
  else:
    loss = (h - 1.0 / (2.0 * beta)) ** 2
  return loss, chosen_reward, rejected_reward


@pytest.mark.parametrize("loss_type,beta,label_smoothing",
                         [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                          ("ipo", 2.0, 0.0)])
def test_dpo_losses_and_rewards_equal_the_papers_formulas(loss_type, beta, label_smoothing):
  logps = np.random.default_rng(1).uniform(-40, -5, size=(4, 3, 5))
  got = post_training.dpo_losses(*jnp.asarray(logps, jnp.float32), beta, loss_type,
                                 label_smoothing)
  want = numpy_dpo(*logps, beta, loss_type, label_smoothing)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5)
  same = post_training.dpo_losses(*jnp.asarray(logps[[0, 1, 0, 1]], jnp.float32), beta, loss_type,
                                  label_smoothing)
  want_at_equal = np.log(2) if loss_type == "sigmoid" else 1.0 / (2.0 * beta) ** 2
  np.testing.assert_allclose(np.asarray(same[0]), want_at_equal, rtol=1e-6)


def test_an_unknown_loss_type_or_a_nonpositive_beta_is_refused_naming_the_choices():
  with pytest.raises(UserError, match="choose one of sigmoid, ipo"):
    DPO(loss_type="hinge")
  with pytest.raises(UserError, match="must be positive"):
    DPO(beta=0.0)
  with pytest.raises(UserError, match=r"must be in \[0, 0.5\)"):
    DPO(label_smoothing=0.7)



@pytest.mark.parametrize("binding, message", [
    ({"z_loss": -1.0}, "SFT.z_loss=-1.0 must be a number >= 0"),
    ({"router_z_loss": float("nan")}, "SFT.router_z_loss=nan must be a number >= 0"),
    ({"load_balancing_loss": "0.01"}, "SFT.load_balancing_loss='0.01' must be a number >= 0"),
])
def test_a_negative_or_non_numeric_sft_loss_weight_is_refused_naming_it(binding, message):
  # SFT's gin bindings are not among the run's checked ones; a z_loss of -1 trained to -52.
  with pytest.raises(UserError) as error:
    SFT(**binding)
  assert str(error.value).splitlines()[0] == message  # gin appends where it was called

def test_a_bad_dpo_setting_exits_2_with_one_line_before_anything_is_written(tmp_path):
  done = subprocess.run([sys.executable, "-m", "maxlm.train", "--gin_file=dpo_tiny.gin",
                         "--gin_param=DPO.beta=0", f"--workdir={tmp_path / 'run'}",
                         f"--data_dir={tmp_path / 'pairs'}"],
                        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
  assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (
      2, "error: DPO.beta=0 must be positive; 0.1 is the usual value"), done.stderr
  assert "Traceback" not in done.stderr
  assert list(tmp_path.iterdir()) == []


# --- packed pairs ------------------------------------------------------------------------------

def pack(examples: list, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Rows packed by `chat_examples.pack`: an example is an (ids, mask) conversation, or a pair
  {"chosen": (ids, mask), "rejected": (ids, mask)} that becomes one shared-prefix segment."""
  def example(e):
    if isinstance(e, dict):
      return chat_examples.shared_example(*(tokenized(*e[h]) for h in ("chosen", "rejected")))
    return chat_examples.unshared_example(tokenized(*e))
  kind = chat_examples.PREFERENCE if isinstance(examples[0], dict) else chat_examples.SFT
  return [chat_examples.record_arrays(row, kind)
          for row in chat_examples.pack(map(example, examples), seq_len, open_rows=1)]


def tokenized(ids, mask) -> chat_examples.Tokenized:
  return chat_examples.Tokenized(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def random_pair(rng, vocab: int = 64) -> dict:
  """A prompt and two replies; a third of the pairs' replies start with the same tokens."""
  prompt = [BOS, *rng.integers(3, vocab, rng.integers(2, 6))]
  common = list(rng.integers(3, vocab, rng.integers(1, 3))) if rng.random() < 0.34 else []
  def half():
    reply = common + list(rng.integers(3, vocab, rng.integers(1, 5)))
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)
  return {"chosen": half(), "rejected": half()}


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
  return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def alone_logps(model, sequences: list[tuple[list[int], list[int]]], length: int) -> list[float]:
  """Each (ids, mask) sequence in a row of its own from position 0 (causal attention: the
  zeros after it change nothing before them): the NumPy sum of its reply tokens' log-probs."""
  rows = np.zeros((len(sequences), length), np.int32)
  for row, (ids, _) in zip(rows, sequences):
    row[:len(ids)] = ids
  logps = log_softmax(np.asarray(jax.jit(lambda tokens: model(tokens)[0])(rows)))
  return [sum(logps[i, j - 1, ids[j]] for j in range(1, len(ids)) if mask[j])
          for i, (ids, mask) in enumerate(sequences)]


def test_each_token_is_predicted_where_its_own_sequence_has_the_token_before():
  # [bos p p | c c | r r r] [bos p | r] pad: pair 2's chosen reply is all shared (empty
  # continuation), so its rejected reply follows the prefix directly.
  segment_ids = np.array([[1] * 8 + [2] * 3 + [0]])
  positions = np.array([[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 0]])
  branch_ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 2, 0]])
  predecessor, has_one = post_training.predecessors(*map(jnp.asarray, (segment_ids, positions,
                                                                       branch_ids)))
  has_one = np.asarray(has_one)[0]
  assert list(np.flatnonzero(~has_one)) == [0, 8, 11]
  assert list(np.asarray(predecessor)[0][has_one]) == [0, 1, 2, 3, 2, 5, 6, 8, 9]


def test_packed_pairs_have_the_log_probs_of_each_pair_alone_and_dpo_loss_follows():
  rng = np.random.default_rng(2)
  pairs = [random_pair(rng) for _ in range(7)]
  rows = pack(pairs, seq_len=40)
  assert len(rows) < len(pairs) and max(row["segment_ids"].max() for row in rows) >= 3
  batch = stack(rows)
  assert ((batch["branch_ids"] == 0) & (batch["loss_mask"] == 1)).any(), "replies start alike"
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  chosen, rejected, real = jax.jit(lambda b: post_training.pair_logps(model, b))(batch)

  pairs_per_row = batch["segment_ids"].max(axis=1)
  places = [(row, column) for row, count in enumerate(pairs_per_row) for column in range(count)]
  alone = alone_logps(model, [pair[h] for pair in pairs for h in ("chosen", "rejected")], 24)
  expected = {place: alone[2 * k:2 * k + 2] for k, place in enumerate(places)}
  assert len(places) == len(pairs) == int(np.asarray(real).sum())
  for (r, c), (want_chosen, want_rejected) in expected.items():
    np.testing.assert_allclose(float(chosen[r, c]), want_chosen, rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(rejected[r, c]), want_rejected, rtol=0, atol=1e-5)

  # The task's loss: the NumPy DPO loss averaged over the real pairs, nothing from padding.
  reference = rng.uniform(-30, -10, size=(2, *chosen.shape)).astype(np.float32)
  batch |= {"reference_chosen_logps": reference[0], "reference_rejected_logps": reference[1]}
  loss, metrics = jax.jit(lambda b: DPO(beta=0.2).loss(model, b))(batch)
  keys = list(expected)
  policy = np.array([expected[k] for k in keys])
  ref = np.array([[reference[0][k], reference[1][k]] for k in keys])
  losses, chosen_rewards, rejected_rewards = numpy_dpo(policy[:, 0], policy[:, 1], ref[:, 0],
                                                       ref[:, 1], 0.2, "sigmoid")
  np.testing.assert_allclose(float(loss), losses.mean(), rtol=1e-4)
  assert float(metrics["pairs"]) == len(pairs)
  np.testing.assert_allclose(float(metrics["reward_margin_sum"]),
                             (chosen_rewards - rejected_rewards).sum(), rtol=1e-4)
  assert float(metrics["reward_accuracy_sum"]) == (chosen_rewards > rejected_rewards).sum()


def test_dpo_on_a_data_dir_of_the_old_two_halves_layout_says_to_rerun_prepare_chat():
  old_fields = [f"{half}_{name}" for half in ("chosen", "rejected")
                for name in post_training.SFT_FIELDS]
  manifest = {"format": RECORD_FORMAT, "seq_len": 8,
              "fields": manifest_fields(tuple(field(name, np.int32, (8,)) for name in old_fields))}
  with pytest.raises(UserError) as error:
    train_module.check_task_fields(DPO(), manifest, "/data/pairs")
  assert str(error.value) == ("--data_dir /data/pairs holds preference pairs in the old "
                              "two-halves layout; re-run python -m beam_pipelines.prepare_chat "
                              "on its inputs")



@pytest.mark.parametrize("task", [SFT(), tasks.Pretrain()], ids=["SFT", "Pretrain"])
def test_sft_or_pretraining_on_preference_pairs_is_refused_naming_dpo(task):
  manifest = {"format": RECORD_FORMAT, "seq_len": 8, "fields": manifest_fields(tuple(
      field(name, np.int32, (8,)) for name in post_training.PREFERENCE_FIELDS))}
  train_module.check_task_fields(DPO(), manifest, "/data/pairs")
  with pytest.raises(UserError) as error:
    train_module.check_task_fields(task, manifest, "/data/pairs")
  assert str(error.value) == (
      f"--data_dir /data/pairs holds preference pairs (branch_ids), which only the DPO task "
      f"reads, not {type(task).__name__}; train on it with train.task=@DPO() (dpo_tiny.gin), "
      "or prepare SFT rows for SFT")

# --- sharded steps -----------------------------------------------------------------------------

def sft_batch(seed: int, rows: int = 8, seq_len: int = 32) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  conversations = []
  for _ in range(8 * rows):
    prompt, reply = rng.integers(3, 64, rng.integers(2, 6)), rng.integers(3, 64, rng.integers(1, 6))
    conversations.append(([BOS, *prompt, *reply], [0] * (1 + len(prompt)) + [1] * len(reply)))
  return stack(pack(conversations, seq_len)[:rows])


def dpo_batch(seed: int, rows: int = 8, seq_len: int = 32) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return stack(pack([random_pair(rng) for _ in range(8 * rows)], seq_len)[:rows])


@functools.cache
def initial_params() -> dict:
  return nnx.to_pure_dict(nnx.state(Transformer(CONFIG, rngs=nnx.Rngs(0))))


def run_steps(task, make_batch, mesh_shape, microbatches=1, num_steps=2):
  """Losses and step metrics of `num_steps` train steps of `task` on a mesh of that shape;
  the reference model (DPO's) is the starting parameters."""
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, 1e-2, warmup_steps=0))
  graphdef, abstract_state = steps.abstract_model(CONFIG)
  shardings = steps.state_shardings(abstract_state, optimizer, mesh)
  state = steps.train_state_from_params(jax.device_put(initial_params(), shardings.params),
                                        optimizer, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  task = task.bind(tasks.TaskContext(
      graphdef, shardings.params, batch_sharding, mesh,
      reference_params=lambda: jax.device_put(initial_params(), shardings.params)))
  train_step = steps.make_train_step(graphdef, task.loss, optimizer, shardings, batch_sharding,
                                     microbatches)
  results = []
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      batch = {k: jax.device_put(v, batch_sharding) for k, v in make_batch(seed=i).items()}
      state, metrics = train_step(state, task.prepare_batch(batch))
      results.append({"loss": float(metrics["loss"]), **task.train_scalars(metrics)})
  return results


@pytest.mark.parametrize("task,make_batch", [(SFT(), sft_batch), (DPO(), dpo_batch)],
                         ids=["sft", "dpo"])
def test_task_steps_on_a_2x2x2_mesh_match_one_device(task, make_batch):
  """Two microbatches on the mesh: the sharded step and the accumulation both match."""
  one = run_steps(task, make_batch, (1, 1, 1))
  sharded = run_steps(task, make_batch, (2, 2, 2), microbatches=2)
  if isinstance(task, DPO):  # step 1: the policy is the reference, every reward is 0
    assert one[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert one[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    del one[0]["reward_accuracy"], sharded[0]["reward_accuracy"]  # rounding decides it at 0
  for got_step, want_step in zip(sharded, one, strict=True):
    assert got_step.keys() == want_step.keys()
    for name, want in want_step.items():
      np.testing.assert_allclose(got_step[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


# --- whole runs: pretrain -> SFT -> DPO, and resume after SIGKILL ------------------------------

TINY_BINDINGS = TINY_RUN + """
train.eval_every = 8
train.log_every = 1
"""
RUN_STEPS = 12
DPO_STEPS = 20  # a 64-token row holds ~1.5 prompt-shared pairs more than two halves did
# The run bindings of each stage (gin lines, so a subprocess gets the very same run).
STAGES = {
    "sft": ["train.task = @SFT()", "train.sample_prompt = None",
            "learning_rate_schedule.peak_learning_rate = 3e-3"],
    "dpo": ["train.task = @DPO()", "DPO.beta = 0.5", "train.sample_prompt = None",
            "learning_rate_schedule.peak_learning_rate = 3e-3"],
}
WORDS = ("def", "return", "import", "class", "self", "None", "True", "False", "while",
         "lambda", "yield", "print", "list", "dict", "value", "index")


def gin_bindings(*lines: str):
  return gin_config(TINY_BINDINGS + "\n".join(lines))


def metric_rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(pretraining data dir, run dir) of a few pretraining steps on some stdlib modules. Not
  conftest's tiny_run: the SFT and DPO thresholds below were measured from this start."""
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  data_dir = tmp_path_factory.mktemp("text")
  prepare_text.run([str(stdlib / name) for name in ("textwrap.py", "string.py", "heapq.py")],
                   str(data_dir), vocab_size=400, seq_len=64, validation_fraction=0.2)
  run = tmp_path_factory.mktemp("pretrain")
  with gin_bindings("train.sample_prompt = None",  # the schedule's default rate, not TINY_RUN's
                    "learning_rate_schedule.peak_learning_rate = 3e-4"):
    train_module.train(workdir=str(run), data_dir=str(data_dir), steps=2)
  return data_dir, run


def chat_example(sp, messages: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
  """[bos] + the rendered conversation, and its loss mask."""
  ids, assistant = render_ids(messages, sp)
  return [sp.bos_id(), *ids], [0, *assistant]


def write_chat_dir(root: Path, text_dir: Path, examples: dict[str, list[dict]], kind: str,
                   seq_len: int = 64) -> str:
  """A v2 data dir of packed `examples` per split, with the text dir's tokenizer."""
  text_manifest = json.loads((text_dir / MANIFEST_NAME).read_text())
  splits, fields = {}, None
  for split, split_examples in examples.items():
    rows = pack(split_examples, seq_len)
    fields = tuple(field(name, np.int32, (seq_len,)) for name in rows[0])
    shard = f"{split}-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(root / shard), "group_size:1")
    for row in rows:
      writer.write(encode_record(row, fields))
    writer.close()
    splits[split] = {"sequences": len(rows), "shards": [shard]}
  manifest = {"format": RECORD_FORMAT, "kind": kind, "seq_len": seq_len,
              "fields": manifest_fields(fields), "tokenizer": text_manifest["tokenizer"],
              "splits": splits}
  (root / MANIFEST_NAME).write_text(json.dumps(manifest))
  shutil.copy(text_dir / text_manifest["tokenizer"]["file"], root)
  return str(root)


@pytest.fixture(scope="module")
def chat_dirs(pretrained, tmp_path_factory):
  """(SFT dir, preference dir): reply with the word asked for; prefer it to another word."""
  text_dir, _ = pretrained
  sp = spm.SentencePieceProcessor(model_file=str(text_dir / "tokenizer.model"))
  rng = np.random.default_rng(0)
  def sft(count):
    return [chat_example(sp, [("user", f"say {word}"), ("assistant", f"{word} {word}")])
            for word in rng.choice(WORDS, count)]
  def preferences(count):
    examples = []
    for word, other in rng.choice(WORDS, (count, 2)):
      other = other if other != word else WORDS[(WORDS.index(word) + 1) % len(WORDS)]
      prompt = [("user", f"say {word}")]
      examples.append({"chosen": chat_example(sp, prompt + [("assistant", word)]),
                       "rejected": chat_example(sp, prompt + [("assistant", other)])})
    return examples
  sft_dir = write_chat_dir(tmp_path_factory.mktemp("sft"), text_dir,
                           {"train": sft(200), "validation": sft(40)}, "sft")
  preference_dir = write_chat_dir(tmp_path_factory.mktemp("preference"), text_dir,
                                  {"train": preferences(200), "validation": preferences(40)},
                                  "preference")
  return sft_dir, preference_dir


def train_stage(stage: str, workdir, data_dir, init_from, steps: int = RUN_STEPS) -> dict:
  with gin_bindings(*STAGES[stage]):
    return train_module.train(workdir=str(workdir), data_dir=data_dir, steps=steps,
                              init_from=str(init_from))


@pytest.fixture(scope="module")
def sft_run(pretrained, chat_dirs, tmp_path_factory):
  run = tmp_path_factory.mktemp("sft_run")
  return run, train_stage("sft", run, chat_dirs[0], pretrained[1])


@pytest.fixture(scope="module")
def dpo_run(sft_run, chat_dirs, tmp_path_factory):
  """(run dir, summary, how many times the run read parameters of its --init_from run)."""
  run = tmp_path_factory.mktemp("dpo_run")
  reads = []
  def counted(run_dir, *args, **kwargs):
    reads.append(Path(run_dir).resolve())
    return restore_params(run_dir, *args, **kwargs)
  restore_params = runs.restore_params
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(runs, "restore_params", counted)
    summary = train_stage("dpo", run, chat_dirs[1], sft_run[0], steps=DPO_STEPS)
  return run, summary, reads.count(Path(sft_run[0]).resolve())


def test_sft_from_a_pretrain_run_lowers_the_loss_on_the_replies(sft_run):
  run, summary = sft_run
  rows = metric_rows(run)
  losses = [row["loss"] for row in rows]
  assert [row["step"] for row in rows] == list(range(1, RUN_STEPS + 1))
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
  assert summary["eval_loss"] == rows[-1]["eval_loss"] < rows[7]["eval_loss"]


def test_dpo_from_the_sft_run_learns_the_preferences(dpo_run):
  run, summary, _ = dpo_run
  rows = metric_rows(run)
  assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)  # the policy is the reference
  assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
  assert {"reward_chosen", "reward_rejected", "reward_accuracy"} <= set(rows[0])
  assert summary["eval_reward_accuracy"] == rows[-1]["eval_reward_accuracy"] >= 0.9
  assert rows[-1]["eval_reward_margin"] > 0 and rows[-1]["reward_margin"] > rows[0]["reward_margin"]


def test_a_dpo_run_reads_its_starting_parameters_once_for_the_policy_and_the_reference(
    dpo_run):
  assert dpo_run[2] == 1


def test_dpo_throughput_counts_a_rows_tokens_once_and_the_reference_forward(dpo_run):
  seq_len = 64  # write_chat_dir's
  batch = dpo_batch(0, rows=8, seq_len=seq_len)
  trained = batch["tokens"].size
  tokens, flops = DPO().step_cost(CONFIG, seq_len)
  per_token = training_flops_per_token(CONFIG, seq_len)  # forward + backward: 3 forwards' worth
  assert 8 * tokens == trained
  assert 8 * flops == pytest.approx(trained * per_token + trained * per_token / 3, rel=1e-12)
  assert SFT().step_cost(CONFIG, seq_len) == (seq_len, seq_len * per_token)
  # The loop's scalars: FLOPs per token counted = a training token's plus a reference forward's.
  run, _, _ = dpo_run
  _, meta = checkpoint.read_meta(run)
  run_per_token = training_flops_per_token(checkpoint.config_from_meta(meta), seq_len)
  for row in metric_rows(run):
    assert row["model_flops_per_s"] / row["tokens_per_s"] == pytest.approx(4 / 3 * run_per_token)


def train_process(stage: str, workdir, data_dir, init_from, steps: int) -> subprocess.Popen:
  """`python -m maxlm.train` with the test's bindings and a checkpoint after every step."""
  return train_subprocess(workdir, data_dir, [*TINY_BINDINGS.strip().splitlines(), *STAGES[stage]],
                          f"--init_from={init_from}", f"--steps={steps}", "--checkpoint_every=1")


# SFT resumes through the same loop as pretraining (tests/test_train.py kills one too); DPO
# adds the reference model, reloaded from --init_from on resume.
@pytest.mark.parametrize("stage", [pytest.param("sft", marks=pytest.mark.slow), "dpo"])
def test_a_run_killed_midway_and_rerun_gives_the_uninterrupted_metrics_bitwise(
    stage, request, chat_dirs, tmp_path):
  """SIGKILL after step 5, then the same run again: every loss, reward and eval scalar equals
  the uninterrupted run's. DPO's source run trains on in between: the resumed run's reference
  is still the source checkpoint it started from, which its meta records."""
  uninterrupted = request.getfixturevalue(f"{stage}_run")[0]
  if stage == "sft":
    init_from, data_dir = request.getfixturevalue("pretrained")[1], chat_dirs[0]
  else:
    init_from, data_dir = tmp_path / "source", chat_dirs[1]
    shutil.copytree(request.getfixturevalue("sft_run")[0], init_from)
  run, steps = tmp_path / "run", DPO_STEPS if stage == "dpo" else RUN_STEPS
  kill_after_step(train_process(stage, run, data_dir, init_from, steps), 5)
  if stage == "dpo":
    train_stage("sft", init_from, chat_dirs[0], request.getfixturevalue("pretrained")[1],
                steps=RUN_STEPS + 2)
    assert checkpoint.read_meta(init_from)[0] == RUN_STEPS + 2
    assert checkpoint.read_meta(run)[1]["init_from_step"] == RUN_STEPS
  train_stage(stage, run, data_dir, init_from, steps)
  assert learned(metric_rows(run)) == learned(metric_rows(uninterrupted))


def learned(rows: list[dict]) -> list[dict]:
  """What a run computed, per step, without its timings."""
  computed = ("step", "loss", "grad_norm", "learning_rate")
  return [{k: v for k, v in row.items() if k in computed or k.startswith(("eval_", "reward_"))}
          for row in rows]


@pytest.mark.parametrize("gin_file,kind,source", [("sft_tiny.gin", "sft", "tiny.gin"),
                                                   ("dpo_tiny.gin", "preference", "sft_tiny.gin")])
def test_a_stage_config_defaults_to_the_embedded_set_and_the_run_the_stage_before_writes(
    gin_file, kind, source):
  gin.clear_config()
  try:
    gin.parse_config_file(train_module.resolve_gin_file(gin_file))
    assert gin.query_parameter("train.init_from") == train_module.default_workdir(source)
    data_dir = gin.query_parameter("train.data_dir")
    assert data_dir.configurable.wrapper is default_chat.ensure_default_chat
    assert not data_dir.evaluate, "built only when train calls it, after checking init_from"
    assert gin.query_parameter("ensure_default_chat.kind") == kind
  finally:
    gin.clear_config()


def test_dpo_with_no_sft_run_yet_exits_2_with_one_line_naming_the_sft_command(tmp_path):
  env = {**os.environ, "MAXLM_CACHE": str(tmp_path / "cache"),
         "PYTHONPATH": str(Path(__file__).parent.parent)}
  done = subprocess.run([sys.executable, "-m", "maxlm.train", "--gin_file=dpo_tiny.gin"],
                        check=False,
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
  assert done.returncode == 2, done.stdout + done.stderr
  errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
  assert errors == [("error: --init_from runs/sft_tiny does not exist yet; train it first: "
                     "python -m maxlm.train --gin_file=sft_tiny.gin")], done.stderr
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "cache").exists(), "no data is built for a run that cannot start"


@pytest.mark.parametrize("gin_file,task", [("sft_tiny.gin", SFT), ("dpo_tiny.gin", DPO)])
def test_the_stage_configs_pick_their_task_and_keep_the_tiny_models_shape(gin_file, task):
  def model_of(name):
    gin.clear_config()
    gin.parse_config_file(train_module.resolve_gin_file(name))
    return ModelConfig(), gin.query_parameter("make_mesh.fsdp")
  try:
    tiny = model_of("tiny.gin")
    assert model_of(gin_file) == tiny
    assert isinstance(gin.query_parameter("train.task").scoped_configurable_fn(), task)
  finally:
    gin.clear_config()


@pytest.mark.parametrize("reference_from, warned", [(None, True), ("runs/sft_tiny", False)])
def test_dpo_from_no_init_from_warns_its_reference_is_the_random_initialization(
    caplog, reference_from, warned):
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, abstract_state = steps.abstract_model(CONFIG)
  param_shardings = sharding.param_shardings(abstract_state, mesh)
  with caplog.at_level(logging.WARNING, logger="maxlm.post_training"):
    post_training.DPO().bind(tasks.TaskContext(
        graphdef, param_shardings, sharding.batch_sharding(mesh), mesh,
        reference_params=lambda: jax.device_put(initial_params(), param_shardings),
        reference_from=reference_from))
  assert any("random initialization (no train.init_from)" in r.getMessage()
             for r in caplog.records) == warned
