"""beam_pipelines.prepare_chat (and chat_examples, chat_report) on small SFT and preference
inputs, checked against conversations tokenized here turn by turn with SentencePiece."""

import collections
import gzip
import json
from pathlib import Path
import textwrap

import numpy as np
import pytest
import sentencepiece as spm

from beam_pipelines import chat_examples
from beam_pipelines import chat_template
from beam_pipelines import dataset_manifest
from beam_pipelines import prepare_chat
from beam_pipelines import records
from beam_pipelines.chat_examples import BadRow, Conversation
from beam_pipelines.tokenizer_training import TRAINER_OPTIONS
from maxlm import data

SEQ_LEN = 64


def turn(role, content):
  return {"role": role, "content": content}


GOOD_SFT = [
    {"messages": [turn("user", "What is 2 + 2?"), turn("assistant", "4")]},
    {"messages": [turn("system", "Be terse."), turn("user", "Name a fruit."),
                  turn("assistant", "pear"), turn("user", "Another?"),
                  turn("assistant", "Äpfel 🙂")]},
    {"prompt": "def f(x):", "completion": "return x"},
    {"messages": [turn("user", "empty reply please"), turn("assistant", "")]},
    {"messages": [turn("user", "see <|image|> here"), turn("assistant", "an image")],
     "extra": "ignored"},
] + [{"messages": [turn("user", f"Say {i}."), turn("assistant", f"{i} said")]}
     for i in range(20)]
BAD_SFT = {  # line -> (row text, reason); lines count from 1 after GOOD_SFT
    "{not json": "malformed_json",
    json.dumps({"messages": "hi"}): "malformed_row",
    json.dumps({"messages": [{"role": "user"}]}): "malformed_row",
    json.dumps([1, 2]): "malformed_row",
    json.dumps({"text": "plain text"}): "malformed_row",
    json.dumps({"prompt": "p", "completion": ["not", "text"]}): "malformed_row",
    json.dumps({"messages": [turn("tool", "x"), turn("assistant", "y")]}): "unknown_role",
    json.dumps({"messages": [turn("user", "a<|end|>b"), turn("assistant", "c")]}):
        "reserved_token",
    json.dumps({"messages": [turn("system", "s"), turn("user", "u")]}): "no_supervised_tokens",
    json.dumps({"messages": [turn("user", "long"), turn("assistant", "word " * 80)]}):
        "too_long",
    json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}): "other_kind",
}
GOOD_PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": [turn("system", "Be terse."), turn("user", "Largest planet?")],
     "chosen": [turn("assistant", "Jupiter")], "rejected": [turn("assistant", "Mars is big")]},
    {"prompt": "Count to three.", "chosen": "one two three", "rejected": "one two"},
] + [{"prompt": f"Echo {i}.", "chosen": f"{i}", "rejected": f"{i + 1} and more"}
     for i in range(12)]
BAD_PAIRS = {
    json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}): "identical_replies",
    json.dumps({"prompt": "q", "chosen": [turn("user", "x")], "rejected": "y"}):
        "no_supervised_tokens",
    json.dumps({"prompt": "q", "chosen": "a " * 70, "rejected": "b"}): "too_long",
    # each half fits --seq_len alone; the prompt and both replies together do not
    json.dumps({"prompt": "q", "chosen": "a " * 36, "rejected": "b " * 36}): "too_long",
    json.dumps({"prompt": "q", "chosen": "a"}): "malformed_row",
    json.dumps({"messages": [turn("user", "u"), turn("assistant", "a")]}): "other_kind",
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
  """A data dir holding a tokenizer trained as prepare_text trains one, and its manifest."""
  directory = tmp_path_factory.mktemp("tokenizer")
  lines = [line for line in Path(textwrap.__file__).read_text().splitlines() if line.strip()]
  options = TRAINER_OPTIONS | {
      "model_type": "bpe", "vocab_size": 500,
      "user_defined_symbols": ["\n", *chat_template.RESERVED_TOKENS]}
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines + ["Äpfel 🙂"] * 3),
                                 model_prefix=str(directory / "tokenizer"), **options)
  proto = (directory / records.TOKENIZER_NAME).read_bytes()
  entry = dataset_manifest.tokenizer_entry(proto, "bpe", list(records.RESERVED_TOKENS))
  (directory / records.MANIFEST_NAME).write_text(json.dumps({"tokenizer": entry}))
  return directory


