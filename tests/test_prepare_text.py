"""Tests for beam_pipelines.prepare_text: packing, splitting, a small end-to-end run, and runs
stopped by signals or left behind by killed ones."""

import collections
import gzip
import json
import logging
import math
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import apache_beam as beam
from apache_beam.runners.portability import prism_runner
import numpy as np
import pytest
import sentencepiece as spm

from beam_pipelines import documents
from beam_pipelines import normalize
from beam_pipelines import packing
from beam_pipelines import prepare_text
from beam_pipelines import records
from beam_pipelines import sources
from beam_pipelines import staging
from beam_pipelines import tokenized_split
from beam_pipelines import tokenizer_training
from maxlm import data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 64
PYTHON_SNIPPET = (
    "class Greeter:\n"
    "    \"\"\"Says hello.\"\"\"\n"
    "\n"
    "    def greet(self, name: str) -> str:\n"
    "\tif not name:  \n"
    "            return 'héllo, wörld ✓'\n"
    "        return f\"hello, {name}!\"   # trailing spaces   \n"
    "\n\n"
    "x = [1,  2,   3]\r\n")
# By hand: trailing spaces and tabs go, \r\n becomes \n; indentation and the tab stay.
PYTHON_SNIPPET_NORMALIZED = (
    "class Greeter:\n"
    "    \"\"\"Says hello.\"\"\"\n"
    "\n"
    "    def greet(self, name: str) -> str:\n"
    "\tif not name:\n"
    "            return 'héllo, wörld ✓'\n"
    "        return f\"hello, {name}!\"   # trailing spaces\n"
    "\n\n"
    "x = [1,  2,   3]\n")


def segment_layout(tokens, segment_ids, positions) -> list[tuple[int, int]]:
  """[start, end) of each segment, checking numbering, positions and tail-only padding."""
  used = int(np.count_nonzero(segment_ids))
  assert np.all(segment_ids[:used] > 0) and np.all(segment_ids[used:] == 0)
  assert np.all(tokens[used:] == packing.PAD_ID) and np.all(positions[used:] == 0)
  starts = [0] + [i for i in range(1, used) if segment_ids[i] != segment_ids[i - 1]]
  assert list(segment_ids[starts]) == list(range(1, len(starts) + 1))
  bounds = list(zip(starts, starts[1:] + [used]))
  for start, end in bounds:
    assert list(positions[start:end]) == list(range(end - start))
  return bounds


def reconstruct_pieces(sequences, seq_len):
  """(piece tokens, piece ended its sequence) in order, checking the per-sequence layout."""
  pieces = []
  for index, (tokens, segment_ids, positions) in enumerate(sequences):
    assert tokens.shape == segment_ids.shape == positions.shape == (seq_len,)
    bounds = segment_layout(tokens, segment_ids, positions)
    if index < len(sequences) - 1:
      assert bounds[-1][1] == seq_len, "only the final sequence may carry padding"
    pieces += [(list(tokens[start:end]), end == seq_len) for start, end in bounds]
  return pieces


@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_pack_documents_keeps_every_document_intact(seq_len):
  rng = random.Random(seq_len)
  docs = [[1000 * d + t for t in range(rng.choice([1, 2, seq_len, seq_len + 1, 3 * seq_len + 2]))]
          for d in range(1, 40)]
  sequences = list(packing.pack_documents(docs, seq_len))
  assert len(sequences) == math.ceil(sum(map(len, docs)) / seq_len)
  pieces = iter(reconstruct_pieces(sequences, seq_len))
  for doc in docs:
    rebuilt, ended_sequence = [], True
    while len(rebuilt) < len(doc):
      assert ended_sequence, "a document only continues after filling a sequence"
      piece, ended_sequence = next(pieces)
      rebuilt += piece
    assert rebuilt == doc
  assert next(pieces, None) is None


def test_pack_documents_of_nothing_is_nothing():
  assert list(packing.pack_documents([], 8)) == []


