"""Named input sources: globs of files or TFDS splits, each with a mixture weight and a filter
profile, resolved up front into read units (one per file, one per TFDS index range)."""

import dataclasses
import re
from typing import NamedTuple

from beam_pipelines import documents
from beam_pipelines import reading

# code: no language ID, prose heuristics or boilerplate-line removal; auto: code for whole files
# with a source-code suffix, prose for everything else.
PROFILES = ("auto", "prose", "code")
CODE_SUFFIXES = (".py", ".pyi", ".pyx", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".java", ".kt",
                 ".scala", ".js", ".jsx", ".ts", ".tsx", ".go", ".rs", ".rb", ".php", ".pl", ".sh",
                 ".bash", ".lua", ".swift", ".cs", ".m", ".jl", ".hs", ".ml", ".sql", ".r", ".css",
                 ".json", ".toml", ".yaml", ".yml", ".xml", ".ini", ".cfg", ".mk", ".cmake")
DEFAULT_SOURCE = "default"
TFDS_RANGE = 10_000
_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  inputs: tuple[str, ...]  # file globs and/or `tfds:NAME[/CONFIG][:SPLIT]`
  weight: float = 1.0
  profile: str = "auto"

  def __post_init__(self):
    if not _NAME.fullmatch(self.name):
      raise ValueError(f"source name {self.name!r} must be letters, digits and underscores")
    if not self.weight > 0:
      raise ValueError(f"source {self.name} has weight {self.weight}; weights must be positive")
    if self.profile not in PROFILES:
      raise ValueError(f"source {self.name} has profile {self.profile!r}; pick one of {PROFILES}")
    if not self.inputs:
      raise ValueError(f"source {self.name} lists no inputs")


def parse_source(flag: str) -> Source:
  """`NAME[:WEIGHT[:PROFILE]]=INPUT,INPUT...`, e.g. `code:2:code=src/**/*.py,tfds:mbpp`."""
  head, separator, inputs = flag.partition("=")
  if not separator:
    raise ValueError(f"--source {flag!r} must look like NAME[:WEIGHT[:PROFILE]]=GLOB,GLOB")
  name, _, rest = head.partition(":")
  weight, _, profile = rest.partition(":")
  try:
    weight_value = float(weight) if weight else 1.0
  except ValueError:
    raise ValueError(f"--source {flag!r} has weight {weight!r}; use a positive number") from None
  return Source(name, tuple(i.strip() for i in inputs.split(",") if i.strip()), weight_value,
                profile or "auto")


def is_prose(profile: str, origin: str) -> bool:
  """Whether the prose-only stages apply to a document of this profile and origin (a path, or
  path:line for a JSONL or Parquet row)."""
  if profile == "auto":
    return not origin.lower().endswith(CODE_SUFFIXES)
  return profile == "prose"


class ReadUnit(NamedTuple):
  source: str
  path: str  # a file, or a TFDS spec
  start: int = 0  # TFDS index range; unused for files
  stop: int = 0


class ResolvedSources(NamedTuple):
  units: list[ReadUnit]
  bytes_by_source: dict[str, int]  # file bytes; TFDS sources count 0


def resolve(sources: list[Source]) -> ResolvedSources:
  """Every input of every source, matched now: a glob or TFDS split with nothing in it is a
  user error."""
  names = [s.name for s in sources]
  if len(set(names)) != len(names):
    raise ValueError(f"source names {names} repeat; give each --source its own name")
  units, bytes_by_source = [], {}
  for source in sources:
    bytes_by_source[source.name] = 0
    file_globs = [i for i in source.inputs if not i.startswith(reading.TFDS_PREFIX)]
    for spec in set(source.inputs) - set(file_globs):
      units += tfds_units(source.name, spec)
    if file_globs:
      files = documents.match_files(file_globs)
      units += [ReadUnit(source.name, path) for path in sorted(files)]
      bytes_by_source[source.name] = sum(files.values())
  return ResolvedSources(units, bytes_by_source)


def tfds_units(source: str, spec: str) -> list[ReadUnit]:
  try:
    size = len(reading.tfds_source(spec))
  except Exception as err:  # pylint: disable=broad-except  # TFDS raises many kinds
    raise ValueError(f"--source {source} input {spec!r} could not be opened ({err}); prepare "
                     "it with `tfds build` or set TFDS_DATA_DIR") from None
  if not size:
    raise ValueError(f"--source {source} input {spec!r} has no examples")
  return [ReadUnit(source, spec, start, min(size, start + TFDS_RANGE))
          for start in range(0, size, TFDS_RANGE)]
