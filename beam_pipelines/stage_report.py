"""Per-stage Beam metrics (documents and bytes in/out, drops by reason) and the run report
built from them: a table printed at the end and written as report.md and into manifest.json."""

import collections
import contextlib
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics, MetricsFilter

from beam_pipelines import dataset_manifest
from beam_pipelines import staging
from beam_pipelines.documents import METRICS_NAMESPACE

STAGES = ("read", "normalize", "langid", "quality", "pii", "exact_dedup", "near_dedup",
          "train_tokenizer", "tokenize", "pack")
REPORT_NAME = "report.md"
DEAD_LETTER_NAME = "dead_letter.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"
KEPT_WITHOUT_SEQUENCES = (DEAD_LETTER_NAME, DUPLICATES_NAME, REPORT_NAME)


def count(stage: str, name: str, value: int = 1) -> None:
  Metrics.counter(METRICS_NAMESPACE, f"{stage}:{name}").inc(value)


@contextlib.contextmanager
def timed(stage: str):
  """Adds the block's wall time to the stage's `busy_us`, summed over workers (microseconds:
  per-call milliseconds rounded the many sub-millisecond reads and scrubs to nothing)."""
  start = time.perf_counter()
  try:
    yield
  finally:
    count(stage, "busy_us", round(1e6 * (time.perf_counter() - start)))


def count_in(stage: str, size: int) -> None:
  count(stage, "docs_in")
  count(stage, "bytes_in", size)


def count_out(stage: str, size: int) -> None:
  count(stage, "docs_out")
  count(stage, "bytes_out", size)


def count_drop(stage: str, reason: str) -> None:
  count(stage, f"dropped:{reason}")


def count_file(stage: str, rows: int) -> None:
  """One input file read, and whether it held no rows (0 bytes, or blank lines only)."""
  count(stage, "files_in")
  if not rows:
    count(stage, "empty_files")


def counter_totals(result) -> dict[str, int]:
  """{`stage:name`: value} summed over steps, from a finished pipeline's metrics."""
  query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
  totals = {}
  for counter in query["counters"]:
    value = counter.committed if counter.committed is not None else counter.attempted
    totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
  return totals


def stage_rows(totals: dict[str, int], read_bytes_in: int) -> list[dict]:
  """One row per stage that ran: documents and bytes in and out, drops by reason, and other
  counts (boilerplate lines, PII replacements). Reading counts files' bytes in."""
  rows = []
  for stage in STAGES:
    prefix = f"{stage}:"
    counts = {name[len(prefix):]: value for name, value in totals.items()
              if name.startswith(prefix)}
    if not counts.keys() - {"busy_us"}:
      continue
    dropped = {name.split(":", 1)[1]: value for name, value in sorted(counts.items())
               if name.startswith("dropped:")}
    row = {"stage": stage, "docs_in": counts.get("docs_in", 0),
           "bytes_in": counts.get("bytes_in", 0), "docs_out": counts.get("docs_out", 0),
           "bytes_out": counts.get("bytes_out", 0), "dropped": dropped}
    if stage == "read":
      row["docs_in"] = row["docs_out"] + sum(dropped.values())
      row["bytes_in"] = read_bytes_in
    row["other"] = {name: value for name, value in sorted(counts.items())
                    if name not in row and not name.startswith("dropped:")}
    rows.append(row)
  return rows


def build_report(manifest: dict, totals: dict[str, int], read_bytes_in: int,
                 seconds: float) -> dict:
  splits = manifest["splits"]
  non_pad = sum(s["tokens"] for s in splits.values())
  slots = sum(s["sequences"] for s in splits.values()) * manifest["seq_len"]
  return {
      "stages": stage_rows(totals, read_bytes_in),
      "duplicates_removed": {"exact": totals.get("exact_dedup:dropped:duplicate", 0),
                             "near": totals.get("near_dedup:dropped:near_duplicate", 0)},
      "dead_letters": sum(v for k, v in totals.items() if k.startswith("read:dropped:")),
      "tokens_per_source": {name: entry["tokens"]
                            for name, entry in splits["train"].get("sources", {}).items()},
      "sequences": {name: s["sequences"] for name, s in splits.items()},
      "packing_efficiency": non_pad / slots if slots else 0.0,
      "busy_seconds": {stage: round(totals.get(f"{stage}:busy_us", 0) / 1e6, 3)
                       for stage in STAGES},
      "seconds": round(seconds, 2),
  }


def vocab_size(manifest: dict) -> int | str:
  """The tokenizer's, or `none` where no tokenizer could be trained."""
  return manifest["tokenizer"]["vocab_size"] if manifest["tokenizer"] else "none"


