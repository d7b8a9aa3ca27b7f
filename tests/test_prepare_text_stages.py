"""prepare_text end to end on a corpus whose every document's fate is known: bad input goes to
the dead letters by reason, filters drop what they should, PII is scrubbed, planted duplicates
are removed, TFDS and Parquet read, sources get their own shards and weights; reruns refuse or
replace the output whole."""

import collections
import contextlib
import gzip
import json
import os
import pathlib
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from beam_pipelines import prepare_text
from beam_pipelines import records
from beam_pipelines import stage_report
from beam_pipelines.sources import Source, parse_source

SEQ_LEN = 64
MAX_DOCUMENT_BYTES = 20_000
PARAGRAPHS = [
    "The committee met on Tuesday to review the budget for the coming year. Members discussed "
    "several proposals from the staff, including a plan to repair the old library roof and "
    "another to extend the opening hours of the public pool during the summer. After a long "
    "debate about costs, they approved the roof repair and asked for a more detailed estimate "
    "of the pool project before their next meeting.",
    "Farmers in the valley have started planting earlier than their parents did, because the "
    "last frost now arrives weeks before it used to. Some of them welcome the longer season, "
    "while others worry that a sudden cold night in April could ruin an entire crop of young "
    "apple trees. Local advisers suggest covering the most exposed rows with light fabric.",
    "A small museum near the harbour reopened this month after two years of renovation. The "
    "new building keeps the original brick walls but adds a bright hall for temporary shows, "
    "a reading room with maps of the old shipping routes, and a workshop where children can "
    "build simple wooden boats on weekend mornings with help from retired carpenters.",
    "Researchers at the university measured how quickly different kinds of bread go stale when "
    "they are stored in paper, in plastic, or in a cloth bag. Loaves kept in cloth stayed soft "
    "for the longest time, while those in paper dried out within two days. The team plans to "
    "repeat the test with bread baked from whole grain flour.",
]
FRENCH = ("Le conseil municipal s'est réuni mardi pour examiner le budget de l'année prochaine. "
          "Les membres ont discuté de plusieurs propositions du personnel, notamment un projet "
          "de réparation du toit de la vieille bibliothèque et un autre visant à prolonger les "
          "horaires d'ouverture de la piscine publique pendant l'été, avant de voter.")
PII_TEXT = (PARAGRAPHS[1] + " Questions go to jane.doe@example.com or 555-123-4567; the "
            "weather station reports to 10.1.2.3 every hour.")
LONG_DOC = " ".join([PARAGRAPHS[0], PARAGRAPHS[2], PARAGRAPHS[3]])
NEAR_DOC = LONG_DOC.replace("approved the roof repair", "approved the roof works", 1)
TFDS_TEXTS = ["first mock review text", "second mock review text"]
PARQUET_TEXT = PARAGRAPHS[2] + " Parquet rows arrive intact."

DEAD_LETTERS = {"invalid_utf8": 1, "binary": 1, "empty": 2, "too_long": 2, "malformed_json": 1,
                "missing_text": 3, "directory": 1, "dangling_symlink": 1, "symlink_loop": 2,
                "fifo": 1}
FIFO_RELEASE_SECONDS = 5


