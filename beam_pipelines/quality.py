"""Gopher/C4-style document quality heuristics.

Every signal is a pure function of the text; `failed_check` names the first threshold a
document misses. Words are whitespace-separated tokens; ratios over characters count the
characters of words (whitespace excluded).
"""

import collections
import dataclasses
import itertools
import re
from collections.abc import Iterator

import numpy as np

from beam_pipelines import ngrams

BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "‣", "–", "-", "*")
ELLIPSES = ("...", "…")
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
TOP_NGRAM_SIZES = (2, 3, 4)
DUPLICATE_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)  # TOP + DUPLICATE sizes: consecutive
_WORD_WITHOUT_LETTER = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")


@dataclasses.dataclass(frozen=True)
class QualityThresholds:
  """Gopher's published thresholds (Rae et al. 2021, appendix A), C4's stop-word rule."""
  min_words: int = 50
  max_words: int = 100_000
  min_mean_word_length: float = 3.0
  max_mean_word_length: float = 10.0
  max_symbol_word_ratio: float = 0.1
  max_bullet_line_ratio: float = 0.9
  max_ellipsis_line_ratio: float = 0.3
  min_alpha_word_ratio: float = 0.8
  min_stop_words: int = 2
  max_duplicate_line_ratio: float = 0.3
  max_duplicate_line_char_ratio: float = 0.2
  max_top_ngram_char_ratio: tuple[float, ...] = (0.20, 0.18, 0.16)  # for TOP_NGRAM_SIZES
  max_duplicate_ngram_char_ratio: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)


def thresholds_from_flag(flag: str) -> QualityThresholds:
  """`min_words=20,max_duplicate_line_ratio=0.5` -> the defaults with those fields changed."""
  scalars = {f.name: f.type for f in dataclasses.fields(QualityThresholds)
             if f.type in (int, float, "int", "float")}
  changes = {}
  for item in filter(None, (part.strip() for part in flag.split(","))):
    name, _, value = item.partition("=")
    if name not in scalars:
      raise ValueError(f"--quality_thresholds has no field {name!r}; pick from {sorted(scalars)}")
    try:
      changes[name] = int(value) if scalars[name] in (int, "int") else float(value)
    except ValueError:
      raise ValueError(f"--quality_thresholds {name}={value!r} is not a number") from None
  return dataclasses.replace(QualityThresholds(), **changes)


def line_signals(text: str) -> dict[str, float]:
  """Bullet, ellipsis and duplicated-line ratios over non-empty lines (stripped)."""
  lines = [line for line in map(str.strip, text.split("\n")) if line]
  if not lines:
    return {"bullet_line_ratio": 0.0, "ellipsis_line_ratio": 0.0,
            "duplicate_line_ratio": 0.0, "duplicate_line_char_ratio": 0.0}
  counts = collections.Counter(lines)
  repeats = [(line, n - 1) for line, n in counts.items() if n > 1]
  return {
      "bullet_line_ratio": sum(map(str.startswith, lines, itertools.repeat(BULLETS)))
                           / len(lines),
      "ellipsis_line_ratio": sum(map(str.endswith, lines, itertools.repeat(ELLIPSES)))
                             / len(lines),
      "duplicate_line_ratio": sum(n for _, n in repeats) / len(lines),
      "duplicate_line_char_ratio": sum(len(line) * n for line, n in repeats)
                                   / sum(map(len, lines)),
  }


def repeated_ngram_runs(hashes: np.ndarray, sizes: tuple[int, ...]) -> Iterator[tuple]:
  """For each n of `sizes` (consecutive, ascending): (n, starts, run starts, run lengths), where
  `starts` are word positions of n-grams grouped into runs of equal n-grams. Every n-gram that
  occurs more than once is there with all its occurrences. hashes: [words].

  An (n+1)-gram repeats only where the n-gram at its start repeats (its prefix repeats with
  it), so each size looks only at the starts where the previous size found repeats.
  """
  starts = np.arange(max(0, len(hashes) - sizes[0] + 1))
  for n in sizes:
    starts = starts[starts + n <= len(hashes)]
    grams = ngrams.ngram_hashes_at(hashes, starts, n)
    order = np.argsort(grams)
    ordered = grams[order]
    run_starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    run_lengths = np.diff(np.append(run_starts, len(grams)))
    starts = starts[order]
    yield n, starts, run_starts, run_lengths
    starts = starts[np.repeat(run_lengths > 1, run_lengths)]


