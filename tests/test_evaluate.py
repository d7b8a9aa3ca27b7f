"""maxlm.evaluate and maxlm.evals over a tiny random-init run dir: bits per byte against a hand
computation, multiple-choice accuracy against a NumPy log-likelihood reference, generation
against the engine's decoder without a cache, the --fail_below exit codes, mistakes refused in
one line before the model loads, progress lines, and lm-evaluation-harness's
`local-completions` against serving.server agreeing with all of it."""

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
import uvicorn
from flax import nnx
from test_serving import CONTEXT, completion_text, random_run

from maxlm import checkpoint, evaluate
from maxlm import progress as console
from maxlm.evals import multiple_choice, perplexity, progress, report, scoring
from maxlm.evals.multiple_choice import MultipleChoice
from maxlm.evals.perplexity import Perplexity
from serving.chat import CHAT_STOPS, chat_prompt
from serving.engine import Engine
from serving.server import create_app

REPO_ROOT = Path(__file__).resolve().parents[1]
ITEMS = [
    {"context": "def wrap(text, width=70):", "choices": ["return", "import", "width"], "gold": 0},
    {"context": "The text", "choices": ["wrapper", "is long", "x"], "gold": 1},
    {"context": "", "choices": ["def", "class"], "gold": 1},
    {"context": "indent =  ", "choices": ["4", "' '", "None"], "gold": 2},
    {"context": "lines</s>", "choices": ["a", "b"], "gold": 0},
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  return random_run(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(run_dir) -> Engine:
  return Engine.from_checkpoint(run_dir, slots=2)


@pytest.fixture(scope="module")
def model(engine) -> scoring.EvalModel:
  return scoring.EvalModel(engine.graphdef, engine.params, engine.tokenizer,
                           engine.context_length, batch_size=4)


@pytest.fixture(scope="module")
def items_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("mc") / "tiny_mc.jsonl"
  path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
  return path


def numpy_logprobs(engine: Engine, token_ids: list[int]) -> np.ndarray:
  """float64 [len - 1]: log p(token t | tokens before), from one unpadded forward pass."""
  logits, _ = nnx.merge(engine.graphdef, engine.params)(np.array([token_ids], np.int32))
  logits = np.asarray(logits[0, :-1], np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logits[np.arange(len(token_ids) - 1), token_ids[1:]] - log_z


# --- perplexity and bits per byte --------------------------------------------------------------

def test_bits_per_byte_of_a_text_file_is_its_summed_nll_in_bits_over_its_bytes(engine, model,
                                                                               tmp_path):
  text = "def wrap(text, width=70):\n    return text  # é"
  (tmp_path / "held_out.txt").write_text(text, encoding="utf-8")
  scalars, _ = Perplexity(str(tmp_path / "*.txt")).run(model)
  ids = [engine.tokenizer.bos_id()] + engine.tokenizer.encode(text)
  assert len(ids) <= CONTEXT
  nll = -numpy_logprobs(engine, ids).sum()
  assert scalars["bytes"] == len(text.encode("utf-8")) == len(text) + 1
  np.testing.assert_allclose(scalars["bits_per_byte"], nll / math.log(2) / scalars["bytes"],
                             rtol=1e-5)
  np.testing.assert_allclose(scalars["perplexity"], math.exp(nll / (len(ids) - 1)), rtol=1e-5)


def test_a_text_longer_than_the_context_is_scored_in_windows_that_predict_each_token_once():
  ids = list(range(100))
  windows = perplexity.windows(ids, 16)
  assert all(len(w) <= 16 for w in windows)
  predicted = [token for window in windows for token in window[1:]]
  assert predicted == ids[1:]


def test_a_data_dir_splits_bytes_are_the_predicted_tokens_pieces():
  lengths = np.array([0, 0, 0, 3, 5, 1, 2])  # ids 0-2: pad, bos, eos (controls)
  batch = {"tokens": np.array([[1, 3, 4, 2, 1, 5, 0], [1, 6, 6, 6, 2, 0, 0]]),
           "segment_ids": np.array([[1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]])}
  # row 0 predicts 3, 4, eos and (second document) 5; row 1 predicts 6, 6, 6, eos
  assert perplexity.target_bytes(batch, lengths) == 3 + 5 + 1 + 2 * 3


# --- multiple choice ---------------------------------------------------------------------------

def test_multiple_choice_acc_and_acc_norm_match_a_numpy_loglikelihood_reference(engine, model,
                                                                             items_file):
  scalars, per_item = MultipleChoice(str(items_file)).run(model)
  tokenizer, correct, correct_norm = engine.tokenizer, 0, 0
  for item, result in zip(ITEMS, per_item):
    expected = []
    for choice in item["choices"]:
      context, continuation = item["context"], " " + choice
      if context.endswith(" "):  # lm-eval moves trailing spaces to the continuation
        context, continuation = "indent =", "  " + continuation
      if context == "lines</s>":
        context_ids = tokenizer.encode("lines") + [tokenizer.eos_id()]
        whole = context_ids + tokenizer.encode(continuation)
      elif context:
        context_ids = tokenizer.encode(context)
        whole = tokenizer.encode(context + continuation)
      else:
        context_ids = [tokenizer.bos_id()]
        whole = context_ids + tokenizer.encode(continuation)
      expected.append(numpy_logprobs(engine, whole)[len(context_ids) - 1:].sum())
    np.testing.assert_allclose(result["loglikelihoods"], expected, atol=1e-4)
    lengths = np.array([len(choice) for choice in item["choices"]])
    correct += int(np.argmax(expected)) == item["gold"]
    correct_norm += int(np.argmax(np.array(expected) / lengths)) == item["gold"]
  assert scalars == {"acc": correct / len(ITEMS), "acc_norm": correct_norm / len(ITEMS),
                     "items": len(ITEMS)}


def test_a_gold_index_past_the_choices_is_one_line_naming_the_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"context": "x", "choices": ["a"], "gold": 3}) + "\n")
  with pytest.raises(evaluate.UserError, match="bad.jsonl:1: gold=3"):
    multiple_choice.read_items(path)