def word_shingles(text: str, n: int = 5) -> set:
  words = text.split()
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def write_corpus(root: pathlib.Path) -> list[Source]:
  web, code = root / "web", root / "code"
  web.mkdir()
  code.mkdir()
  (web / "good.txt").write_text(PARAGRAPHS[0] + "\n")
  (web / "copy.txt").write_text(PARAGRAPHS[0] + "\n")  # exact duplicate of good.txt
  (web / "long.txt").write_text(LONG_DOC + "\n")
  (web / "near.txt").write_text(NEAR_DOC + "\n")  # near duplicate of long.txt
  (web / "french.txt").write_text(FRENCH + "\n")  # language ID drops it
  (web / "short.txt").write_text("Too short to be a document.\n")  # quality drops it
  (web / "latin1.txt").write_bytes("café au lait ".encode("latin-1") * 20)
  (web / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
  (web / "empty.txt").write_bytes(b"")
  (web / "huge.txt").write_text("word " * MAX_DOCUMENT_BYTES)  # over the limit: too_long
  lines = [json.dumps({"text": PII_TEXT}), '{"text": "unterminated',
           json.dumps({"title": "no text here"}), json.dumps({"text": "x" * (2 * MAX_DOCUMENT_BYTES)}),
           json.dumps({"text": PARAGRAPHS[3]}), json.dumps({"text": "   "})]
  with gzip.open(web / "lines.jsonl.gz", "wt") as f:
    f.write("\n".join(lines) + "\n")
  pq.write_table(pa.table({"text": [PARQUET_TEXT, None]}), web / "rows.parquet")
  pq.write_table(pa.table({"body": ["no text column"]}), web / "other.parquet")
  (web / "x.txt").mkdir()  # a directory that the glob matches: never opened as a file
  (web / "dangling.txt").symlink_to(web / "nowhere.txt")
  (web / "loop_a.txt").symlink_to(web / "loop_b.txt")
  (web / "loop_b.txt").symlink_to(web / "loop_a.txt")
  os.mkfifo(web / "pipe.txt")  # no writer ever: opening it for reading would block
  (code / "util.py").write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n")
  (code / "shapes.py").write_text("class Square:\n    def __init__(self, side):\n"
                                  "        self.side = side\n")
  return [parse_source(f"web:3={web}/*"),
          Source("code", (f"{code}/*.py",), weight=1.0, profile="code"),
          Source("reviews", ("tfds:imdb_reviews/plain_text:train",), profile="code")]


def decoded_shards(output_dir: pathlib.Path, manifest: dict, shards: list[str]) -> list[str]:
  """Each shard's non-pad tokens decoded in record order: documents packed one after another."""
  sp = spm.SentencePieceProcessor(model_file=str(output_dir / records.TOKENIZER_NAME))
  texts = []
  for shard in shards:
    sequences = records.read_shard(str(output_dir / shard), manifest["seq_len"])
    tokens = [t for s in sequences for t in s["tokens"][s["segment_ids"] > 0].tolist()]
    texts.append(sp.decode(tokens))
  return texts


@contextlib.contextmanager
def released_after(fifo: pathlib.Path, seconds: float):
  """Should a reader block on the FIFO, a writer opens and closes it after `seconds`: the reader
  sees an empty file and the dead-letter counts fail the test, instead of the test hanging."""
  done = threading.Event()

  def release():
    done.wait(seconds)
    while not done.is_set():
      try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:  # ENXIO: no reader has it open
        pass
      done.wait(0.1)

  thread = threading.Thread(target=release, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  sources = write_corpus(root)
  output_dir = root / "out"
  examples = [{"text": text, "label": 1} for text in TFDS_TEXTS]
  with (tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples),
        released_after(root / "web" / "pipe.txt", FIFO_RELEASE_SECONDS)):
    manifest = prepare_text.run(
        sources, str(output_dir), vocab_size=400, seq_len=SEQ_LEN, validation_fraction=0.0,
        stages=prepare_text.StageFlags(max_document_bytes=MAX_DOCUMENT_BYTES,
                                       special_tokens=("<|user|>", "<|image|>")))
  return root, output_dir, manifest


def test_bad_input_is_counted_by_reason_and_dead_lettered(prepared):
  root, output_dir, manifest = prepared
  lines = [json.loads(line) for line in (output_dir / stage_report.DEAD_LETTER_NAME).open()]
  assert collections.Counter(line["reason"] for line in lines) == DEAD_LETTERS
  by_place = {(pathlib.Path(line["file"]).name, line["line"]): line["reason"] for line in lines}
  assert by_place == {
      ("latin1.txt", 0): "invalid_utf8", ("image.txt", 0): "binary", ("empty.txt", 0): "empty",
      ("huge.txt", 0): "too_long", ("lines.jsonl.gz", 2): "malformed_json",
      ("lines.jsonl.gz", 3): "missing_text", ("lines.jsonl.gz", 4): "too_long",
      ("lines.jsonl.gz", 6): "empty", ("rows.parquet", 2): "missing_text",
      ("other.parquet", 0): "missing_text", ("x.txt", 0): "directory",
      ("dangling.txt", 0): "dangling_symlink", ("loop_a.txt", 0): "symlink_loop",
      ("loop_b.txt", 0): "symlink_loop", ("pipe.txt", 0): "fifo"}
  assert all(line["source"] == "web" for line in lines)
  read = manifest["report"]["stages"][0]
  assert read["stage"] == "read" and read["dropped"] == DEAD_LETTERS
  assert manifest["report"]["dead_letters"] == sum(DEAD_LETTERS.values())


def test_each_stage_drops_what_it_should(prepared):
  _, _, manifest = prepared
  stages = {row["stage"]: row for row in manifest["report"]["stages"]}
  # read: 9 web documents (good, copy, long, near, french, short, 2 JSONL, 1 Parquet),
  # 2 code files, 2 non-empty TFDS examples
  assert stages["read"]["docs_out"] == 13
  assert stages["quality"]["dropped"] == {"too_few_words": 1}
  assert stages["langid"]["dropped"] == {"language_fr": 1}
  assert stages["pii"]["other"]["email_replaced"] == 1
  assert stages["pii"]["other"]["phone_replaced"] == 1
  assert stages["pii"]["other"]["ip_address_replaced"] == 1
  assert manifest["report"]["duplicates_removed"] == {"exact": 1, "near": 1}
  for previous, stage in zip(manifest["report"]["stages"], manifest["report"]["stages"][1:]):
    assert stage["docs_in"] == previous["docs_out"], stage["stage"]
  assert stages["near_dedup"]["docs_out"] == 9
  assert manifest["splits"]["train"]["documents"] == 9


def test_planted_duplicates_are_the_ones_removed(prepared):
  _, output_dir, _ = prepared
  assert len(word_shingles(LONG_DOC) & word_shingles(NEAR_DOC)) / len(
      word_shingles(LONG_DOC) | word_shingles(NEAR_DOC)) >= 0.9  # brute-force Jaccard
  removed = [json.loads(line) for line in (output_dir / stage_report.DUPLICATES_NAME).open()]
  pairs = {(r["kind"], pathlib.Path(r["origin"]).name, pathlib.Path(r["kept"]).name)
           for r in removed}
  exact_pair = tuple(sorted(("copy.txt", "good.txt")))
  near_pair = tuple(sorted(("long.txt", "near.txt")))
  assert {(kind, *sorted(names)) for kind, *names in pairs} == {
      ("exact", *exact_pair), ("near", *near_pair)}


def test_written_text_is_clean_and_scrubbed(prepared):
  _, output_dir, manifest = prepared
  texts = decoded_shards(output_dir, manifest, manifest["splits"]["train"]["shards"])
  joined = "\n".join(texts)
  assert "jane.doe@example.com" not in joined and "555-123-4567" not in joined
  assert "<|email|>" in joined and "<|phone|>" in joined and "<|ip_address|>" in joined
  assert "Le conseil" not in joined and "Too short" not in joined
  assert "first mock review text" in joined  # from TFDS
  assert PARQUET_TEXT in joined
  tokenizer = manifest["tokenizer"]
  sp = spm.SentencePieceProcessor(model_file=str(output_dir / records.TOKENIZER_NAME))
  for token in ("<|email|>", "<|user|>", "<|image|>", "<|system|>", "<|assistant|>"):
    assert sp.encode(f"a {token} b").count(tokenizer["special_tokens"][token]) == 1
  assert set(records.RESERVED_TOKENS) <= set(tokenizer["special_tokens"])  # reserved by default


def test_sources_get_their_own_shards_weights_and_token_counts(prepared):
  _, output_dir, manifest = prepared
  sources = manifest["splits"]["train"]["sources"]
  assert {name: s["weight"] for name, s in sources.items()} == {
      "web": 3.0, "code": 1.0, "reviews": 1.0}
  assert {name: s["documents"] for name, s in sources.items()} == {
      "web": 5, "code": 2, "reviews": 2}
  for name, source in sources.items():
    assert all(shard.startswith(f"train-{name}-") for shard in source["shards"])
  assert manifest["report"]["tokens_per_source"] == {
      name: s["tokens"] for name, s in sources.items()}
  all_slots = sum(s["sequences"] for s in manifest["splits"].values()) * SEQ_LEN
  assert manifest["report"]["packing_efficiency"] == pytest.approx(
      sum(s["tokens"] for s in manifest["splits"].values()) / all_slots)
  report = (output_dir / stage_report.REPORT_NAME).read_text()
  assert "| near_dedup |" in report and "packing efficiency" in report


def test_rerun_refuses_then_overwrite_replaces_whole(prepared, tmp_path):
  root, _, _ = prepared
  source = Source("two", (f"{root}/web/good.txt", f"{root}/web/long.txt"), profile="code")
  output_dir = tmp_path / "out"
  quick = dict(vocab_size=320, seq_len=SEQ_LEN, validation_fraction=0.0,
               stages=prepare_text.StageFlags(near_dedup=False))
  prepare_text.run([source], str(output_dir), **quick)
  (output_dir / "left-behind.txt").write_text("from the first run")
  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare_text.run([source], str(output_dir), **quick)
  assert (output_dir / "left-behind.txt").exists()
  manifest = prepare_text.run([source], str(output_dir), overwrite=True, **quick)
  assert not (output_dir / "left-behind.txt").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging dirs left
  assert (output_dir / records.MANIFEST_NAME).exists()
  assert manifest["splits"]["train"]["documents"] == 2


def test_command_line_sources_stage_flags_and_unigram(prepared, tmp_path, capsys):
  root, _, _ = prepared
  output_dir = tmp_path / "cli"
  prepare_text.main([
      f"--source=two:2:code={root}/web/good.txt,{root}/web/long.txt",
      f"--source=snippets={root}/code/*.py", f"--output_dir={output_dir}", "--vocab_size=400",
      f"--seq_len={SEQ_LEN}", "--validation_fraction=0", "--no_langid", "--no_quality",
      "--no_near_dedup", "--tokenizer_type=unigram", "--special_tokens=<|user|>"])
  manifest = json.loads((output_dir / records.MANIFEST_NAME).read_text())
  assert manifest["tokenizer"]["model_type"] == "unigram"
  assert "<|user|>" in manifest["tokenizer"]["special_tokens"]
  stages = manifest["settings"]["stages"]
  assert (stages["langid"], stages["quality"], stages["near_dedup"], stages["pii"]) == (
      False, False, False, True)
  assert [row["stage"] for row in manifest["report"]["stages"]] == [
      "read", "normalize", "pii", "exact_dedup"]
  sources = manifest["splits"]["train"]["sources"]
  assert {name: (s["weight"], s["documents"]) for name, s in sources.items()} == {
      "two": (2.0, 2), "snippets": (1.0, 2)}
  assert manifest["settings"]["sources"][0]["profile"] == "code"
  with pytest.raises(SystemExit) as exit_info:
    prepare_text.main([f"--input={root}/code/*.py", f"--output_dir={output_dir}"])
  assert exit_info.value.code == 2
  assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
