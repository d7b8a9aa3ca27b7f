"""The full prepare_text pipeline against SentencePiece alone, on >= 20 MB of real text.

  python benchmarks/pipeline.py --json

The corpus is what every Debian machine with Python has: the standard library's sources (code
profile), its pydoc topics and /usr/share/doc's Markdown, reStructuredText and text files
(prose profile). Planted on top, in known pairs: exact copies, and near copies with 1% of the
words replaced (word 5-gram Jaccard checked by brute force to be >= threshold + 0.05).

Runs the in-process FnApiRunner in multi-processing mode with 2 workers, then encodes the same
input text with the tokenizer the run trained, in this one process without Beam. Throughput is
measured on the input both processed: tokens_per_s is the input's token count (as bare
SentencePiece counts it) over the pipeline's wall time, so ratio_vs_bare_spm = bare seconds /
pipeline seconds. output_tokens_per_s counts only the tokens written (the pipeline drops
filtered and duplicate text), and ratio_output_tokens_vs_bare_spm compares that with bare
SentencePiece.
Before planting, every pair of real documents at or above the near-duplicate threshold is found
by brute force and one of each is left out, so the planted pairs are the only duplicates.
"""

import argparse
import collections
import glob
import json
import math
import os
import pathlib
import random
import sys
import tempfile
import time

import sentencepiece as spm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

from beam_pipelines import prepare_text
from beam_pipelines import langid
from beam_pipelines import quality
from beam_pipelines import stage_report
from beam_pipelines.normalize import normalize_whitespace
from beam_pipelines.sources import Source
from maxlm import default_corpus

DOC_GLOBS = ("/usr/share/doc/**/*.md", "/usr/share/doc/**/*.rst", "/usr/share/doc/**/*.txt")
MIN_PLANT_WORDS = 200
EDIT_FRACTION = 0.01


def word_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
  words = text.split()
  return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str) -> float:
  """Brute force over word 5-gram sets: the reference MinHash estimates."""
  x, y = word_shingles(a), word_shingles(b)
  return len(x & y) / len(x | y)


def natural_duplicates(texts: dict[str, str], threshold: float) -> set[str]:
  """Ids to leave out so that no two remaining texts reach `threshold` word 5-gram Jaccard
  (exact duplicates included): then the planted pairs are the only duplicates. Every pair that
  could reach the threshold is checked exactly; prefix filtering only skips pairs that cannot
  share enough shingles (two sets with Jaccard >= t share one of each set's
  |S| - ceil(t |S|) + 1 rarest shingles)."""
  shingles = {doc: {hash(g) for g in word_shingles(normalize_whitespace(t))}
              for doc, t in texts.items()}
  frequency = collections.Counter(g for grams in shingles.values() for g in grams)
  index = collections.defaultdict(list)
  for doc, grams in shingles.items():
    prefix = sorted(grams, key=lambda g: (frequency[g], g))[:len(grams) - math.ceil(
        threshold * len(grams)) + 1]
    for g in prefix:
      index[g].append(doc)
  excluded = set()
  checked = set()
  for docs in index.values():
    for i, a in enumerate(docs):
      for b in docs[i + 1:]:
        if (a, b) in checked or a in excluded or b in excluded:
          continue
        checked.add((a, b))
        x, y = shingles[a], shingles[b]
        if min(len(x), len(y)) >= threshold * max(len(x), len(y)) and (
            len(x & y) >= threshold * len(x | y)):
          excluded.add(max(a, b))
  return excluded


def near_copy(text: str, rng: random.Random) -> str:
  """The text with EDIT_FRACTION of its words replaced by other words of the same text,
  line structure kept."""
  lines = [line.split(" ") for line in text.split("\n")]
  slots = [(i, j) for i, line in enumerate(lines) for j, word in enumerate(line) if word]
  vocabulary = [lines[i][j] for i, j in slots]
  for i, j in rng.sample(slots, max(1, int(EDIT_FRACTION * len(slots)))):
    lines[i][j] = rng.choice(vocabulary) + "x"
  return "\n".join(" ".join(line) for line in lines)


def read_text(path: str) -> str | None:
  try:
    return pathlib.Path(path).read_text(encoding="utf-8")
  except (UnicodeDecodeError, OSError):
    return None


def doc_files(budget_bytes: int) -> list[str]:
  files = sorted({path for pattern in DOC_GLOBS for path in glob.glob(pattern, recursive=True)
                  if os.path.isfile(path) and not os.path.islink(path)})
  chosen, total = [], 0
  for path in files:
    if total >= budget_bytes:
      break
    chosen.append(path)
    total += os.path.getsize(path)
  return chosen


def passes_prose_filters(text: str) -> bool:
  text = normalize_whitespace(text)
  if quality.failed_check(quality.quality_signals(text), quality.QualityThresholds()):
    return False
  language, score = langid.identify_language(text)
  return language == "en" and score >= 0.5