# --- the command line: outputs, generation and gates -------------------------------------------

def test_fail_below_exits_1_below_the_gate_and_0_at_it(run_dir, items_file, tmp_path, engine):
  common = [f"--checkpoint_dir={run_dir}", f"--tasks=mc=choice:{items_file}",
            f"--output_dir={tmp_path}"]
  assert evaluate.main(common + ["--fail_below=mc:acc=1.01"]) == 1
  results = json.loads((tmp_path / "results.json").read_text())
  acc = results["results"]["mc"]["acc"]
  assert evaluate.main(common + [f"--fail_below=mc:acc={acc}"]) == 0
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert evaluate.main(common + ["--fail_below=mc:bleu=0.1"]) == 2  # names no result
  assert evaluate.main(common + ["--fail_below=mc:acc"]) == 2
  assert results["step"] == checkpoint.read_meta(run_dir)[0]


def test_generation_exact_match_agrees_with_the_decoder_without_a_cache(run_dir, engine,
                                                                         tmp_path):
  prompts = ["def wrap(", "text = ", "width"]
  references = []
  for prompt in prompts:
    prompt_ids = engine.encode(prompt)
    new = engine.greedy_decode_without_cache(prompt_ids, 4)
    references.append(completion_text(engine, prompt_ids, new))
  targets = [references[0].strip(), "no such answer", references[2].strip()]
  path = tmp_path / "gen.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                          for p, t in zip(prompts, targets)))
  args = [f"--checkpoint_dir={run_dir}", f"--tasks=generate:{path}", "--max_tokens=4",
          f"--output_dir={tmp_path / 'out'}"]
  assert evaluate.main(args) == 0
  output = json.loads((tmp_path / "out" / "results.json").read_text())
  completions = [item["completion"] for item in output["items"]["gen"]]
  expected = [r.split("\n")[0] for r in references]  # the default stop is a newline
  assert completions == expected
  matches = [c.strip() == t for c, t in zip(expected, targets)]
  assert output["results"]["gen"]["exact_match"] == sum(matches) / 3


