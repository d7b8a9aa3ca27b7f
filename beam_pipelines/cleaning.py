"""Read units -> cleaned, keyed documents: read, normalize, language ID, quality (its word
lists are English), PII.

Each stage counts documents and UTF-8 bytes in and out, and drops by reason, as Beam metrics
(see `stage_report`). Input that cannot be read goes to the DEAD_LETTER output instead.
"""

import dataclasses
import json

import apache_beam as beam

from beam_pipelines import documents
from beam_pipelines import langid
from beam_pipelines import normalize
from beam_pipelines import pii
from beam_pipelines import quality
from beam_pipelines import reading
from beam_pipelines import sources
from beam_pipelines import stage_report
from beam_pipelines.quality import QualityThresholds
from beam_pipelines.sources import ReadUnit

DEAD_LETTER = "dead_letter"


@dataclasses.dataclass(frozen=True)
class CleaningConfig:
  profiles: dict[str, str]  # source name -> sources.PROFILES entry
  normalize: bool = True
  quality: bool = True
  langid: bool = True
  pii: bool = True
  languages: tuple[str, ...] = ("en",)
  min_language_score: float = 0.5
  thresholds: QualityThresholds = QualityThresholds()
  seed: int = 0
  langid_model: str | None = None  # an unpacked model file (langid.unpacked_model), if any


def utf8_size(text: str) -> int:
  if text.isascii():  # O(1): str knows its widest character
    return len(text)
  return len(text.encode("utf-8", "surrogatepass"))


def dead_letter_line(unit: ReadUnit, rejected: reading.Rejected) -> str:
  detail = {"detail": rejected.detail} if rejected.detail else {}
  return json.dumps({"source": unit.source, "file": unit.path, "line": rejected.line,
                     "reason": rejected.reason, **detail})


def origin_of(unit: ReadUnit, line: int) -> str:
  if unit.path.startswith(reading.TFDS_PREFIX):
    return f"{unit.path}[{line}]"
  return f"{unit.path}:{line}" if line else unit.path


class ReadDocuments(beam.DoFn):
  """ReadUnit -> (source, origin, text); unreadable documents -> DEAD_LETTER JSON lines."""

  def __init__(self, max_document_bytes: int):
    self._max_bytes = max_document_bytes

  def process(self, unit: ReadUnit):
    is_file = not unit.path.startswith(reading.TFDS_PREFIX)
    if is_file:
      items = reading.read_file(unit.path, self._max_bytes)
    else:
      items = reading.read_tfds_range(unit.path, unit.start, unit.stop, self._max_bytes)
    rows = 0
    while True:
      with stage_report.timed("read"):  # timing only the reading, not what runs downstream
        item = next(items, None)
      if item is None:
        if is_file:
          stage_report.count_file("read", rows)
        return
      rows += 1
      if isinstance(item, reading.Rejected):
        stage_report.count_drop("read", item.reason)
        yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter_line(unit, item))
      else:
        stage_report.count_out("read", utf8_size(item.text))
        yield unit.source, origin_of(unit, item.line), item.text


class CleanDocuments(beam.DoFn):
  """(source, origin, text) -> documents.Document keyed by its cleaned text, or nothing."""

  def __init__(self, config: CleaningConfig):
    self._config = config

  def process(self, document: tuple[str, str, str]):
    source, origin, text = document
    prose = sources.is_prose(self._config.profiles[source], origin)
    for stage, enabled, applies, step in (
        ("normalize", self._config.normalize, True, self._normalize),
        ("langid", self._config.langid, prose, self._langid),
        ("quality", self._config.quality, prose, self._quality),
        ("pii", self._config.pii, True, self._pii)):
      if not enabled:
        continue
      size = utf8_size(text)
      stage_report.count_in(stage, size)
      if not applies:  # a code source passes through prose-only stages, counted as passed
        stage_report.count(stage, "passed_by_profile")
        stage_report.count_out(stage, size)
        continue
      with stage_report.timed(stage):
        text, dropped = step(text, prose)
      if dropped:
        stage_report.count_drop(stage, dropped)
        return
      stage_report.count_out(stage, utf8_size(text))
    text_utf8 = text.encode("utf-8")
    yield documents.Document(documents.document_key(text_utf8, self._config.seed), source,
                             origin, text)

  def _normalize(self, text: str, prose: bool) -> tuple[str, str | None]:
    text = normalize.normalize_whitespace(text)
    if prose:
      text, lines = normalize.drop_boilerplate_lines(text)
      stage_report.count("normalize", "boilerplate_lines", lines)
    return text, None if text.strip() else "empty"

  def _quality(self, text: str, prose: bool) -> tuple[str, str | None]:
    del prose
    return text, quality.failed_check(quality.quality_signals(text), self._config.thresholds)

  def _langid(self, text: str, prose: bool) -> tuple[str, str | None]:
    del prose
    language, score = langid.identify_language(text, self._config.langid_model)
    if language not in self._config.languages:
      return text, f"language_{language}"
    return text, None if score >= self._config.min_language_score else "low_language_score"

  def _pii(self, text: str, prose: bool) -> tuple[str, str | None]:
    del prose
    text, replaced = pii.scrub(text)
    for kind, count in replaced.items():
      if count:
        stage_report.count("pii", f"{kind}_replaced", count)
    return text, None