def plant(bases: list[tuple[str, str]], count: int, out_dir: pathlib.Path, kind: str,
          rng: random.Random, threshold: float) -> list[tuple[str, str]]:
  """Writes `count` copies (exact, or near with Jaccard >= threshold + 0.05) of distinct bases
  into out_dir; returns (base path, planted path) pairs."""
  out_dir.mkdir(parents=True, exist_ok=True)
  pairs = []
  for base_path, text in bases:
    if len(pairs) == count:
      break
    copy = text if kind == "exact" else near_copy(text, rng)
    if kind == "near" and jaccard(text, copy) < threshold + 0.05:
      continue
    planted = out_dir / f"{kind}-{len(pairs):04d}.txt"
    planted.write_text(copy, encoding="utf-8")
    pairs.append((base_path, str(planted)))
  return pairs


def write_topics(path: pathlib.Path, topics: dict[str, str]) -> pathlib.Path:
  with open(path, "w", encoding="utf-8") as out:
    for name, text in topics.items():
      out.write(json.dumps({"text": text, "topic": name}) + "\n")
  return path


def build_corpus(root: pathlib.Path, min_mb: float, pairs_per_kind: int, threshold: float,
                 seed: int):
  """Sources over real files (natural duplicates left out) plus planted copies; returns
  (sources, {"exact": [(base, copy)], "near": [...]}, number of natural duplicates left out,
  {origin: text} of every document)."""
  from pydoc_data import topics as pydoc_topics  # pylint: disable=import-outside-toplevel
  rng = random.Random(seed)
  code_files = sorted({p for g in default_corpus.stdlib_source_globs()
                       for p in glob.glob(g, recursive=True)})
  code_bytes = sum(os.path.getsize(p) for p in code_files)
  docs = doc_files(int(min_mb * 1e6) - code_bytes)
  texts = {p: t for p in code_files + docs if (t := read_text(p)) is not None and t.strip()}
  texts |= {f"topic:{name}": text for name, text in pydoc_topics.topics.items()}
  excluded = natural_duplicates(texts, threshold)
  texts = {doc: text for doc, text in texts.items() if doc not in excluded}
  topics = {doc: text for doc, text in texts.items() if doc.startswith("topic:")}
  topics_path = write_topics(root / "pydoc-topics.jsonl",
                             {doc.removeprefix("topic:"): text for doc, text in topics.items()})
  by_origin = {doc: text for doc, text in texts.items() if not doc.startswith("topic:")}
  by_origin |= {f"{topics_path}:{line}": text for line, text in enumerate(topics.values(), 1)}
  code_texts = [(p, texts[p]) for p in code_files if p in texts
                and len(texts[p].split()) >= MIN_PLANT_WORDS]
  prose_texts = [(p, texts[p]) for p in docs if p in texts
                 and len(texts[p].split()) >= MIN_PLANT_WORDS and passes_prose_filters(texts[p])]
  rng.shuffle(code_texts)
  rng.shuffle(prose_texts)
  half = pairs_per_kind // 2
  pairs = {"exact": [], "near": []}
  for kind, offset in (("exact", 0), ("near", half)):
    pairs[kind] += plant(code_texts[offset * 2:], half, root / "planted_code", kind, rng,
                         threshold)
    pairs[kind] += plant(prose_texts[offset * 2:], pairs_per_kind - half, root / "planted_prose",
                         kind, rng, threshold)
  sources = [
      Source("code", tuple(p for p in code_files if p in texts), weight=1.0, profile="code"),
      Source("docs", (str(topics_path), *(p for p in docs if p in texts)), weight=1.0,
             profile="prose"),
      Source("planted_code", (f"{root}/planted_code/*.txt",), profile="code"),
      Source("planted_prose", (f"{root}/planted_prose/*.txt",), profile="prose"),
  ]
  for kind in pairs:
    by_origin |= {copy: pathlib.Path(copy).read_text(encoding="utf-8") for _, copy in pairs[kind]}
  return sources, pairs, len(excluded), by_origin