def test_a_gate_is_parsed_and_a_nan_result_fails_it():
  gate = report.parse_gate("arc:acc_norm=0.25")
  assert (gate.task, gate.metric, gate.minimum) == ("arc", "acc_norm", 0.25)
  assert report.failed_gates({"arc": {"acc_norm": float("nan")}}, [gate])
  assert not report.failed_gates({"arc": {"acc_norm": 0.25}}, [gate])


# --- mistakes: one line and exit 2, before the model loads -----------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--tasks=choice:{tmp}/nope.jsonl"], "{tmp}/nope.jsonl does not exist; pass an existing"),
    (["--tasks=choice:{tmp}/latin1.jsonl"], "{tmp}/latin1.jsonl:2 is not UTF-8 (byte 0xe9)"),
    (["--tasks=perplexity:{tmp}/latin1.txt"], "{tmp}/latin1.txt:1 is not UTF-8 (byte 0xe9)"),
    (["--tasks=perplexity:{tmp}"], "perplexity path {tmp} is a directory without manifest"),
    (["--tasks=choice:{items}", "--batch_size=0"], "--batch_size=0; pass 1 or more"),
    (["--tasks=choice:{items}", "--limit=0"], "--limit=0; pass 1 or more, or leave --limit out"),
    (["--tasks=choice:{items}", "--limit=-2"], "--limit=-2; pass 1 or more"),
    (["--tasks=choice:{items}", "--output_dir={items}"], "--output_dir {items} is not a directory"),
    (["--tasks=mc=choice:{items}", "--fail_below=other:acc=0.3"],
     "--fail_below=other:acc=0.3 names no result; there are mc:acc, mc:acc_norm, mc:items"),
    (["--tasks=mc=choice:{items}", "--fail_below=mc:bleu=0.3"], "mc:bleu=0.3 names no result"),
    (["--tasks=a=choice:{items},a=perplexity:{items}"], "two eval tasks share a name"),
])
def test_a_mistake_in_the_flags_or_inputs_is_one_line_and_exit_2_before_the_model_loads(
    flags, message, items_file, tmp_path, capsys):
  """The checkpoint dir does not exist: a mistake caught only after loading would name it."""
  (tmp_path / "latin1.jsonl").write_bytes(
      json.dumps(ITEMS[0]).encode() + b"\n" + b'{"context": "caf\xe9", "choices": ["a"], '
      b'"gold": 0}\n')
  (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
  fill = {"tmp": tmp_path, "items": items_file}
  code = evaluate.main([f"--checkpoint_dir={tmp_path}/no_run", "--compilation_cache_dir=",
                        f"--output_dir={tmp_path / 'out'}",
                        *(flag.format(**fill) for flag in flags)])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert message.format(**fill) in err
  assert not (tmp_path / "out").exists()


def test_a_gate_that_names_no_result_after_the_run_still_leaves_results_and_table(
    run_dir, items_file, tmp_path, capsys, monkeypatch):
  """Gates are checked against each kind's metrics up front; should a task not report one of
  them after all, the results are written and printed before the gate is refused."""
  monkeypatch.setattr(MultipleChoice, "metrics", ("acc", "acc_norm", "items", "bleu"),
                      raising=False)
  code = evaluate.main([f"--checkpoint_dir={run_dir}", f"--tasks=mc=choice:{items_file}",
                        f"--output_dir={tmp_path}", "--compilation_cache_dir=",
                        "--fail_below=mc:bleu=0.1"])
  captured = capsys.readouterr()
  assert code == 2
  assert "error: --fail_below=mc:bleu=0.1 names no result; there are mc:acc" in captured.err
  results = json.loads((tmp_path / "results.json").read_text())["results"]
  assert set(results["mc"]) == {"acc", "acc_norm", "items"}
  assert "acc_norm" in captured.out


def test_help_describes_the_command_and_its_task_kinds(capsys):
  with pytest.raises(SystemExit):
    evaluate.parse_args(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert ("Evaluates a checkpoint: perplexity and bits per byte, multiple-choice log-likelihood, "
          "and generation scored by exact match.") in text
  assert 'choice JSONL of {"context": str, "choices": [str], "gold": int}' in text


# --- progress and the table --------------------------------------------------------------------

def test_every_kind_of_task_reports_its_progress_to_stderr(run_dir, engine, items_file, tmp_path,
                                                          capsys, monkeypatch):
  monkeypatch.setattr(console, "EVERY_S", 0.0)  # a line per report, not one every 5 s
  text = "def wrap(text, width=70):\n    return text\n" * 12
  (tmp_path / "held.txt").write_text(text)
  prompts = tmp_path / "gen.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n"
                             for p in ("def wrap(", "text = ", "width")))
  code = evaluate.main([f"--checkpoint_dir={run_dir}", "--compilation_cache_dir=",
                        f"--tasks=mc=choice:{items_file},held=perplexity:{tmp_path}/held.txt",
                        f"--tasks=gen=generate:{prompts}", "--max_tokens=2",
                        f"--output_dir={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert code == 0
  choices = sum(len(item["choices"]) for item in ITEMS)
  windows = len(perplexity.windows([engine.tokenizer.bos_id()] + engine.tokenizer.encode(text),
                                   CONTEXT))
  assert windows > 1
  assert f"mc: {choices}/{choices} choices [100%] elapsed " in err
  assert f"held: {windows}/{windows} windows [100%] elapsed " in err
  assert "gen: 3/3 prompts [100%] elapsed " in err


def test_progress_prints_every_few_seconds_and_the_end_of_work_that_printed():
  now, stream = [0.0], io.StringIO()
  report_to = console.ConsoleProgress("arc", every_s=5.0, stream=stream, clock=lambda: now[0])
  for now[0], done in [(1, 100), (4, 400), (6, 600), (8, 800), (12, 1200), (13, 1300)]:
    report_to(done, 1300, "choices")
  assert stream.getvalue().splitlines() == [
      "arc: 600/1,300 choices [46%] elapsed 6s ETA 7s",  # 6 s for 600: 7 s for 700 more
      "arc: 1,200/1,300 choices [92%] elapsed 12s ETA 1s",
      "arc: 1,300/1,300 choices [100%] elapsed 13s ETA 0s"]
  quick = io.StringIO()
  report_to = console.ConsoleProgress("mc", stream=quick, clock=lambda: now[0])
  now[0] += 2
  report_to(5, 5, "choices")
  unknown_total = io.StringIO()
  console.ConsoleProgress("held", every_s=0, stream=unknown_total)(12, None, "batches")
  assert quick.getvalue() == ""
  assert unknown_total.getvalue().startswith("held: 12 batches elapsed ")


def test_scoring_tells_progress_of_every_sequence_once_on_either_path(engine, model):
  sequences = [engine.encode("def wrap(text, width=70):" + ending)
               for ending in (" return", " pass", "\n    x = 1")] + [engine.encode("import os")]
  for each in (model, dataclasses.replace(model, kv_cache_dtype="int8", batch_size=2)):
    counts = []
    scoring.score(each, sequences, scored=counts.append)
    assert sum(counts) == len(sequences) and counts and all(counts)


def test_the_table_writes_counts_with_thousands_separators():
  text = report.table({"held": {"bits_per_byte": 1.4569415, "tokens": 55859.0,
                                "bytes": 192638.0},
                       "mc": {"acc": 0.4, "items": 10042}})
  assert [line.split() for line in text.splitlines()[2:]] == [
      ["held", "bits_per_byte", "1.45694"], ["held", "tokens", "55,859"],
      ["held", "bytes", "192,638"], ["mc", "acc", "0.4"], ["mc", "items", "10,042"]]


# --- lm-evaluation-harness against serving.server ----------------------------------------------

LM_EVAL_TASK = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def served(engine):
  """serving.server's app for `engine` on a local port, in this process."""
  port = portpicker.pick_unused_port()
  server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name="tiny"), host="127.0.0.1",
                                         port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started and time.monotonic() < deadline:
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}"
  server.should_exit = True
  thread.join(timeout=10)


