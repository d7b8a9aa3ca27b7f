"""Counts of a chat or preference run: per-split statistics for the manifest, and the report
(rows in by kind, dead letters by reason, tokens, supervised tokens, sequences, packing
efficiency) written as report.md and into manifest.json."""

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from beam_pipelines import stage_report
from beam_pipelines.chat_examples import Example


class ChatStats(NamedTuple):
  """Of one split: examples (conversations or pairs), non-pad tokens (a pair's shared prefix once),
  supervised tokens, and histogram[i] = supervised tokens with id i."""
  examples: int
  tokens: int
  supervised_tokens: int
  histogram: np.ndarray


def stats_of(examples: list[Example]) -> ChatStats:
  supervised = [example.tokens[example.loss_mask == 1] for example in examples]
  histogram = np.bincount(np.concatenate(supervised), minlength=1) if supervised else (
      np.zeros(1, np.int64))
  return ChatStats(len(examples), sum(len(example.tokens) for example in examples),
                   sum(len(s) for s in supervised), histogram.astype(np.int64))


def sum_stats(stats: Iterable[ChatStats]) -> ChatStats:
  total = ChatStats(0, 0, 0, np.zeros(1, np.int64))
  for s in stats:
    histogram = np.zeros(max(len(total.histogram), len(s.histogram)), np.int64)
    histogram[:len(total.histogram)] += total.histogram
    histogram[:len(s.histogram)] += s.histogram
    total = ChatStats(total.examples + s.examples, total.tokens + s.tokens,
                      total.supervised_tokens + s.supervised_tokens, histogram)
  return total


def split_entry(stats: ChatStats | None, shards: list[tuple[str, int]]) -> dict:
  """A manifest split: `documents` counts examples (conversations or pairs)."""
  stats = stats or ChatStats(0, 0, 0, np.zeros(1, np.int64))
  return {"documents": stats.examples, "tokens": stats.tokens,
          "supervised_tokens": stats.supervised_tokens,
          "sequences": sum(count for _, count in shards),
          "shards": sorted(name for name, _ in shards)}


def build_report(manifest: dict, totals: dict[str, int], seconds: float) -> dict:
  """totals: the run's `chat:` counters (stage_report.counter_totals)."""
  splits = manifest["splits"]
  slots = sum(s["sequences"] for s in splits.values()) * manifest["seq_len"]
  dropped = {name.split(":", 2)[2]: n for name, n in sorted(totals.items())
             if name.startswith("chat:dropped:")}
  files_in, empty_files = stage_report.files_read(totals)
  return {
      "kind": manifest["kind"],
      "files_in": files_in,
      "empty_files": empty_files,
      "rows_in": {name.split(":", 2)[2]: n for name, n in sorted(totals.items())
                  if name.startswith("chat:rows_in:")},
      "examples_out": {name: s["documents"] for name, s in splits.items()},
      "dead_letters": sum(dropped.values()),
      "dead_letters_by_reason": dropped,
      "truncated_turns": totals.get("chat:truncated_turns", 0),
      "tokens": {name: s["tokens"] for name, s in splits.items()},
      "supervised_tokens": {name: s["supervised_tokens"] for name, s in splits.items()},
      "sequences": {name: s["sequences"] for name, s in splits.items()},
      "packing_efficiency": sum(s["tokens"] for s in splits.values()) / slots if slots else 0.0,
      "seconds": round(seconds, 2),
  }


def report_markdown(manifest: dict) -> str:
  report = manifest["report"]
  rows_in = ", ".join(f"{kind} {n:,}" for kind, n in report["rows_in"].items()) or "none"
  reasons = ", ".join(f"{reason} {n:,}" for reason, n in
                      report["dead_letters_by_reason"].items()) or "none"
  examples = "conversations" if report["kind"] == "sft" else "pairs"
  files = (f"{stage_report.plural(report['files_in'], 'file')} "
           f"({report['empty_files']:,} empty)")
  lines = [f"{report['kind']} data from {files}; rows in by kind: {rows_in}",
           (f"dead letters: {report['dead_letters']:,} ({stage_report.DEAD_LETTER_NAME}): "
            f"{reasons}"), f"turns cut by --truncate: {report['truncated_turns']:,}", "",
           f"| split | {examples} | tokens | supervised tokens | sequences | shards |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, split in manifest["splits"].items():
    lines.append(f"| {name} | {split['documents']:,} | {split['tokens']:,} | "
                 f"{split['supervised_tokens']:,} | {split['sequences']:,} | "
                 f"{len(split['shards'])} |")
  lines += ["", (f"packing efficiency (non-pad / all tokens): "
                 f"{report['packing_efficiency']:.4f}; seq_len {manifest['seq_len']}, "
                 f"vocab {manifest['tokenizer']['vocab_size']}, train supervised unigram "
                 f"entropy {manifest['unigram_entropy_nats']:.3f} nats; "
                 f"{report['seconds']:.1f}s")]
  return "\n".join(lines) + "\n"
