"""The pipeline's per-document stages against hand-computed values and brute-force references:
normalize, quality, language ID, PII, MinHash/LSH, and streaming reads of bad input."""

import collections
import gzip
import io
import itertools
import json
import os
import pathlib
import random
import re
import threading
import unicodedata

import numpy as np
import pytest

from beam_pipelines import cleaning
from beam_pipelines import langid
from beam_pipelines import minhash
from beam_pipelines import ngrams
from beam_pipelines import normalize
from beam_pipelines import pii
from beam_pipelines import quality
from beam_pipelines import reading
from beam_pipelines import sources


def test_normalize_nfc_controls_spaces_and_blank_runs():
  raw = "Cafe\u0301\u00a0ok\u200b\r\nline\x07 two \t\r\n\n\n\n\nend\x0c\n"
  assert normalize.normalize_whitespace(raw) == "Café ok\nline two\n\n\nend\n"
  code = "def f():\n\treturn 1\n\n\n"
  assert normalize.normalize_whitespace(code) == code


def reference_normalize(text: str) -> str:
  """normalize_whitespace's definition as one regular expression per rule."""
  text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
  text = re.sub("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]", "", text)
  text = re.sub("[\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]", " ", text)
  text = re.sub("[ \t]+$", "", text, flags=re.MULTILINE)
  return re.sub("\n{4,}", "\n\n\n", text)


def test_normalize_matches_its_definition_on_random_text():
  rng = random.Random(2)
  alphabet = "ab \t\n\r\x00\x0b\x0c\x1f\x7f\x85\xa0\u2003\u200b\ufeffe\u0301\u3000"
  for _ in range(3000):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    assert normalize.normalize_whitespace(text) == reference_normalize(text), repr(text)


def test_boilerplate_lines_are_dropped_but_long_lines_kept():
  long_line = "We explain in detail why " + "many words " * 15 + "all rights reserved"
  text = f"Title\nClick here to subscribe\n{long_line}\n(c) 2024 All Rights Reserved.\nBody"
  assert normalize.drop_boilerplate_lines(text) == (f"Title\n{long_line}\nBody", 2)


def test_quality_signals_match_hand_counts():
  text = ("- the cat sat on the mat\n"
          "- the cat sat on the mat\n"
          "# notes ...\n"
          "dogs bark 42\n")
  signals = quality.quality_signals(text)
  # words: 6 + 1 per bullet line twice, "#", "notes", "...", "dogs", "bark", "42" = 20
  assert signals["words"] == 20
  assert signals["mean_word_length"] == pytest.approx((2 * (1 + 3 + 3 + 3 + 2 + 3 + 3) + 1 + 5
                                                       + 3 + 4 + 4 + 2) / 20)
  assert signals["symbol_word_ratio"] == pytest.approx(2 / 20)  # one "#", one "..."
  assert signals["alpha_word_ratio"] == pytest.approx(15 / 20)  # not "-", "-", "#", "...", "42"
  assert signals["stop_words"] == 4  # "the" four times
  assert signals["bullet_line_ratio"] == pytest.approx(2 / 4)
  assert signals["ellipsis_line_ratio"] == pytest.approx(1 / 4)
  assert signals["duplicate_line_ratio"] == pytest.approx(1 / 4)
  assert signals["duplicate_line_char_ratio"] == pytest.approx(24 / (24 + 24 + 11 + 12))
  # every 2-gram of the bullet line occurs twice; ties go to the first, "- the":
  # 2 occurrences * 4 characters of 55 word characters
  word_chars = 2 * 18 + 1 + 5 + 3 + 4 + 4 + 2
  assert signals["top_2gram_char_ratio"] == pytest.approx(2 * 4 / word_chars)
  # the 7 words of the bullet line repeat: every 5-gram inside them repeats
  assert signals["duplicate_5gram_char_ratio"] == pytest.approx(2 * 18 / word_chars)
  assert signals["duplicate_8gram_char_ratio"] == 0.0