def input_texts(sources: list[Source]) -> list[str]:
  """Every input document as bare SentencePiece would see it (JSONL lines' text fields)."""
  texts = []
  for source in sources:
    for pattern in source.inputs:
      for path in sorted(glob.glob(pattern, recursive=True)):
        if path.endswith(".jsonl"):
          texts += [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
        else:
          texts.append(pathlib.Path(path).read_text(encoding="utf-8", errors="replace"))
  return texts


def duplicate_metrics(output_dir: str, pairs: dict, texts: dict[str, str]) -> dict:
  """Recall: planted pairs whose members ended in one cluster (one removed, kept as the other
  or both kept as the same document). Precision: removals that belong to a planted pair, of all
  removals (the corpus has no other duplicates at the threshold)."""
  kept = {"exact": {}, "near": {}}
  with open(os.path.join(output_dir, stage_report.DUPLICATES_NAME), encoding="utf-8") as f:
    for line in f:
      entry = json.loads(line)
      kept[entry["kind"]][entry["origin"]] = entry["kept"]
  metrics = {}
  for kind in ("exact", "near"):
    removed = kept[kind]
    found = [(a, b) for a, b in pairs[kind]
             if removed.get(a) == b or removed.get(b) == a
             or (a in removed and removed.get(a) == removed.get(b))]
    planted_members = {doc for pair in pairs[kind] for doc in pair}
    metrics[f"{kind}_dup_recall"] = len(found) / max(1, len(pairs[kind]))
    metrics[f"{kind}_dup_removed"] = len(removed)
    metrics[f"{kind}_dup_precision"] = (
        sum(doc in planted_members for doc in removed) / max(1, len(removed)))
    metrics[f"{kind}_dup_false_positive_jaccard"] = sorted(
        round(jaccard(normalize_whitespace(texts[doc]), normalize_whitespace(texts[other])), 3)
        for doc, other in removed.items() if doc not in planted_members)
  return metrics


def bare_spm(model_file: str, texts: list[str]) -> tuple[float, int]:
  sp = spm.SentencePieceProcessor(model_file=model_file)
  start = time.perf_counter()
  ids = sp.encode(texts, num_threads=os.cpu_count() or 1)
  seconds = time.perf_counter() - start
  return seconds, sum(len(i) + 2 for i in ids)  # + bos, eos as the pipeline counts them


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object last")
  parser.add_argument("--min_mb", type=float, default=22.0)
  parser.add_argument("--pairs", type=int, default=200, help="planted pairs of each kind")
  parser.add_argument("--near_dup_threshold", type=float, default=0.8)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--spm_sample_bytes", type=int, default=2_000_000)
  parser.add_argument("--vocab_size", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  flags = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
    root = pathlib.Path(tmp)
    sources, pairs, excluded, texts_by_origin = build_corpus(
        root, flags.min_mb, flags.pairs, flags.near_dup_threshold, flags.seed)
    texts = input_texts(sources)
    input_bytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
    output_dir = str(root / "out")
    start = time.perf_counter()
    manifest = prepare_text.run(
        sources, output_dir, vocab_size=flags.vocab_size, seq_len=1024,
        spm_sample_bytes=flags.spm_sample_bytes,
        stages=prepare_text.StageFlags(near_dup_threshold=flags.near_dup_threshold),
        beam_args=["--direct_running_mode=multi_processing",
                   f"--direct_num_workers={flags.workers}"])
    pipeline_seconds = time.perf_counter() - start
    bare_seconds, bare_tokens = bare_spm(os.path.join(output_dir, "tokenizer.model"), texts)
    dup = duplicate_metrics(output_dir, pairs, texts_by_origin)
  report = manifest["report"]
  tokens = sum(s["tokens"] for s in manifest["splits"].values())
  documents = report["stages"][0]["docs_out"]
  result = {
      "input_mb": round(input_bytes / 1e6, 2),
      "input_documents": documents,
      "output_documents": sum(s["documents"] for s in manifest["splits"].values()),
      "pipeline_seconds": round(pipeline_seconds, 2),
      "docs_per_s": round(documents / pipeline_seconds, 1),
      "tokens_per_s": round(bare_tokens / pipeline_seconds),
      "output_tokens_per_s": round(tokens / pipeline_seconds),
      "spm_bare_seconds": round(bare_seconds, 2),
      "spm_bare_tokens_per_s": round(bare_tokens / bare_seconds),
      "ratio_vs_bare_spm": round(bare_seconds / pipeline_seconds, 3),
      "ratio_output_tokens_vs_bare_spm": round(
          (tokens / pipeline_seconds) / (bare_tokens / bare_seconds), 3),
      "near_dup_recall": round(dup["near_dup_recall"], 4),
      "near_dup_precision": round(dup["near_dup_precision"], 4),
      "exact_dup_recall": round(dup["exact_dup_recall"], 4),
      "exact_dup_precision": round(dup["exact_dup_precision"], 4),
      "near_dup_removed": dup["near_dup_removed"],
      "near_dup_false_positive_jaccard": dup["near_dup_false_positive_jaccard"],
      "exact_dup_removed": dup["exact_dup_removed"],
      "planted_pairs": {kind: len(p) for kind, p in pairs.items()},
      "natural_duplicates_left_out": excluded,
      "stage_busy_seconds": report["busy_seconds"],
      "packing_efficiency": round(report["packing_efficiency"], 4),
      "workers": flags.workers,
      "cpus": os.cpu_count(),
  }
  print(f"pipeline {pipeline_seconds:.1f}s vs bare SentencePiece {bare_seconds:.1f}s on "
        f"{result['input_mb']} MB; near-dup recall {result['near_dup_recall']}, precision "
        f"{result['near_dup_precision']}", file=sys.stderr)
  if flags.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
