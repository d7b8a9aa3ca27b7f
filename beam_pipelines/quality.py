"""Gopher/C4-style document quality heuristics and language identification.

Every signal is a pure function of the text; `failed_check` names the first threshold a
document misses. Words are whitespace-separated tokens; ratios over characters count the
characters of words (whitespace excluded).
"""

import collections
import dataclasses
import functools
import re

import numpy as np

from beam_pipelines import ngrams

BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "‣", "–", "-", "*")
ELLIPSES = ("...", "…")
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
TOP_NGRAM_SIZES = (2, 3, 4)
DUPLICATE_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)
LANGID_CHARS = 2000
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
      "bullet_line_ratio": sum(1 for line in lines if line.startswith(BULLETS)) / len(lines),
      "ellipsis_line_ratio": sum(1 for line in lines if line.endswith(ELLIPSES)) / len(lines),
      "duplicate_line_ratio": sum(n for _, n in repeats) / len(lines),
      "duplicate_line_char_ratio": sum(len(line) * n for line, n in repeats)
                                   / sum(map(len, lines)),
  }


def top_ngram_char_ratio(hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
  """Characters in all occurrences of the most frequent word n-gram / characters in all words;
  0 when no n-gram repeats. hashes, lengths: [words]."""
  grams = ngrams.ngram_hashes(hashes, n)
  if not len(grams):
    return 0.0
  _, first, counts = np.unique(grams, return_index=True, return_counts=True)
  most = counts.max()
  if most < 2:
    return 0.0
  start = first[counts == most].min()  # ties: the n-gram that occurs first
  return float(lengths[start:start + n].sum() * most / lengths.sum())


def duplicate_ngram_char_ratio(hashes: np.ndarray, lengths: np.ndarray, n: int) -> float:
  """Characters of words inside any word n-gram that occurs more than once / all characters."""
  grams = ngrams.ngram_hashes(hashes, n)
  if not len(grams):
    return 0.0
  _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
  repeated = counts[inverse] > 1
  covered = np.zeros(len(hashes), bool)
  for offset in range(n):
    covered[offset:offset + len(grams)] |= repeated
  return float(lengths[covered].sum() / lengths.sum())


def word_signals(text: str, words: list[str]) -> dict[str, float]:
  if not words:
    return {"words": 0, "mean_word_length": 0.0, "symbol_word_ratio": 0.0,
            "alpha_word_ratio": 0.0, "stop_words": 0}
  symbols = text.count("#") + text.count("...") + text.count("…")
  return {
      "words": len(words),
      "mean_word_length": sum(map(len, words)) / len(words),
      "symbol_word_ratio": symbols / len(words),
      "alpha_word_ratio": 1 - len(_WORD_WITHOUT_LETTER.findall(text)) / len(words),
      "stop_words": sum(map(STOP_WORDS.__contains__, text.lower().split())),
  }


def quality_signals(text: str) -> dict[str, float]:
  words = text.split()
  signals = word_signals(text, words) | line_signals(text)
  if words:
    hashes = ngrams.word_hashes(words)
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    for n in TOP_NGRAM_SIZES:
      signals[f"top_{n}gram_char_ratio"] = top_ngram_char_ratio(hashes, lengths, n)
    for n in DUPLICATE_NGRAM_SIZES:
      signals[f"duplicate_{n}gram_char_ratio"] = duplicate_ngram_char_ratio(hashes, lengths, n)
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


@functools.cache
def language_identifier():
  """py3langid's model ships inside the package: nothing is downloaded."""
  from py3langid.langid import MODEL_FILE, LanguageIdentifier  # pylint: disable=import-outside-toplevel
  return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
  """(ISO 639-1 code, probability) of the text's first LANGID_CHARS characters."""
  language, probability = language_identifier().classify(text[:LANGID_CHARS])
  return language, float(probability)