def brute_force_signals(text: str) -> dict[str, float]:
  """The Gopher word and n-gram signals by their definitions, over tuples of words."""
  words = text.split()
  chars = sum(map(len, words))
  signals = {
      "words": len(words),
      "mean_word_length": chars / len(words),
      "alpha_word_ratio": sum(any(c.isalpha() for c in w) for w in words) / len(words),
      "stop_words": sum(w.lower() in quality.STOP_WORDS for w in words)}
  for n in quality.TOP_NGRAM_SIZES + quality.DUPLICATE_NGRAM_SIZES:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = collections.Counter(grams)
    if n in quality.TOP_NGRAM_SIZES:
      most = max(counts.values(), default=0)
      top = next((g for g in grams if counts[g] == most), ())  # ties: the first to occur
      signals[f"top_{n}gram_char_ratio"] = (
          most * sum(map(len, top)) / chars if most >= 2 else 0.0)
    else:
      covered = {i + k for i, g in enumerate(grams) if counts[g] > 1 for k in range(n)}
      signals[f"duplicate_{n}gram_char_ratio"] = sum(len(words[i]) for i in covered) / chars
  return signals


def test_quality_signals_match_brute_force_on_repetitive_text():
  rng = random.Random(3)
  vocabulary = ["the", "The", "of", "cat", "sat", "mat", "42", "--", "x_1", "İl", "naïve",
                "...", "#", "and", "été"]
  for trial in range(150):
    size = rng.choice((1, 3, 12, 60, 300))
    words = [rng.choice(vocabulary[:rng.randrange(2, len(vocabulary))]) for _ in range(size)]
    if trial % 3 == 0:  # plant repeated spans, the n-gram signals' subject
      span = words[:rng.randrange(1, 12)]
      for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(words) + 1)
        words[at:at] = span
    text = "".join(w + rng.choice((" ", "  ", "\n", "\t")) for w in words)
    signals = quality.quality_signals(text)
    for name, value in brute_force_signals(text).items():
      assert signals[name] == pytest.approx(value, abs=1e-12), (name, text)


def test_failed_check_names_the_first_threshold_missed():
  limits = quality.QualityThresholds()
  good = ("The committee met on Tuesday to review the budget for the coming year. Members "
          "discussed several proposals from the staff, including a plan to repair the old "
          "library roof and another to extend the opening hours of the public pool during "
          "the summer. After a long debate about costs, they approved the roof repair and "
          "asked for a more detailed estimate of the pool project before their next meeting.")
  assert quality.failed_check(quality.quality_signals(good), limits) is None
  assert quality.failed_check(quality.quality_signals("too short to matter"), limits) == (
      "too_few_words")
  hashes = " ".join(["#tag"] * 60) + " the and of"
  assert quality.failed_check(quality.quality_signals(hashes), limits) == "symbol_word_ratio"
  repeated = "\n".join(["the same line again and again with words"] * 20)
  assert quality.failed_check(quality.quality_signals(repeated), limits) == "duplicate_lines"


LANGUAGE_SAMPLES = (
    "The weather today is sunny with a light breeze coming from the west.",
    "Le temps aujourd'hui est ensoleillé avec une légère brise venant de l'ouest.",
    "Das Wetter heute ist sonnig mit einer leichten Brise aus dem Westen.")


def test_language_id_uses_the_packaged_model():
  assert [langid.identify_language(t)[0] for t in LANGUAGE_SAMPLES] == ["en", "fr", "de"]
  assert langid.identify_language(LANGUAGE_SAMPLES[0])[1] > 0.9


def test_the_codes_that_flags_are_checked_against_are_those_the_model_returns():
  assert langid.LANGUAGES == set(langid.language_identifier().nb_classes)