@pytest.fixture(scope="module")
def sp(tokenizer_dir):
  return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / records.TOKENIZER_NAME))


def expected_ids(sp, messages, reply_from=0):
  """[bos] + each turn tokenized alone; mask 1 on assistant content and <|end|> from turn
  `reply_from` on."""
  end, newline = sp.piece_to_id("<|end|>"), sp.encode("\n")
  ids, mask = [sp.bos_id()], [0]
  for index, message in enumerate(messages):
    role, content = message["role"], message["content"]
    body = sp.encode(content) if content else []
    trained = int(role == "assistant" and index >= reply_from)
    ids += [sp.piece_to_id(f"<|{role}|>"), *body, end, *newline]
    mask += [0] + [trained] * (len(body) + 1) + [0] * len(newline)
  return tuple(ids), tuple(mask)


def as_messages(value, role):
  return [turn(role, value)] if isinstance(value, str) else value


def messages_of_sft_row(row):
  if "messages" in row:
    return row["messages"]
  return [turn("user", row["prompt"]), turn("assistant", row["completion"])]


def write_inputs(directory: Path, good: list[dict], bad: dict[str, str]) -> dict[int, str]:
  """good rows then bad rows into one JSONL file; returns {line: reason} of the bad ones."""
  lines = [json.dumps(row) for row in good] + list(bad)
  (directory / "a.jsonl").write_text("\n".join(lines) + "\n")
  return {len(good) + i: reason for i, reason in enumerate(bad.values(), 1)}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tokenizer_dir):
  inputs = tmp_path_factory.mktemp("sft_inputs")
  bad = {("a.jsonl", line): reason
         for line, reason in write_inputs(inputs, GOOD_SFT[:15], BAD_SFT).items()}
  with gzip.open(inputs / "b.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps(row) + "\n" for row in GOOD_SFT[15:20]))
    f.write("not json\n")
  bad[("b.jsonl.gz", 6)] = "malformed_json"
  (inputs / "c.jsonl").write_bytes(b'{"prompt": "\xff", "completion": "x"}\n')
  bad[("c.jsonl", 1)] = "invalid_utf8"
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in GOOD_SFT[20:]]),
                 inputs / "d.parquet")
  (inputs / "e.jsonl.gz").write_bytes(b"not gzip at all")
  bad[("e.jsonl.gz", 0)] = "unreadable"
  output = tmp_path_factory.mktemp("sft") / "out"
  manifest = prepare_chat.run([str(inputs / "*")], str(output), tokenizer=str(tokenizer_dir),
                              seq_len=SEQ_LEN, validation_fraction=0.2)
  return output, manifest, bad


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory, tokenizer_dir):
  inputs = tmp_path_factory.mktemp("preference_inputs")
  bad = write_inputs(inputs, GOOD_PAIRS[:12], BAD_PAIRS)
  (inputs / "held_out.jsonl").write_text(
      "".join(json.dumps(row) + "\n" for row in GOOD_PAIRS[12:]))
  output = tmp_path_factory.mktemp("preference") / "out"
  manifest = prepare_chat.run([str(inputs / "a.jsonl")], str(output),
                              validation_inputs=[str(inputs / "held_out.jsonl")],
                              tokenizer=str(tokenizer_dir), seq_len=SEQ_LEN)
  return output, manifest, bad


def read_split(directory: Path, manifest: dict, split: str) -> list[dict]:
  fields = records.fields_of_manifest(manifest)
  return [record for shard in manifest["splits"][split]["shards"]
          for record in records.read_shard(str(directory / shard), fields)]


def segments(record: dict, prefix: str = "") -> list[tuple[tuple, tuple]]:
  """(tokens, loss_mask) of each segment, checking numbering, positions and padding."""
  ids, mask = record[prefix + "tokens"], record[prefix + "loss_mask"]
  segment_ids, positions = record[prefix + "segment_ids"], record[prefix + "positions"]
  used = int(np.count_nonzero(segment_ids))
  assert np.all(segment_ids[:used] > 0) and not segment_ids[used:].any()
  assert not (ids[used:].any() or mask[used:].any() or positions[used:].any())
  result = []
  for k in range(1, int(segment_ids.max(initial=0)) + 1):
    where = np.flatnonzero(segment_ids == k)
    assert list(where) == list(range(where[0], where[0] + len(where))), "a segment is split"
    assert list(positions[where]) == list(range(len(where)))
    result.append((tuple(ids[where].tolist()), tuple(mask[where].tolist())))
  return result