def test_split_holds_out_one_document_even_for_tiny_fractions():
  keys = [2**40, 2**41, 2**62, 2**63 - 1]
  bounds = (len(keys), min(keys), max(keys))
  splits = [documents.split_of(k, 1e-9, bounds) for k in keys]
  assert splits == [documents.VALIDATION, documents.TRAIN, documents.TRAIN, documents.TRAIN]
  assert documents.split_of(5, 0.99, (2, 5, 9)) == documents.VALIDATION
  assert documents.split_of(9, 0.99, (2, 5, 9)) == documents.TRAIN


def test_recursive_glob_also_matches_top_level_files(tmp_path):
  (tmp_path / "sub" / "deeper").mkdir(parents=True)
  for name in ("top.py", "sub/mid.py", "sub/deeper/low.py", "sub/skip.txt"):
    (tmp_path / name).write_text("x = 1\n")
  assert len(sources.match_files([f"{tmp_path}/**/*.py"])) == 3
  assert sources.recursive_variants("a/**/b/**/c") == [
      "a/**/b/**/c", "a/**/b/c", "a/b/**/c", "a/b/c"]


def test_hash_sample_respects_budgets_and_is_order_independent():
  docs = [f"document {i} " * (i % 7 + 1) for i in range(200)]
  sampler = tokenizer_training.HashSample(max_docs=50, max_bytes=1000)
  whole = sampler.extract_output(
      sampler.merge_accumulators([_accumulate(sampler, docs)]))
  halves = sampler.extract_output(sampler.merge_accumulators(
      [_accumulate(sampler, docs[1::2]), _accumulate(sampler, docs[::2])]))
  assert whole == halves
  by_priority = sorted((tokenizer_training.sample_priority(t), t) for t in docs)
  expected, total = [], 0
  for _, text in by_priority[:50]:
    total += len(text.encode())
    if total > 1000:
      break
    expected.append(text)
  assert whole == expected


def _accumulate(sampler, docs):
  accumulator = sampler.create_accumulator()
  for doc in docs:
    accumulator = sampler.add_input(accumulator, doc)
  return accumulator


def test_glob_matching_nothing_names_the_glob_and_the_command_line_exits_2(tmp_path, capsys):
  missing = f"{tmp_path}/nowhere/*.txt"
  with pytest.raises(ValueError, match="nowhere/\\*.txt' matched no files"):
    prepare_text.run([missing], str(tmp_path / "out"), vocab_size=400, seq_len=SEQ_LEN)
  with pytest.raises(SystemExit) as exit_info:
    prepare_text.main([f"--input={missing}", f"--output_dir={tmp_path}/out"])
  assert exit_info.value.code == 2
  [error] = capsys.readouterr().err.strip().splitlines()
  assert error.startswith("prepare_text: ") and "nowhere/*.txt' matched no files" in error


def write_corpus(root: pathlib.Path) -> list[str]:
  """Writes text files (one an exact copy of another) and a JSONL.gz with bad lines; returns
  the distinct documents they hold, as normalization leaves them."""
  sources = [pathlib.Path(module.__file__).read_text() for module in (json, textwrap)]
  texts = sources + [PYTHON_SNIPPET, "Ünïcödé prose, with emoji 🙂 and\ttabs.\n"]
  (root / "code").mkdir()
  for i, text in enumerate(texts + [texts[1]]):
    (root / "code" / f"doc{i}.txt").write_text(text, newline="")
  (root / "code" / "empty.txt").write_text("")
  lines_docs = [f"JSONL document number {i}: " + "lorem ipsum dolor " * i for i in range(1, 6)]
  lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(lines_docs)]
  lines[2:2] = ['{"text": "broken', json.dumps({"body": "no text field"}),
                json.dumps({"text": ""}), ""]
  with gzip.open(root / "lines.jsonl.gz", "wt") as f:
    f.write("\n".join(lines) + "\n")
  texts[2] = PYTHON_SNIPPET_NORMALIZED
  return texts + [t.rstrip(" ") for t in lines_docs]