def test_unpacked_language_model_answers_as_the_packaged_one():
  texts = LANGUAGE_SAMPLES + ("", "12345 678", "def f(x):\n  return x", "Ciao a tutti, come va?")
  with langid.unpacked_model() as path:  # the first use waits until it is written
    assert langid.language_identifier(path) is not langid.language_identifier()
    assert os.path.exists(path) and not os.path.exists(langid.partial_path(path))
    assert [langid.identify_language(t, path) for t in texts] == [
        langid.identify_language(t) for t in texts]
  assert not os.path.exists(path)
  missing = os.path.join(os.path.dirname(path), "elsewhere.npz")  # a remote worker's view
  assert [langid.identify_language(t, missing) for t in texts] == [
      langid.identify_language(t) for t in texts]


@pytest.mark.parametrize("text, expected", [
    ("mail bob.smith+tag@mail.example.co.uk today", "mail <|email|> today"),
    ("from 192.168.0.1 and 10.0.0.255.", "from <|ip_address|> and <|ip_address|>."),
    ("v6 2001:db8::8a2e:370:7334 here", "v6 <|ip_address|> here"),
    ("call (555) 123-4567 or +44 20 7946 0958", "call <|phone|> or <|phone|>"),
    ("version 3.12.1, 1.2.3.4.5, 999.1.1.1, x[::2], std::vector, 2024-01-15",
     "version 3.12.1, 1.2.3.4.5, 999.1.1.1, x[::2], std::vector, 2024-01-15"),
])
def test_pii_placeholders(text, expected):
  assert pii.scrub(text)[0] == expected


def test_pii_scrub_equals_whole_text_substitution():
  """Scrubbing only hinted lines (and hinting ASCII text through a digits-as-zero view) must
  replace exactly what each strict pattern finds in the whole text."""
  rng = random.Random(5)
  pieces = ["555", "123", "4567", "-", ".", " ", "+", "44", "(20)", "\n", "a@b.io", "x",
            "10.0.0.1", "2001:db8::1", ":", "٣٤٥", "é", "7", "+44 20 79 46", "+1.55.12"]
  for _ in range(4000):
    text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 25)))
    expected, counts = text, {}
    for kind, patterns, token in (("email", [pii._EMAIL], pii.EMAIL_TOKEN),
                                  ("ip_address", [pii._IPV4, pii._IPV6], pii.IP_TOKEN),
                                  ("phone", [pii._PHONE], pii.PHONE_TOKEN)):
      for pattern in patterns:
        expected, count = pattern.subn(token, expected)
        counts[kind] = counts.get(kind, 0) + count
    assert pii.scrub(text) == (expected, counts), repr(text)


def test_pii_counts_by_kind():
  _, counts = pii.scrub("a@b.io c@d.org 8.8.8.8\n555-123-4567")
  assert counts == {"email": 2, "ip_address": 1, "phone": 1}


def brute_force_jaccard(a: str, b: str, n: int = minhash.SHINGLE_WORDS) -> float:
  def grams(text):
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
  x, y = grams(a), grams(b)
  return len(x & y) / len(x | y)


def test_word_hashes_depend_on_the_word_alone():
  rng = random.Random(4)
  words = list({"".join(rng.choice("ab\u00e9\U0001f600") for _ in range(rng.randrange(1, 9)))
                for _ in range(3000)}) + ["x" * 5000, "\ud800"]
  hashes = ngrams.word_hashes(words)
  assert len(set(hashes.tolist())) == len(words)  # distinct words, distinct hashes
  shuffled = rng.sample(range(len(words)), len(words))
  again = ngrams.word_hashes([words[i] for i in shuffled] + words[:5])
  assert again.tolist() == [hashes[i] for i in shuffled] + hashes[:5].tolist()