def all_records(directory, manifest):
  return [r for split in records.SPLITS for r in read_split(directory, manifest, split)]


def test_each_conversation_is_one_segment_with_the_ids_and_mask_of_its_turns(sft_dir, sp):
  directory, manifest, _ = sft_dir
  found = collections.Counter(s for r in all_records(directory, manifest) for s in segments(r))
  expected = collections.Counter(expected_ids(sp, messages_of_sft_row(row)) for row in GOOD_SFT)
  assert found == expected
  assert all(sum(mask) >= 1 for _, mask in found)


def test_the_masked_tokens_decode_to_the_replies_and_their_ends(sft_dir, sp):
  directory, manifest, _ = sft_dir
  decoded = sorted(sp.decode([t for t, m in zip(ids, mask) if m])
                   for r in all_records(directory, manifest) for ids, mask in segments(r))
  replies = sorted("".join(m["content"] + "<|end|>" for m in messages_of_sft_row(row)
                           if m["role"] == "assistant") for row in GOOD_SFT)
  assert decoded == replies


def read_dead_letters(directory: Path) -> dict:
  lines = (directory / "dead_letter.jsonl").read_text().splitlines()
  return {(Path(d["file"]).name, d["line"]): d["reason"] for d in map(json.loads, lines)}


def test_each_bad_row_is_a_dead_letter_with_its_reason(sft_dir):
  directory, _, bad = sft_dir
  assert read_dead_letters(directory) == bad


def test_the_manifest_lists_the_sft_fields_and_the_copied_tokenizer(sft_dir, tokenizer_dir):
  directory, manifest, _ = sft_dir
  assert manifest["format"] == "maxlm.records.v2" and manifest["kind"] == "sft"
  assert manifest["fields"] == [{"name": name, "dtype": "int32", "shape": [SEQ_LEN]} for name in
                                ("tokens", "segment_ids", "positions", "loss_mask")]
  source = json.loads((tokenizer_dir / records.MANIFEST_NAME).read_text())["tokenizer"]
  assert manifest["tokenizer"] == source
  assert (directory / records.TOKENIZER_NAME).read_bytes() == (
      tokenizer_dir / records.TOKENIZER_NAME).read_bytes()
  for split in records.SPLITS:
    found = read_split(directory, manifest, split)
    entry = manifest["splits"][split]
    assert entry["sequences"] == len(found) > 0
    assert entry["documents"] == sum(len(segments(r)) for r in found)
    assert entry["tokens"] == sum(int(np.count_nonzero(r["segment_ids"])) for r in found)
    assert entry["supervised_tokens"] == sum(int(r["loss_mask"].sum()) for r in found)


def test_the_report_counts_rows_dead_letters_and_tokens(sft_dir):
  directory, manifest, bad = sft_dir
  report = manifest["report"]
  assert report["dead_letters_by_reason"] == dict(collections.Counter(bad.values()))
  # unrecognized: `{not json`, [1, 2], {"text"}, b's `not json`, c's non-UTF-8 line, e;
  # sft rows with a reason: messages "hi", a message without content, a list completion,
  # tool, <|end|>, no reply, too long
  assert report["rows_in"] == {"sft": len(GOOD_SFT) + 7, "preference": 1, "unrecognized": 6}
  assert sum(report["examples_out"].values()) == len(GOOD_SFT)
  slots = sum(report["sequences"].values()) * SEQ_LEN
  assert report["packing_efficiency"] == pytest.approx(sum(report["tokens"].values()) / slots)
  table = (directory / "report.md").read_text()
  assert "too_long 1" in table and "| train |" in table and "supervised tokens" in table


def test_make_dataset_batches_the_sft_fields(sft_dir):
  directory = sft_dir[0]
  batch = next(iter(data.make_dataset(directory, "train", global_batch_size=2, seed=0,
                                      process_index=0, process_count=1)))
  assert {name: (a.dtype.name, a.shape) for name, a in batch.items()} == {
      name: ("int32", (2, SEQ_LEN)) for name in chat_examples.FIELD_NAMES}