def top_ngram_char_ratio(lengths: np.ndarray, n: int, starts: np.ndarray,
                         run_starts: np.ndarray, run_lengths: np.ndarray) -> float:
  """Characters in all occurrences of the most frequent word n-gram / characters in all words;
  0 when no n-gram repeats. The arguments are one size of `repeated_ngram_runs`."""
  if not len(starts) or (most := run_lengths.max()) < 2:
    return 0.0
  first = np.minimum.reduceat(starts, run_starts)[run_lengths == most].min()  # ties: earliest
  return float(lengths[first:first + n].sum() * most / lengths.sum())


def duplicate_ngram_char_ratio(lengths: np.ndarray, n: int, starts: np.ndarray,
                               run_lengths: np.ndarray) -> float:
  """Characters of words inside any word n-gram that occurs more than once / all characters."""
  starts = starts[np.repeat(run_lengths > 1, run_lengths)]
  if not len(starts):
    return 0.0
  covered = np.zeros(len(lengths), bool)
  for offset in range(n):
    covered[starts + offset] = True
  return float(lengths[covered].sum() / lengths.sum())


def word_signals(text: str, vocabulary: ngrams.Vocabulary) -> dict[str, float]:
  """Word count, mean length, symbol, alphabetic-word and stop-word signals of the text's
  words; each distinct word is examined once and weighted by its occurrences."""
  words = len(vocabulary.ids)
  if not words:
    return {"words": 0, "mean_word_length": 0.0, "symbol_word_ratio": 0.0,
            "alpha_word_ratio": 0.0, "stop_words": 0}
  occurrences = np.bincount(vocabulary.ids, minlength=len(vocabulary.words))
  joined = "\n".join(vocabulary.words)  # words hold no whitespace: one per line
  stop = np.fromiter(map(STOP_WORDS.__contains__, joined.lower().split("\n")), bool,
                     len(vocabulary.words))
  without_letter = sum(occurrences[vocabulary.index[word]]
                       for word in _WORD_WITHOUT_LETTER.findall(joined))
  symbols = text.count("#") + text.count("...") + text.count("…")
  return {
      "words": words,
      "mean_word_length": float(occurrences @ vocabulary.lengths / words),
      "symbol_word_ratio": symbols / words,
      "alpha_word_ratio": float(1 - without_letter / words),
      "stop_words": int(occurrences[stop].sum()),
  }


def quality_signals(text: str) -> dict[str, float]:
  vocabulary = ngrams.Vocabulary.of(text.split())
  signals = word_signals(text, vocabulary) | line_signals(text)
  if not len(vocabulary.ids):
    return signals
  lengths = vocabulary.lengths[vocabulary.ids]
  for n, starts, run_starts, run_lengths in repeated_ngram_runs(
      vocabulary.local_hashes(), TOP_NGRAM_SIZES + DUPLICATE_NGRAM_SIZES):
    if n in TOP_NGRAM_SIZES:
      signals[f"top_{n}gram_char_ratio"] = top_ngram_char_ratio(lengths, n, starts, run_starts,
                                                                run_lengths)
    else:
      signals[f"duplicate_{n}gram_char_ratio"] = duplicate_ngram_char_ratio(lengths, n, starts,
                                                                            run_lengths)
  return signals


def failed_check(signals: dict[str, float], limits: QualityThresholds) -> str | None:
  """The name of the first check the document fails, or None if it passes them all."""
  checks = [
      ("too_few_words", signals["words"] < limits.min_words),
      ("too_many_words", signals["words"] > limits.max_words),
      ("mean_word_length", not (limits.min_mean_word_length <= signals["mean_word_length"]
                                <= limits.max_mean_word_length)),
      ("symbol_word_ratio", signals["symbol_word_ratio"] > limits.max_symbol_word_ratio),
      ("bullet_lines", signals["bullet_line_ratio"] > limits.max_bullet_line_ratio),
      ("ellipsis_lines", signals["ellipsis_line_ratio"] > limits.max_ellipsis_line_ratio),
      ("alpha_words", signals["alpha_word_ratio"] < limits.min_alpha_word_ratio),
      ("stop_words", signals["stop_words"] < limits.min_stop_words),
      ("duplicate_lines", signals["duplicate_line_ratio"] > limits.max_duplicate_line_ratio),
      ("duplicate_line_chars",
       signals["duplicate_line_char_ratio"] > limits.max_duplicate_line_char_ratio),
  ]
  checks += [(f"top_{n}gram", signals.get(f"top_{n}gram_char_ratio", 0.0) > limit)
             for n, limit in zip(TOP_NGRAM_SIZES, limits.max_top_ngram_char_ratio)]
  checks += [(f"duplicate_{n}grams", signals.get(f"duplicate_{n}gram_char_ratio", 0.0) > limit)
             for n, limit in zip(DUPLICATE_NGRAM_SIZES, limits.max_duplicate_ngram_char_ratio)]
  return next((name for name, failed in checks if failed), None)