def test_minhash_estimates_brute_force_jaccard():
  rng = random.Random(0)
  vocabulary = [f"w{i}" for i in range(5000)]
  a, b = minhash.permutations(256, seed=1)
  for edits in (0, 5, 20, 60, 150, 400):
    words = [rng.choice(vocabulary) for _ in range(600)]
    edited = list(words)
    for i in rng.sample(range(len(words)), edits):
      edited[i] = "changed" + str(i)
    x, y = " ".join(words), " ".join(edited)
    estimate = minhash.estimated_jaccard(minhash.signature(minhash.shingles(x), a, b),
                                         minhash.signature(minhash.shingles(y), a, b))
    assert estimate == pytest.approx(brute_force_jaccard(x, y), abs=0.1)


def test_lsh_bands_catch_pairs_at_the_threshold():
  for threshold in (0.5, 0.7, 0.8, 0.9):
    bands, rows = minhash.lsh_bands(threshold, 128)
    assert bands * rows <= 128
    assert minhash.candidate_probability(threshold, bands, rows) >= 0.95
    assert minhash.candidate_probability(threshold - 0.4, bands, rows) < 0.1
  sig = np.arange(128, dtype=np.uint32)
  other = sig.copy()
  other[0] = 999  # differs in band 0 only
  keys, other_keys = minhash.band_keys(sig, 18, 7), minhash.band_keys(other, 18, 7)
  assert [k == o for k, o in zip(keys, other_keys)] == [False] + [True] * 17


class ReadLimitRecorder(io.BytesIO):
  """Records the largest read or readline request, to prove reads are bounded."""

  largest = 0

  def readline(self, size=-1):
    self.largest = max(self.largest, size if size >= 0 else 2**62)
    return super().readline(size)

  def read(self, size=-1):
    self.largest = max(self.largest, size if size >= 0 else 2**62)
    return super().read(size)


def test_a_huge_jsonl_line_is_skipped_in_bounded_reads():
  huge = json.dumps({"text": "x" * 3_000_000}).encode()
  data = b"\n".join([json.dumps({"text": "first"}).encode(), huge,
                     json.dumps({"text": "after"}).encode()]) + b"\n"
  f = ReadLimitRecorder(data)
  items = list(reading.read_jsonl(f, max_bytes=100_000))
  assert items == [reading.Text(1, "first"), reading.Rejected(2, "too_long"),
                   reading.Text(3, "after")]
  assert f.largest <= max(100_001, reading.READ_CHUNK)


def test_a_huge_file_is_rejected_after_reading_only_the_limit():
  f = ReadLimitRecorder(b"y" * 3_000_000)
  assert list(reading.read_whole_file(f, max_bytes=100_000)) == [reading.Rejected(0, "too_long")]
  assert f.largest == 100_001


def test_bad_jsonl_lines_are_rejected_by_reason(tmp_path):
  lines = [b'{"text": "ok"}', b'{"text": "broken', b'{"body": 1}', b'["text"]',
           b'{"text": ""}', b'{"text": "caf\xe9"}', b'{"text": "\\ud800"}', b"", b'{"text": 5}',
           b'{"text": ["a", "b"]}', b'{"text": null}', b'"text"']
  path = tmp_path / "mixed.jsonl.gz"
  path.write_bytes(gzip.compress(b"\n".join(lines)))
  not_a_string = "the 'text' field is a JSON {}, not a string"
  not_an_object = "the row is a JSON {}, not an object with a 'text' field"
  assert list(reading.read_file(str(path), 1000)) == [
      reading.Text(1, "ok"), reading.Rejected(2, "malformed_json"),
      reading.Rejected(3, "missing_text"),
      reading.Rejected(4, "not_an_object", not_an_object.format("array")),
      reading.Rejected(5, "empty"), reading.Rejected(6, "invalid_utf8"),
      reading.Rejected(7, "invalid_utf8"),
      reading.Rejected(9, "text_not_a_string", not_a_string.format("number")),
      reading.Rejected(10, "text_not_a_string", not_a_string.format("array")),
      reading.Rejected(11, "missing_text"),
      reading.Rejected(12, "not_an_object", not_an_object.format("string"))]