def pair_halves(record: dict) -> list[tuple[tuple, tuple, int]]:
  """Per segment of a preference record, ((chosen ids, mask), (rejected ids, mask), length
  of the shared prefix): the prefix followed by each continuation, whose positions restart
  where it ends."""
  halves = []
  for k in range(1, int(record["segment_ids"].max(initial=0)) + 1):
    where = np.flatnonzero(record["segment_ids"] == k)
    branch, positions = record["branch_ids"][where], record["positions"][where]
    assert list(branch) == sorted(branch) and branch[0] == 0, "prefix, chosen, rejected"
    def half(reply, where=where, branch=branch, positions=positions):
      own = where[(branch == 0) | (branch == reply)]
      assert list(record["positions"][own]) == list(range(len(own)))
      return tuple(record["tokens"][own].tolist()), tuple(record["loss_mask"][own].tolist())
    assert positions.max() < len(where)
    halves.append((half(1), half(2), int((branch == 0).sum())))
  used = int(np.count_nonzero(record["segment_ids"]))
  assert not any(record[name][used:].any() for name in chat_examples.names_of_kind("preference"))
  return halves


def test_pair_k_is_segment_k_holding_the_shared_prefix_once_then_both_replies(
    preference_dir, sp):
  directory, manifest, _ = preference_dir
  expected, shared = {}, {}
  for row in GOOD_PAIRS:
    prompt = as_messages(row["prompt"], "user")
    chosen, rejected = (expected_ids(sp, prompt + as_messages(row[key], "assistant"),
                                     len(prompt)) for key in ("chosen", "rejected"))
    expected[chosen] = rejected
    shared[chosen] = next(i for i, (c, r) in enumerate(zip(chosen[0], rejected[0])) if c != r)
  found = [pair for record in all_records(directory, manifest) for pair in pair_halves(record)]
  assert sorted(found) == sorted((c, r, shared[c]) for c, r in expected.items())
  assert any(1 in c[1][:shared[c]] for c in expected), "replies starting alike share tokens"