def report_markdown(manifest: dict) -> str:
  report = manifest["report"]
  lines = ["| stage | docs in | docs out | MB in | MB out | busy s | dropped |",
           "|---|---:|---:|---:|---:|---:|---|"]
  for row in report["stages"]:
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in row["dropped"].items()) or "-"
    lines.append(f"| {row['stage']} | {row['docs_in']:,} | {row['docs_out']:,} | "
                 f"{row['bytes_in'] / 1e6:.2f} | {row['bytes_out'] / 1e6:.2f} | "
                 f"{row['other'].get('busy_us', 0) / 1e6:.1f} | {dropped} |")
  duplicates = report["duplicates_removed"]
  busy = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in report["busy_seconds"].items()
                   if seconds)
  read = next((row["other"] for row in report["stages"] if row["stage"] == "read"), {})
  lines += ["", f"input files: {read.get('files_in', 0):,} ({read.get('empty_files', 0):,} "
            "empty)",
            f"busy time summed over workers: {busy}",
            f"duplicates removed: {duplicates['exact']:,} exact, {duplicates['near']:,} near; "
            f"dead letters: {report['dead_letters']:,} ({DEAD_LETTER_NAME})", "",
            "| split / source | documents | tokens | sequences | shards |",
            "|---|---:|---:|---:|---:|"]
  for name, split in manifest["splits"].items():
    lines.append(f"| {name} | {split['documents']:,} | {split['tokens']:,} | "
                 f"{split['sequences']:,} | {len(split['shards'])} |")
    for source, entry in split.get("sources", {}).items():
      lines.append(f"| {name}/{source} (weight {entry['weight']:g}) | {entry['documents']:,} | "
                   f"{entry['tokens']:,} | {entry['sequences']:,} | {len(entry['shards'])} |")
  lines += ["", f"packing efficiency (non-pad / all tokens): {report['packing_efficiency']:.4f}; "
            f"seq_len {manifest['seq_len']}, vocab {vocab_size(manifest)}, "
            f"train unigram entropy {manifest['unigram_entropy_nats']:.3f} nats; "
            f"{report['seconds']:.1f}s"]
  return "\n".join(lines) + "\n"


def files_read(totals: dict[str, int]) -> tuple[int, int]:
  """(input files read, those with no rows) of every stage that counts them."""
  return (sum(v for k, v in totals.items() if k.endswith(":files_in")),
          sum(v for k, v in totals.items() if k.endswith(":empty_files")))


def rows_in(totals: dict[str, int]) -> int:
  """Rows read, of every kind, by the stages that count `rows_in` (chat and images)."""
  return sum(v for k, v in totals.items() if k.split(":")[1:2] == ["rows_in"])


def dropped_by_reason(totals: dict[str, int]) -> dict[str, int]:
  """Every stage's drops summed by reason, the most first (then by name)."""
  dropped = collections.Counter()
  for name, value in totals.items():
    _, kind, reason = (name.split(":", 2) + ["", ""])[:3]
    if kind == "dropped" and value:
      dropped[reason] += value
  return dict(sorted(dropped.items(), key=lambda reason_and_n: (-reason_and_n[1],
                                                                reason_and_n[0])))


def plural(n: int, noun: str) -> str:
  return f"{n:,} {noun}{'' if n == 1 else 's'}"


def intake_summary(noun: str, rows: int, totals: dict[str, int]) -> str:
  """What a run read and where it went, e.g. `3 rows read from 2 files (1 empty), all
  dropped: 2 too_long, 1 unreadable`; rows not dropped were held out for validation."""
  files, empty = files_read(totals)
  summary = f"{plural(rows, noun)} read"
  if files:
    summary += f" from {plural(files, 'file')}" + (f" ({empty:,} empty)" if empty else "")
  if not rows:
    return summary
  dropped = dropped_by_reason(totals)
  reasons = ", ".join(f"{n:,} {reason}" for reason, n in dropped.items())
  held_out = rows - sum(dropped.values())
  if held_out <= 0:
    return f"{summary}, all dropped: {reasons}"
  dropped_part = f"{sum(dropped.values()):,} dropped ({reasons}), " if dropped else ""
  return (f"{summary}: {dropped_part}{held_out:,} held out for validation, none left to train "
          "on (lower --validation_fraction or add input)")


def no_train_sequences(staged: str, output_dir: str, summary: str) -> staging.Unpublished:
  """The error of a run whose train split came out empty; `staged` keeps only its reports."""
  return staging.Unpublished(
      f"no train sequences were produced: {summary}; see "
      f"{FileSystems.join(staged, DEAD_LETTER_NAME)} and {REPORT_NAME} beside it "
      f"(--output_dir {output_dir} is as it was)", KEPT_WITHOUT_SEQUENCES)


def finish_staged(staged: str, output_dir: str, result, started: float, build_report,
                  report_markdown) -> tuple[dict, str]:
  """After a chat or image pipeline has run into `staged`: an empty dead-letter file when no
  row went there, the report (`build_report(manifest, totals, seconds)`) in the manifest and
  `report.md` (`report_markdown(manifest)`). Returns (manifest, the report's table), or
  raises `no_train_sequences` when the train split is empty."""
  result.wait_until_finish()
  dead_letter = FileSystems.join(staged, DEAD_LETTER_NAME)
  if not FileSystems.exists(dead_letter):
    dataset_manifest.write_atomically(dead_letter, b"")
  manifest = dataset_manifest.read_manifest(staged)
  totals = counter_totals(result)
  manifest["report"] = build_report(manifest, totals, time.perf_counter() - started)
  dataset_manifest.write_manifest(staged, manifest)
  table = report_markdown(manifest)
  dataset_manifest.write_atomically(FileSystems.join(staged, REPORT_NAME), table.encode("utf-8"))
  if not manifest["splits"]["train"]["sequences"]:
    raise no_train_sequences(staged, output_dir, intake_summary("row", rows_in(totals), totals))
  return manifest, table