def test_whole_files_binary_invalid_empty_and_truncated_gzip(tmp_path):
  cases = {"bin.dat": b"\x89PNG\r\n\x1a\n\x00\x00", "latin1.txt": b"caf\xe9",
           "blank.txt": b"  \n\t", "ok.txt": "naïve text\n".encode()}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
  letters = random.Random(0).choices("abcdefghij \n", k=20_000)
  (tmp_path / "cut.txt.gz").write_bytes(gzip.compress("".join(letters).encode())[:200])
  read = {name: list(reading.read_file(str(tmp_path / name), 1000))
          for name in itertools.chain(cases, ["cut.txt.gz"])}
  assert read == {"bin.dat": [reading.Rejected(0, "binary")],
                  "latin1.txt": [reading.Rejected(0, "invalid_utf8")],
                  "blank.txt": [reading.Rejected(0, "empty")],
                  "ok.txt": [reading.Text(0, "naïve text\n")],
                  "cut.txt.gz": [reading.Rejected(0, "unreadable", "Compressed file ended "
                                                  "before the end-of-stream marker was reached")]}


def test_a_dead_letter_carries_its_rejections_detail_where_there_is_one():
  unit = sources.ReadUnit("web", "/data/cut.jsonl.gz")
  assert json.loads(cleaning.dead_letter_line(unit, reading.Rejected(0, "unreadable", "cut"))) == {
      "source": "web", "file": "/data/cut.jsonl.gz", "line": 0, "reason": "unreadable",
      "detail": "cut"}
  assert "detail" not in json.loads(cleaning.dead_letter_line(unit, reading.Rejected(3, "empty")))


def read_or_fail_after(path: str, seconds: float = 5.0) -> list:
  """reading.read_file's items; a read still blocked after `seconds` is released by opening the
  FIFO for writing, and the test fails instead of hanging."""
  items = []
  reader = threading.Thread(target=lambda: items.extend(reading.read_file(path, 1000)),
                            daemon=True)
  reader.start()
  reader.join(seconds)
  if reader.is_alive():
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    reader.join()
    pytest.fail(f"reading {path} blocked for {seconds} s")
  return items


def non_regular_inputs(root) -> dict[str, list]:
  """Writes a regular file, a link to it and each kind of entry that is no regular file; returns
  what reading each should give."""
  (root / "ok.txt").write_text("plain text\n")
  (root / "link.txt").symlink_to(root / "ok.txt")
  (root / "x.txt").mkdir()
  (root / "x.txt" / "inside.txt").write_text("not matched by *.txt\n")
  (root / "dangling.txt").symlink_to(root / "nowhere.txt")
  (root / "loop_a.txt").symlink_to(root / "loop_b.txt")
  (root / "loop_b.txt").symlink_to(root / "loop_a.txt")
  os.mkfifo(root / "pipe.txt")
  text = [reading.Text(0, "plain text\n")]
  return {"ok.txt": text, "link.txt": text, "x.txt": [reading.Rejected(0, "directory")],
          "dangling.txt": [reading.Rejected(0, "dangling_symlink")],
          "loop_a.txt": [reading.Rejected(0, "symlink_loop")],
          "loop_b.txt": [reading.Rejected(0, "symlink_loop")],
          "pipe.txt": [reading.Rejected(0, "fifo")]}


def test_a_glob_matches_non_regular_entries_and_reading_rejects_each_by_kind(tmp_path):
  expected = non_regular_inputs(tmp_path)
  matched = sources.match_files([f"{tmp_path}/*.txt"])
  assert matched == {str(tmp_path / name): (11 if name in ("ok.txt", "link.txt") else 0)
                     for name in expected}
  assert {name: read_or_fail_after(str(tmp_path / name)) for name in expected} == expected
  assert sources.match_files([f"{tmp_path}/x.txt"]) == {str(tmp_path / "x.txt"): 0}


