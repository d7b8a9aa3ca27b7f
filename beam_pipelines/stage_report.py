"""Per-stage Beam metrics (documents and bytes in/out, drops by reason) and the run report
built from them: a table printed at the end and written as report.md and into manifest.json."""

import contextlib
import time

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics, MetricsFilter

from beam_pipelines import dataset_manifest
from beam_pipelines.documents import METRICS_NAMESPACE

STAGES = ("read", "normalize", "langid", "quality", "pii", "exact_dedup", "near_dedup",
          "train_tokenizer", "tokenize", "pack")
REPORT_NAME = "report.md"
DEAD_LETTER_NAME = "dead_letter.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"


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
  lines += ["", f"busy time summed over workers: {busy}",
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
            f"seq_len {manifest['seq_len']}, vocab {manifest['tokenizer']['vocab_size']}, "
            f"train unigram entropy {manifest['unigram_entropy_nats']:.3f} nats; "
            f"{report['seconds']:.1f}s"]
  return "\n".join(lines) + "\n"


def finish_staged(staged: str, result, started: float, build_report, report_markdown
                  ) -> tuple[dict, str]:
  """After a chat or image pipeline has run into `staged`: an empty dead-letter file when no
  row went there, the report (`build_report(manifest, totals, seconds)`) in the manifest and
  `report.md` (`report_markdown(manifest)`). Returns (manifest, the report's table)."""
  result.wait_until_finish()
  dead_letter = FileSystems.join(staged, DEAD_LETTER_NAME)
  if not FileSystems.exists(dead_letter):
    dataset_manifest.write_atomically(dead_letter, b"")
  manifest = dataset_manifest.read_manifest(staged)
  manifest["report"] = build_report(manifest, counter_totals(result),
                                    time.perf_counter() - started)
  dataset_manifest.write_manifest(staged, manifest)
  table = report_markdown(manifest)
  dataset_manifest.write_atomically(FileSystems.join(staged, REPORT_NAME), table.encode("utf-8"))
  return manifest, table