def test_lm_eval_local_completions_gives_maxlm_evaluates_loglikelihoods_and_accuracy(
    served, model, items_file, tmp_path):
  pytest.importorskip("lm_eval")
  tasks_dir = tmp_path / "tasks"
  tasks_dir.mkdir()
  (tasks_dir / "tiny_mc.yaml").write_text(LM_EVAL_TASK.format(items=items_file))
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
  command = [
      sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
      f"model=tiny,base_url={served}/v1/completions,tokenizer_backend=remote,"
      f"max_length={CONTEXT}", "--batch_size", "3",  # 3 token-id prompts per request
      "--tasks", "tiny_mc", "--include_path", str(tasks_dir), "--output_path",
      str(tmp_path / "out"), "--log_samples"]
  finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240, check=False)
  assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
  [samples_file] = (tmp_path / "out").rglob("samples_tiny_mc_*.jsonl")
  samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()),
                   key=lambda sample: sample["doc_id"])
  scalars, per_item = MultipleChoice(str(items_file)).run(model)
  assert len(samples) == len(ITEMS)
  for sample, ours in zip(samples, per_item):
    theirs = [float(response[0][0]) for response in sample["resps"]]
    # Within 1e-5, plus float32's rounding: the server packs prompts in one row and the
    # in-process scorer an item's choices in another, and on an AVX2-only host the two layouts
    # round the per-token log-probs apart by up to 1.7e-5 over a choice summing to -55.8 (4.5
    # float32 units in its last place); a mapping or offset error moves a sum by whole nats.
    np.testing.assert_allclose(theirs, ours["loglikelihoods"], atol=1e-5, rtol=1e-6)
    assert sample["acc"] == float(ours["pick"] == ours["gold"])
    assert sample["acc_norm"] == float(ours["pick_norm"] == ours["gold"])
  [results_file] = (tmp_path / "out").rglob("results_*.json")
  lm_eval_results = json.loads(results_file.read_text())["results"]["tiny_mc"]
  assert lm_eval_results["acc,none"] == scalars["acc"]
  assert lm_eval_results["acc_norm,none"] == scalars["acc_norm"]