def test_a_trailing_double_star_lists_files_not_directories(tmp_path):
  non_regular_inputs(tmp_path)
  matched = sources.match_files([f"{tmp_path}/**"])
  assert sorted(pathlib.Path(p).relative_to(tmp_path).as_posix() for p in matched) == [
      "dangling.txt", "link.txt", "loop_a.txt", "loop_b.txt", "ok.txt", "pipe.txt",
      "x.txt/inside.txt"]


def test_a_fifo_swapped_in_after_the_stat_is_rejected_without_blocking(tmp_path, monkeypatch):
  os.mkfifo(tmp_path / "pipe.txt")
  monkeypatch.setattr(reading, "kind_of_path", lambda path: None)  # the stat saw a regular file
  assert read_or_fail_after(str(tmp_path / "pipe.txt")) == [reading.Rejected(0, "fifo")]


def test_auto_profile_treats_source_files_as_code():
  assert not sources.is_prose("auto", "/src/lib/util.py")
  assert not sources.is_prose("auto", "/src/main.RS")
  assert sources.is_prose("auto", "/docs/readme.txt")
  assert sources.is_prose("auto", "/data/lines.jsonl.gz:12")
  assert sources.is_prose("prose", "/src/lib/util.py")
  assert not sources.is_prose("code", "/docs/readme.txt")


@pytest.mark.parametrize("flag, expected", [
    ("web=a/*.txt", sources.Source("web", ("a/*.txt",))),
    ("web:2.5=a/*.txt, tfds:mnist:test", sources.Source("web", ("a/*.txt", "tfds:mnist:test"), 2.5)),
    ("src:1:code=x/**/*.py", sources.Source("src", ("x/**/*.py",), 1.0, "code")),
])
def test_source_flags(flag, expected):
  assert sources.parse_source(flag) == expected


@pytest.mark.parametrize("flag, message", [
    ("noequals", "must look like"), ("bad name=x", "letters, digits"),
    ("w:-1=x", "positive"), ("w:1:poetry=x", "profile"), ("w:heavy=x", "weight"),
])
def test_bad_source_flags_name_the_fix(flag, message):
  with pytest.raises(ValueError, match=message):
    sources.parse_source(flag)


def test_quality_thresholds_flag():
  limits = quality.thresholds_from_flag("min_words=20, max_symbol_word_ratio=0.25")
  assert (limits.min_words, limits.max_symbol_word_ratio) == (20, 0.25)
  assert limits.max_words == quality.QualityThresholds().max_words
  with pytest.raises(ValueError, match="no field 'min_wrods'"):
    quality.thresholds_from_flag("min_wrods=3")
  signals = quality.quality_signals("A short but otherwise fine sentence with the words.")
  assert quality.failed_check(signals, quality.QualityThresholds()) == "too_few_words"
  assert quality.failed_check(signals, quality.thresholds_from_flag("min_words=5")) is None


def test_clusters_keep_one_document_per_connected_component():
  from beam_pipelines import dedup  # pylint: disable=import-outside-toplevel
  chain = [(5, "b", 9, "c"), (1, "a", 5, "b"), (20, "d", 30, "e"), (7, "x", 7, "y")]
  for pairs in (chain, chain[::-1]):
    assert dedup.clusters(pairs) == {(5, "b"): "a", (9, "c"): "a", (30, "e"): "d", (7, "y"): "x"}
  candidates = dedup.CandidateSet()
  accumulators = [candidates.add_input(candidates.create_accumulator(), pair)
                  for pair in chain + chain[:2]]
  merged = candidates.extract_output(candidates.merge_accumulators(accumulators))
  assert merged == dedup.Candidates(set(chain), {1, 5, 9, 20, 30, 7})
  removed = dedup.clusters(chain)
  # a-b-c is one cluster though a and c were never compared; x and y are identical texts
  assert removed == {(5, "b"): "a", (9, "c"): "a", (30, "e"): "d", (7, "y"): "x"}