def read_records(output_dir: pathlib.Path, split: dict, seq_len: int) -> list[dict]:
  return [record for shard in split["shards"]
          for record in records.read_shard(str(output_dir / shard), seq_len)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  texts = write_corpus(root)
  output_dir = root / "out"
  # Code profile: no prose filters; PII is tested on its own corpus (json.py has an e-mail).
  source = prepare_text.Source("mixed", (f"{root}/code/*.txt", f"{root}/*.jsonl.gz"),
                               profile="code")
  manifest = prepare_text.run(
      [source], str(output_dir), vocab_size=600, seq_len=SEQ_LEN, validation_fraction=0.2,
      num_shards=2, stages=prepare_text.StageFlags(pii=False))
  return texts, output_dir, manifest


def test_manifest_counts_match_an_independent_count(prepared):
  texts, output_dir, manifest = prepared
  sp = spm.SentencePieceProcessor(model_file=str(output_dir / manifest["tokenizer"]["file"]))
  splits = manifest["splits"]
  assert splits["validation"]["documents"] >= 1
  assert sum(s["documents"] for s in splits.values()) == len(texts)
  expected_tokens = collections.Counter()
  for ids in sp.encode(texts):
    expected_tokens.update([sp.bos_id(), *ids, sp.eos_id()])
  assert sum(s["tokens"] for s in splits.values()) == sum(expected_tokens.values())

  written_tokens = collections.Counter()
  for name, split in splits.items():
    assert len(split["shards"]) == (2 if name == "train" else 1)
    sequences = read_records(output_dir, split, SEQ_LEN)
    assert len(sequences) == split["sequences"]
    for s in sequences:
      segment_layout(s["tokens"], s["segment_ids"], s["positions"])
    padded = sum(int(s["segment_ids"][-1] == 0) for s in sequences)
    assert padded <= len(split["shards"]), "one padded sequence per pack bucket at most"
    tokens = np.concatenate([s["tokens"][s["segment_ids"] > 0] for s in sequences])
    assert len(tokens) == split["tokens"]
    assert np.count_nonzero(tokens == sp.bos_id()) == split["documents"]
    split_counts = collections.Counter(tokens.tolist())
    written_tokens += split_counts
    if name == "train":
      p = np.array(list(split_counts.values()), dtype=np.float64) / len(tokens)
      assert manifest["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum())
  assert written_tokens == expected_tokens


def test_manifest_lists_the_v2_fields_and_the_loader_batches_them(prepared):
  _, output_dir, manifest = prepared
  assert manifest["format"] == "maxlm.records.v2"
  assert manifest["fields"] == [{"name": name, "dtype": "int32", "shape": [SEQ_LEN]}
                                for name in ("tokens", "segment_ids", "positions")]
  split = manifest["splits"]["validation"]
  [batch] = data.make_dataset(output_dir, "validation", global_batch_size=split["sequences"],
                              seed=0, shuffle=False, num_epochs=1, process_index=0,
                              process_count=1)
  for i, record in enumerate(read_records(output_dir, split, SEQ_LEN)):
    for name, row in record.items():
      np.testing.assert_array_equal(batch[name][i], row)


def test_tokenizer_round_trips_python_source(prepared):
  _, output_dir, manifest = prepared
  tokenizer = manifest["tokenizer"]
  assert (tokenizer["pad_id"], tokenizer["bos_id"], tokenizer["eos_id"], tokenizer["unk_id"]) == (
      0, 1, 2, 3)
  sp = spm.SentencePieceProcessor(model_file=str(output_dir / tokenizer["file"]))
  assert tokenizer["vocab_size"] == sp.get_piece_size() == 600
  source = pathlib.Path(documents.__file__).read_text()
  for text in (PYTHON_SNIPPET, source, "    leading spaces\n\n\n  "):
    assert sp.decode(sp.encode(text)) == text


def test_normalization_leaves_the_python_sources_alone():
  for module in (json, textwrap):
    text = pathlib.Path(module.__file__).read_text()
    assert normalize.normalize_whitespace(text) == text


def test_refuses_to_overwrite_a_prepared_directory(prepared):
  _, output_dir, manifest = prepared
  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare_text.run(manifest["settings"]["sources"][0]["inputs"], str(output_dir),
                     vocab_size=600, seq_len=SEQ_LEN)


def test_published_output_holds_no_owner_file(prepared):
  _, output_dir, _ = prepared
  assert not (output_dir / staging.OWNER_NAME).exists()
  assert not list(output_dir.parent.glob(f"out{staging.STAGING_MARK}*"))


# The test's hook into the run: its first stage hangs (as on a stuck input) after saying so.
HUNG_RUN = textwrap.dedent("""
    import pathlib, sys, time
    from beam_pipelines import prepare_text, reading

    def hung_read(f, max_bytes):
      pathlib.Path(sys.argv[1]).touch()
      time.sleep(600)
      yield from ()

    reading.read_whole_file = hung_read
    prepare_text.main(sys.argv[2:])
""")


def start_hung_run(tmp_path: pathlib.Path) -> tuple[subprocess.Popen, pathlib.Path]:
  """A prepare_text run in a child that has reached its hung first stage; SIGINT starts out
  ignored in it, as in a shell script's background job (the probe's case)."""
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.txt").write_text("a document that is never read to the end\n")
  marker = tmp_path / "reading"
  command = [sys.executable, "-c", HUNG_RUN, str(marker), f"--input={tmp_path}/in/*.txt",
             f"--output_dir={tmp_path}/out", "--no_langid"]
  child = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while not marker.exists():
    if child.poll() is not None or time.monotonic() > deadline:
      child.kill()
      pytest.fail(f"the run never reached its first stage: {child.communicate()[1][-2000:]}")
    time.sleep(0.1)
  return child, tmp_path / "out"


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_ends_a_hung_run_without_publishing_or_staging(tmp_path, signum,
                                                                      exit_code):
  child, output_dir = start_hung_run(tmp_path)
  child.send_signal(signum)
  try:
    _, stderr = child.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    child.kill()
    pytest.fail(f"{signal.Signals(signum).name} did not stop the run: {child.communicate()[1]}")
  assert child.returncode == exit_code, stderr
  name = signal.Signals(signum).name
  assert stderr.splitlines()[-1] == (
      f"prepare_text: stopped by {name} before finishing; --output_dir {output_dir} is as it "
      "was and no staging dir is left")
  assert "Traceback" not in stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "reading"]


def exited_pid() -> int:
  child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
  return int(child.stdout)


def staging_dirs(tmp_path: pathlib.Path, owners: dict[str, str | None]) -> dict[str, str]:
  """out.tmp-NAME dirs with the given owner file contents (None: no owner file)."""
  paths = {}
  for name, owner in owners.items():
    path = tmp_path / f"out{staging.STAGING_MARK}{name}"
    path.mkdir()
    if owner is not None:
      (path / staging.OWNER_NAME).write_text(owner)
    paths[name] = str(path)
  return paths


def test_stale_staging_dirs_are_named_then_removed_on_request(tmp_path, caplog):
  host = socket.gethostname()
  paths = staging_dirs(tmp_path, {
      "dead": f"{host} {exited_pid()}\n", "noowner": None, "live": f"{host} {os.getpid()}\n",
      "remote": "another-host.example 1\n"})
  missing = f"{tmp_path}/nowhere/*.txt"
  with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="matched no files"):
    prepare_text.run([missing], str(tmp_path / "out"), vocab_size=400, seq_len=SEQ_LEN)
  report = (f"2 staging dirs of earlier runs that did not finish: {paths['dead']} "
            f"{paths['noowner']}; remove them with --remove_stale_staging")
  assert [r.getMessage() for r in caplog.records if "staging" in r.getMessage()] == [report]
  with pytest.raises(SystemExit, match="^2$"):
    prepare_text.main([f"--input={missing}", f"--output_dir={tmp_path}/out",
                       "--remove_stale_staging"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tmp-live", "out.tmp-remote"]


def test_importing_the_pipelines_logs_nothing_about_beams_missing_gcp_clients():
  """`import apache_beam` without the [gcp] extra logs "apitools not found ..." on the root
  logger; the pipelines drop that one line, and other root warnings still show."""
  imported = subprocess.run(
      [sys.executable, "-c", "import logging, beam_pipelines.prepare_text; "
       "logging.warning('a warning of our own')"],
      cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
      check=True)
  assert "apitools" not in imported.stderr, imported.stderr
  assert "WARNING:root:a warning of our own" in imported.stderr


def test_a_bucket_makes_the_same_shard_whatever_order_its_documents_arrive_in(tmp_path):
  # A runner hands a bucket's documents over in an order that varies: the default corpus
  # packed them differently (held-out 3.466 or 3.487 after command 1) by where its cache was.
  rng = np.random.default_rng(0)
  keyed = [(int(key), rng.integers(4, 600, int(length), np.int32).tobytes())
           for key, length in zip(rng.integers(0, 2**62, 40), rng.integers(1, 150, 40))]
  assert len({key for key, _ in keyed}) == len(keyed)
  written = []
  for arrival in (keyed, keyed[::-1], [keyed[i] for i in rng.permutation(len(keyed))]):
    out = tmp_path / str(len(written))
    out.mkdir()
    [(_, name, count)] = tokenized_split.pack_and_write((("train", 0), arrival), str(out),
                                                       SEQ_LEN, {"train": 1})
    written.append((out / name).read_bytes())
  assert written[0] == written[1] == written[2]
  # ...and that shard holds the documents in key order.
  in_key_order = [np.frombuffer(tokens, np.int32) for _, tokens in sorted(keyed)]
  want = list(packing.pack_documents(in_key_order, SEQ_LEN))
  got = records.read_shard(str(tmp_path / "0" / name), SEQ_LEN)
  assert count == len(want) == len(got)
  for record, (tokens, segment_ids, positions) in zip(got, want):
    np.testing.assert_array_equal(record["tokens"], tokens)
    np.testing.assert_array_equal(record["segment_ids"], segment_ids)
    np.testing.assert_array_equal(record["positions"], positions)


def test_a_run_without_a_runner_flag_never_tries_to_fetch_prism(tmp_path, monkeypatch):
  # Beam's DirectRunner hands a pipeline Prism can run to Prism first, downloading it from
  # GitHub; with no network it falls back, leaving a /tmp/beam-temp* directory behind.
  attempts = []
  monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline",
                      lambda self, *args: attempts.append(args) or 1 / 0)
  write_corpus(tmp_path)
  prepare_text.run([f"{tmp_path}/code/*.txt"], str(tmp_path / "out"), vocab_size=600,
                   seq_len=SEQ_LEN, validation_fraction=0.2, num_shards=1)
  assert (tmp_path / "out" / "manifest.json").is_file()
  assert attempts == []
  named = prepare_text.pipeline_options(["--runner=DirectRunner"])
  with beam.Pipeline(options=named) as pipeline:
    _ = pipeline | beam.Create([1, 2]) | beam.Map(lambda x: x)
  assert len(attempts) == 1  # as a named DirectRunner still does: this test can see it


@pytest.fixture(scope="module")
def refused_run(tmp_path_factory):
  """The command line, without --tokenizer, over inputs of which no document survives,
  replacing (--overwrite) an output dir of an earlier run: (its process, inputs, output dir,
  the output's files before)."""
  root = tmp_path_factory.mktemp("refused")
  inputs = root / "in"
  inputs.mkdir()
  (inputs / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
  (inputs / "empty.jsonl").write_bytes(b"")
  (inputs / "numbers.jsonl").write_text(json.dumps({"text": 12345}) + "\n")
  output_dir = root / "out"
  output_dir.mkdir()
  (output_dir / "manifest.json").write_text('{"an earlier run": true}')
  before = {p.name: p.read_bytes() for p in output_dir.iterdir()}
  command = [sys.executable, "-m", "beam_pipelines.prepare_text", f"--input={inputs}/*",
             f"--output_dir={output_dir}", f"--seq_len={SEQ_LEN}", "--overwrite"]
  process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  return process, inputs, output_dir, before


def test_a_run_that_makes_no_train_sequence_exits_2_naming_its_drops_without_a_traceback(
    refused_run):
  process, inputs, output_dir, _ = refused_run
  [kept] = output_dir.parent.glob(f"out{staging.STAGING_MARK}*")
  assert process.returncode == 2, process.stderr
  assert process.stderr.splitlines()[-1] == (
      "prepare_text: no train sequences were produced: 2 documents read from 3 files "
      "(1 empty), all dropped: 1 invalid_utf8, 1 text_not_a_string; see "
      f"{kept}/dead_letter.jsonl and report.md beside it (--output_dir {output_dir} is as it "
      "was)")
  assert "Traceback" not in process.stderr and "prepared" not in process.stdout


def test_a_refused_run_leaves_the_output_as_it_was_and_keeps_only_its_reports(refused_run):
  _, inputs, output_dir, before = refused_run
  assert {p.name: p.read_bytes() for p in output_dir.iterdir()} == before
  [kept] = output_dir.parent.glob(f"out{staging.STAGING_MARK}*")
  assert sorted(p.name for p in kept.iterdir()) == [
      "dead_letter.jsonl", "duplicates.jsonl", "report.md"]
  dead = [json.loads(line) for line in (kept / "dead_letter.jsonl").read_text().splitlines()]
  assert [(d["file"], d["line"], d["reason"]) for d in dead] == [
      (str(inputs / "latin1.txt"), 0, "invalid_utf8"),
      (str(inputs / "numbers.jsonl"), 1, "text_not_a_string")]
  assert "input files: 3 (1 empty)" in (kept / "report.md").read_text()
  assert staging.stale_dirs(str(output_dir)) == [str(kept)]  # the next run names it


def test_the_command_line_logs_its_progress_to_stderr(refused_run):
  # Importing Beam configures the root logger at WARNING; these INFO lines were lost to it.
  process, _, output_dir, _ = refused_run
  staged_line = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ \S+: 1 sources, 3 read units \(0\.0 MB of "
                           rf"files\); staging in {re.escape(str(output_dir))}\.tmp-\w+$")
  assert any(staged_line.match(line) for line in process.stderr.splitlines()), process.stderr


@pytest.mark.parametrize("languages, message", [
    (("english",), "--languages has 'english', which language ID never returns"),
    ((), "--languages is empty")])
def test_language_codes_language_id_never_returns_are_refused_before_reading(
    tmp_path, languages, message):
  with pytest.raises(ValueError, match=message):
    prepare_text.run([f"{tmp_path}/nothing/*.txt"], str(tmp_path / "out"), vocab_size=400,
                     seq_len=SEQ_LEN, stages=prepare_text.StageFlags(languages=languages))


@pytest.mark.parametrize("output_dir, message", [
    ("a.jsonl", "--output_dir {root}/a.jsonl is a file, not a directory; choose another path"),
    ("a.jsonl/sub", "--output_dir {root}/a.jsonl/sub is inside {root}/a.jsonl, which is a file"),
])
def test_an_output_dir_that_is_or_is_under_a_file_is_refused_in_one_line(
    tmp_path, capsys, output_dir, message):
  (tmp_path / "in.txt").write_text("a document\n")
  (tmp_path / "a.jsonl").write_text('{"text": "data the user keeps"}\n')
  for overwrite in ([], ["--overwrite"]):
    with pytest.raises(SystemExit) as exit_info:
      prepare_text.main([f"--input={tmp_path}/in.txt", f"--output_dir={tmp_path}/{output_dir}",
                         "--no_langid", *overwrite])
    assert exit_info.value.code == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"prepare_text: {message.format(root=tmp_path)}")
  assert (tmp_path / "a.jsonl").read_text() == '{"text": "data the user keeps"}\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "in.txt"]


@pytest.mark.parametrize("flags, message", [
    (["--seq_len=0"], "--seq_len must be at least 1 and at most 1048576, got 0"),
    (["--seq_len=100000000"], "--seq_len must be at least 1 and at most 1048576, got 100000000"),
    ([f"--seed={-2 ** 63 - 1}"], "--seed must be a signed 64-bit integer"),
])
def test_a_row_length_or_seed_out_of_range_is_refused_before_reading(
    tmp_path, capsys, flags, message):
  (tmp_path / "in.txt").write_text("a document\n")
  with pytest.raises(SystemExit) as exit_info:
    prepare_text.main([f"--input={tmp_path}/in.txt", f"--output_dir={tmp_path}/out",
                       "--no_langid", *flags])
  assert exit_info.value.code == 2
  [error] = capsys.readouterr().err.strip().splitlines()
  assert error.startswith(f"prepare_text: {message}")
  assert not (tmp_path / "out").exists()