LM_EVAL_CHAT_TASK = """\
task: tiny_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow  # 23 s; the local-completions test stays in the default run
def test_lm_eval_local_chat_completions_generates_what_the_engine_decodes(served, engine,
                                                                         tmp_path):
  pytest.importorskip("lm_eval")
  prompts = ["def wrap(", "width"]
  items = tmp_path / "chat.jsonl"
  items.write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in prompts))
  tasks_dir = tmp_path / "tasks"
  tasks_dir.mkdir()
  (tasks_dir / "tiny_chat.yaml").write_text(LM_EVAL_CHAT_TASK.format(items=items))
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
  command = [
      sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args",
      f"model=tiny,base_url={served}/v1/chat/completions", "--apply_chat_template",
      "--tasks", "tiny_chat", "--include_path", str(tasks_dir), "--output_path",
      str(tmp_path / "out"), "--log_samples"]
  finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240, check=False)
  assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
  [samples_file] = (tmp_path / "out").rglob("samples_tiny_chat_*.jsonl")
  samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()),
                   key=lambda sample: sample["doc_id"])
  for prompt, sample in zip(prompts, samples):
    prompt_ids = engine.encode(chat_prompt([("user", prompt)]))
    text = completion_text(engine, prompt_ids, engine.greedy_decode_without_cache(prompt_ids, 4))
    for stop in CHAT_STOPS + ["\n"]:
      text = text.split(stop)[0]
    assert sample["resps"][0][0] == text


# --- inside training ---------------------------------------------------------------------------

@pytest.mark.slow  # 28 s: trains a run, then evaluates it twice
def test_train_evals_report_what_maxlm_evaluate_gives_on_the_same_checkpoint(items_file,
                                                                            tmp_path):
  import gin  # noqa: PLC0415
  from beam_pipelines import prepare_text  # noqa: PLC0415
  from maxlm import train as train_module  # noqa: PLC0415
  data_dir = tmp_path / "data"
  stdlib = Path(textwrap.__file__).parent
  prepare_text.run([str(stdlib / "textwrap.py"), str(stdlib / "string.py")], str(data_dir),
                   vocab_size=400, seq_len=32, validation_fraction=0.2)
  workdir = tmp_path / "run"
  gin.clear_config()
  try:
    gin.parse_config(f"""
        ModelConfig.num_layers = 1
        ModelConfig.embed_dim = 32
        ModelConfig.num_heads = 2
        ModelConfig.num_kv_heads = 1
        ModelConfig.head_dim = 16
        ModelConfig.mlp_dim = 64
        ModelConfig.max_seq_len = 64
        train.global_batch_size = 8
        train.sample_prompt = None
        train.eval_batches = 1
        train.evals = [@MultipleChoice(), @Perplexity()]
        MultipleChoice.path = '{items_file}'
        Perplexity.path = '{data_dir}'
        Perplexity.name = 'held_out'
        """)
    train_module.train(workdir=str(workdir), data_dir=str(data_dir), steps=2)
  finally:
    gin.clear_config()
  last = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
  assert evaluate.main([f"--checkpoint_dir={workdir}", f"--tasks=choice:{items_file}",
                        f"--tasks=held_out=perplexity:{data_dir}",
                        f"--output_dir={tmp_path / 'out'}"]) == 0
  results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
  assert last["evals/tiny_mc/acc"] == results["tiny_mc"]["acc"]
  np.testing.assert_allclose(last["evals/held_out/bits_per_byte"],
                             results["held_out"]["bits_per_byte"], rtol=1e-4)


def test_blockwise_next_token_scores_equal_a_float64_log_softmax_and_first_argmax():
  """Rows and positions that do not fill the last block, and ties for the largest logit:
  the target's log-probability is NumPy's float64 log-softmax's, and a target is the argmax
  only where it is the first index of the largest logit (as argmax picks)."""
  rng = np.random.default_rng(0)
  rows, seq, embed, vocab = 3, 29, 8, 50  # 87 positions: one full block of 64 and a part
  hidden = rng.standard_normal((rows, seq, embed)).astype(np.float32)
  kernel = rng.standard_normal((embed, vocab)).astype(np.float32)
  kernel[:, 7] = kernel[:, 3]  # tokens 3 and 7 always tie
  logits = (hidden.astype(np.float64) @ kernel.astype(np.float64))
  targets = rng.integers(0, vocab, (rows, seq))
  targets[0, :] = logits[0].argmax(-1)  # a row of argmax targets
  targets[1, :5] = 7  # the second of a tie: never the argmax
  target, greedy = scoring.blockwise_next_token_scores(
      lambda x: jnp.asarray(x) @ jnp.asarray(kernel), jnp.asarray(hidden), jnp.asarray(targets))
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  expected = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(target), expected, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1) == targets)
  assert np.asarray(greedy)[0].all() and not np.asarray(greedy)[1, :5].any()


def test_sequences_that_differ_only_in_their_last_token_score_as_each_alone(engine, model):
  """MMLU's shape: one context, one-token choices. They run as one row whose final
  distribution gives each choice's last log-probability; every entry equals the unpadded
  float64 reference, the argmax flags a greedy last token only, and a sequence alone gets
  what it gets in the group."""
  context = engine.encode("def wrap(text, width=70):\n    return")
  logits, _ = nnx.merge(engine.graphdef, engine.params)(np.array([context], np.int32))
  ranked = np.argsort(-np.asarray(logits[0, -1]))
  choices = [int(ranked[0]), int(ranked[1]), int(ranked[5]), int(ranked[0])]  # a duplicate too
  sequences = [context + [token] for token in choices] + [context[:5]]
  scored = scoring.score(model, sequences)
  for sequence, (logprobs, greedy) in zip(sequences, scored):
    np.testing.assert_allclose(logprobs, numpy_logprobs(engine, sequence), atol=2e-4)
    assert len(greedy) == len(sequence) - 1
  assert [bool(scored[i][1][-1]) for i in range(4)] == [True, False, False, True]
  alone = scoring.score(model, [sequences[2]])[0]
  np.testing.assert_allclose(scored[2][0], alone[0], atol=1e-5)
  np.testing.assert_array_equal(scored[2][1], alone[1])


def test_an_items_choices_share_one_row_and_each_scores_as_it_would_alone(engine, model):
  """HellaSwag's shape: one context, endings of different lengths, beside a sequence of its
  own. Grouped, the context is laid once per row, and every sequence's log-probabilities and
  argmax flags equal its own unpadded float64 reference; a group too long for the context is
  split across rows that each repeat the context."""
  context = engine.encode("def wrap(text, width=70):\n    return")
  endings = [engine.tokenizer.encode(text) for text in
             (" text", " TextWrapper(width=width).fill(text)", " None", " [line for line in text]")]
  sequences = [context + ending for ending in endings] + [engine.encode("import textwrap")]
  groups = scoring.row_groups(sequences, model.context_length)
  assert sorted(index for _, members in groups for index in members) == [0, 1, 2, 3, 4]
  for shared, members in groups:
    assert members == [4] if 4 in members else shared >= len(context)
  assert len(groups) < len(sequences)
  scored = scoring.score(model, sequences)
  for sequence, (logprobs, greedy) in zip(sequences, scored):
    reference = numpy_logprobs(engine, sequence)
    np.testing.assert_allclose(logprobs, reference, atol=2e-4)
    logits, _ = nnx.merge(engine.graphdef, engine.params)(np.array([sequence], np.int32))
    np.testing.assert_array_equal(greedy, np.asarray(logits[0, :-1]).argmax(-1) == sequence[1:])

  width = len(context) + max(map(len, endings))  # one ending a row at most
  split = scoring.row_groups(sequences[:4], width)
  assert sorted(index for _, members in split for index in members) == [0, 1, 2, 3]
  assert len(split) > len(scoring.row_groups(sequences[:4], model.context_length))
  rows = scoring.lay_rows(sequences[:4], split, len(split), width)
  for index, (row, span) in rows.spans.items():
    np.testing.assert_array_equal(rows.tokens[row, span], sequences[index])
    np.testing.assert_array_equal(rows.positions[row, span], np.arange(len(sequences[index])))


def test_a_group_of_sequences_that_begin_alike_holds_at_most_max_members():
  """100 continuations of one context: groups of at most 64, each sharing the context (the
  bound keeps the grouping's dynamic program linear over a whole eval's sequences)."""
  from maxlm.evals import shared_prefixes  # pylint: disable=import-outside-toplevel
  context = list(range(10, 40))
  sequences = [context + [100 + i, 7] for i in range(100)]
  groups = shared_prefixes.shared_prefix_groups(sequences)
  sizes = [len(members) for _, members in groups]
  assert len(sizes) == 2 and max(sizes) <= 64 and sum(sizes) == 100
  assert all(shared == len(context) for shared, _ in groups)