def test_a_hand_made_pair_shares_its_prefix_and_replies_starting_alike_share_those_tokens():
  tokenized = lambda ids, mask: chat_examples.Tokenized(np.array(ids), np.array(mask))  # noqa: E731
  # bos, prompt 7 8, then replies "5 6 9" and "5 6 4 4" (both supervised from 5 on)
  chosen = tokenized([1, 7, 8, 5, 6, 9], [0, 0, 0, 1, 1, 1])
  rejected = tokenized([1, 7, 8, 5, 6, 4, 4], [0, 0, 0, 1, 1, 1, 1])
  example = chat_examples.shared_example(chosen, rejected)
  assert example.tokens.tolist() == [1, 7, 8, 5, 6, 9, 4, 4]
  assert example.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
  assert example.positions.tolist() == [0, 1, 2, 3, 4, 5, 5, 6]
  assert example.branch_ids.tolist() == [0, 0, 0, 0, 0, 1, 2, 2]
  # a chosen reply that the rejected one extends: its continuation is empty
  example = chat_examples.shared_example(tokenized([1, 7, 5], [0, 0, 1]),
                                         tokenized([1, 7, 5, 3], [0, 0, 1, 1]))
  assert (example.tokens.tolist(), example.positions.tolist(), example.branch_ids.tolist()) == (
      [1, 7, 5, 3], [0, 1, 2, 3], [0, 0, 0, 2])
  (row,) = chat_examples.pack([example, example], seq_len=9)
  record = chat_examples.record_arrays(row, chat_examples.PREFERENCE)
  assert record["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 0]
  assert record["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_preference_data_has_its_fields_split_and_dead_letters(preference_dir):
  directory, manifest, bad = preference_dir
  assert manifest["kind"] == "preference"
  assert [f["name"] for f in manifest["fields"]] == [
      "tokens", "segment_ids", "positions", "loss_mask", "branch_ids"]
  assert manifest["splits"]["validation"]["documents"] == len(GOOD_PAIRS) - 12
  assert manifest["splits"]["train"]["documents"] == 12
  assert read_dead_letters(directory) == {("a.jsonl", line): r for line, r in bad.items()}
  batch = next(iter(data.make_dataset(directory, "validation", global_batch_size=1, seed=0,
                                      shuffle=False, num_epochs=1, process_index=0,
                                      process_count=1)))
  assert set(batch) == {f["name"] for f in manifest["fields"]}


def conversation(*turns):
  return Conversation(tuple(turns))


def test_truncate_keeps_the_longest_run_of_whole_turns_that_ends_with_a_reply(sp):
  long_turn = ("user", "word " * 80)
  messages = conversation(("user", "hi"), ("assistant", "hello"), ("user", "more"),
                          ("assistant", "sure"), long_turn, ("assistant", "ok"))
  example = chat_examples.sft_example(messages, sp, sp.bos_id(), SEQ_LEN, truncate=True)
  kept = [turn(role, content) for role, content in messages.messages[:4]]
  assert (tuple(example.tokens), tuple(example.loss_mask)) == (
      expected_ids(sp, kept))
  assert example.truncated == 2
  with pytest.raises(BadRow, match="raise --seq_len or pass --truncate") as error:
    chat_examples.sft_example(messages, sp, sp.bos_id(), SEQ_LEN, truncate=False)
  assert error.value.reason == "too_long"


def test_truncate_drops_a_conversation_whose_first_reply_does_not_fit(sp):
  messages = conversation(("user", "hi"), ("assistant", "word " * 80), ("user", "x"))
  with pytest.raises(BadRow, match="even its first reply does not fit") as error:
    chat_examples.sft_example(messages, sp, sp.bos_id(), SEQ_LEN, truncate=True)
  assert error.value.reason == "too_long"


def test_packing_places_every_pair_whole_in_one_segment():
  rng = np.random.default_rng(0)
  examples = []
  for k in range(200):
    lengths = rng.integers(2, 17, size=2)
    halves = [chat_examples.Tokenized(np.array([1000 * k] + [1000 * k + h + 1] * (n - 1)),
                                      np.ones(n, np.int32)) for h, n in enumerate(lengths)]
    examples.append(chat_examples.shared_example(*halves))
  rows = list(chat_examples.pack(examples, 32))
  placed = []
  for row in rows:
    record = chat_examples.record_arrays(row, chat_examples.PREFERENCE)
    placed += [(c[0], r[0]) for c, r, _ in pair_halves(record)]
  assert sorted(placed) == sorted(
      (tuple([1000 * k] + [1000 * k + 1] * (len(e.tokens[e.branch_ids != 2]) - 1)),
       tuple([1000 * k] + [1000 * k + 2] * (len(e.tokens[e.branch_ids != 1]) - 1)))
      for k, e in enumerate(examples))
  used = sum(len(e.tokens) for e in examples)
  assert len(rows) <= used / 32 / 0.75  # first fit over open rows wastes little


def test_a_run_dir_tokenizer_is_described_from_its_model(tmp_path, tokenizer_dir, sp):
  (tmp_path / records.TOKENIZER_NAME).write_bytes(
      (tokenizer_dir / records.TOKENIZER_NAME).read_bytes())
  entry = prepare_chat.Tokenizer(str(tmp_path)).entry
  assert (entry["bos_id"], entry["eos_id"], entry["pad_id"]) == (
      sp.bos_id(), sp.eos_id(), sp.pad_id())
  assert entry["special_tokens"]["<|end|>"] == sp.piece_to_id("<|end|>")


def test_overlong_lines_are_dead_letters_and_reading_goes_on(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text(json.dumps({"prompt": "x" * 100, "completion": "y"}) + "\n{}\n")
  rows = list(prepare_chat.read_rows(str(path), max_bytes=50))
  assert [(line, getattr(row, "reason", row)) for line, row in rows] == [
      (1, "row_too_large"), (2, {})]


@pytest.mark.parametrize("flags, message", [
    (["--seq_len=1"], "--seq_len must be at least 2 and at most 1048576, got 1"),
    (["--seq_len=100000000"], "--seq_len must be at least 2 and at most 1048576, got 100000000"),
    ([f"--seed={2 ** 63}"], "--seed must be a signed 64-bit integer"),
    (["--kind=dpo"], "--kind must be auto, sft or preference"),
    (["--validation_fraction=1"], "--validation_fraction must be in"),
    (["--num_shards=-1"], "--num_shards must be 0 (one per 256 MiB of input) or more, got -1"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, tokenizer_dir, capsys, flags, message):
  (tmp_path / "rows.jsonl").write_text(json.dumps(GOOD_SFT[0]) + "\n")
  argv = [f"--input={tmp_path / 'rows.jsonl'}", f"--tokenizer={tokenizer_dir}",
          f"--output_dir={tmp_path / 'out'}", "--seq_len=64", *flags]
  with pytest.raises(SystemExit) as exit_info:
    prepare_chat.main(argv)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip()
  assert error.startswith("prepare_chat: ") and message in error and "\n" not in error


def test_refuses_to_overwrite_a_prepared_directory(sft_dir, tokenizer_dir):
  directory, manifest, _ = sft_dir
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    prepare_chat.run(manifest["settings"]["inputs"], str(directory),
                     tokenizer=str(tokenizer_dir), seq_len=SEQ_LEN)


def cut_gzip(path: Path) -> None:
  """A .jsonl.gz cut off before its first row ends."""
  rows = "\n".join(json.dumps(GOOD_SFT[1]) for _ in range(50)).encode()
  path.write_bytes(gzip.compress(rows)[:30])


def test_sniffing_only_a_truncated_gz_names_the_file_and_what_gzip_says(tmp_path):
  cut_gzip(tmp_path / "cut.jsonl.gz")
  with pytest.raises(ValueError) as error:
    prepare_chat.sniff_kind([str(tmp_path / "cut.jsonl.gz")])
  assert str(error.value).startswith(f"--input file {tmp_path}/cut.jsonl.gz is unreadable")
  assert "Compressed file ended before the end-of-stream marker was reached" in str(error.value)


def test_rows_that_all_fail_exit_2_naming_the_drops_and_publish_nothing(tmp_path, tokenizer_dir,
                                                                         capsys):
  inputs = tmp_path / "in"
  inputs.mkdir()
  (inputs / "a.jsonl").write_text("\n".join(json.dumps(row) for row in GOOD_SFT[:2]) + "\n")
  cut_gzip(inputs / "b.jsonl.gz")
  (inputs / "c.jsonl").write_bytes(b"")
  output_dir = tmp_path / "out"
  with pytest.raises(SystemExit) as exit_info:
    prepare_chat.main([f"--input={inputs}/*", f"--tokenizer={tokenizer_dir}",
                       f"--output_dir={output_dir}", "--seq_len=4", "--kind=sft"])
  assert exit_info.value.code == 2
  [kept] = tmp_path.glob("out.tmp-*")
  assert capsys.readouterr().err == (
      "prepare_chat: no train sequences were produced: 3 rows read from 3 files (1 empty), all "
      f"dropped: 2 too_long, 1 unreadable; see {kept}/dead_letter.jsonl and report.md beside "
      f"it (--output_dir {output_dir} is as it was)\n")
  assert not output_dir.exists()
  assert sorted(p.name for p in kept.iterdir()) == ["dead_letter.jsonl", "report.md"]
  assert "from 3 files (1 empty)" in (kept / "report.md").read_text()


@pytest.mark.parametrize("output_dir, message", [
    ("a.jsonl", "--output_dir {root}/a.jsonl is a file, not a directory; choose another path"),
    ("a.jsonl/sub", "--output_dir {root}/a.jsonl/sub is inside {root}/a.jsonl, which is a file"),
])
def test_an_output_dir_that_is_or_is_under_a_file_is_refused_in_one_line(
    tmp_path, tokenizer_dir, capsys, output_dir, message):
  (tmp_path / "a.jsonl").write_text(json.dumps(GOOD_SFT[0]) + "\n")
  for overwrite in ([], ["--overwrite"]):
    with pytest.raises(SystemExit) as exit_info:
      prepare_chat.main([f"--input={tmp_path}/a.jsonl", f"--tokenizer={tokenizer_dir}",
                         f"--output_dir={tmp_path}/{output_dir}", "--seq_len=64", *overwrite])
    assert exit_info.value.code == 2
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"prepare_chat: {message.format(root=tmp_path)}")
  assert (tmp_path / "a.jsonl").read_text() == json.dumps(GOOD_SFT[0]) + "\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_a_lone_surrogate_in_text_is_a_dead_letter_and_in_another_field_is_kept(
    tmp_path, tokenizer_dir):
  # json.dumps writes each lone surrogate as a `\udXXX` escape, which json.loads gives back.
  rows = [{"prompt": "q\ud800", "completion": "a"},
          {"messages": [turn("user", "u"), turn("assistant", "x\udc00y")]},
          {**GOOD_SFT[0], "id": "\ud800"}]
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  manifest = prepare_chat.run([str(tmp_path / "rows.jsonl")], str(tmp_path / "out"),
                              tokenizer=str(tokenizer_dir), seq_len=SEQ_LEN,
                              validation_fraction=0.0)
  lines = (tmp_path / "out" / "dead_letter.jsonl").read_text().splitlines()
  assert sorted((d["line"], d["reason"], d["detail"]) for d in map(json.loads, lines)) == [
      (1, "invalid_utf8", "`prompt` holds the lone surrogate \\ud800, half of a UTF-16 pair; "
       "fix the program that wrote the row"),
      (2, "invalid_utf8", "`messages[1].content` holds the lone surrogate \\udc00, half of a "
       "UTF-16 pair; fix the program that wrote the row")]
  assert manifest["splits"]["train"]["documents"] == 1


def test_a_line_nested_too_deep_to_parse_is_a_dead_letter_and_reading_goes_on(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n{}\n")
  rows = list(prepare_chat.read_rows(str(path)))
  assert [(line, getattr(row, "reason", row)) for line, row in rows] == [
      (1, "malformed_json"), (2, {})]


def test_parquet_rows_with_binary_and_timestamp_columns_are_prepared(tmp_path, tokenizer_dir):
  import datetime  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = [{**row, "created": datetime.datetime(2024, 1, i + 1), "raw": bytes([i, 255])}
          for i, row in enumerate(GOOD_SFT[:2] + GOOD_SFT[5:6])]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
  manifest = prepare_chat.run([str(tmp_path / "rows.parquet")], str(tmp_path / "out"),
                              tokenizer=str(tokenizer_dir), seq_len=SEQ_LEN,
                              validation_fraction=0.0)
  assert manifest["splits"]["train"]["documents"] == 3
  assert (tmp_path / "out" / "dead_letter.jsonl").read_text() == ""


def test_a_parquet_file_mixing_row_formats_prepares_every_row(tmp_path, tokenizer_dir):
  """Parquet gives every row every column: a `messages` row's `prompt` and `completion` are
  null, and a `prompt` + `completion` row's `messages`."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = GOOD_SFT[:3]  # two `messages` rows, one `prompt` + `completion` row
  columns = ("messages", "prompt", "completion")
  pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in columns}),
                 tmp_path / "rows.parquet")
  written = pq.read_table(tmp_path / "rows.parquet").to_pylist()
  assert written[0]["prompt"] is None and written[2]["messages"] is None
  manifest = prepare_chat.run([str(tmp_path / "rows.parquet")], str(tmp_path / "out"),
                              tokenizer=str(tokenizer_dir), seq_len=SEQ_LEN,
                              validation_fraction=0.0)
  assert manifest["splits"]["train"]["documents"] == 3
  assert (tmp_path / "out" / "dead_letter.jsonl").read_text() == ""


def test_an_empty_output_dir_exits_2_with_one_line_and_writes_nothing(
    tmp_path, tokenizer_dir, capsys, monkeypatch):
  (tmp_path / "rows.jsonl").write_text(json.dumps(GOOD_SFT[0]) + "\n")
  monkeypatch.chdir(tmp_path)  # where a staging dir of "" would land
  with pytest.raises(SystemExit) as exit_info:
    prepare_chat.main(["--input=rows.jsonl", f"--tokenizer={tokenizer_dir}", "--output_dir=",
                       "--seq_len=64"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
      "prepare_chat: --output_dir is empty; name the directory to write\n")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


@pytest.mark.parametrize("flag, message", [
    ("--validation_inputs=held/*.jsonl", "unrecognized flag --validation_inputs: neither "
     "prepare_chat's nor a Beam pipeline option; did you mean --validation_input?"),
    ("--truncat", "unrecognized flag --truncat: neither prepare_chat's nor a Beam pipeline "
     "option; did you mean --truncate?"),
])
def test_a_flag_neither_ours_nor_beams_exits_2_naming_it(tmp_path, capsys, flag, message):
  with pytest.raises(SystemExit) as exit_info:
    prepare_chat.main(["--input=rows.jsonl", "--tokenizer=t", f"--output_dir={tmp_path}/out",
                       "--seq_len=64", flag])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
  assert sorted(tmp_path.iterdir()) == []


def test_beam_pipeline_options_pass_through_to_beam():
  _, beam_args = prepare_chat.parse_flags(["--input=a", "--tokenizer=t", "--output_dir=o",
                                           "--seq_len=64", "--direct_num_workers=2"])
  assert beam_args == ["--direct_num_workers=2"]
