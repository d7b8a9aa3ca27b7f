"""Named input sources: globs of files or TFDS splits, each with a mixture weight and a filter
profile, resolved up front into read units (one per file, one per TFDS index range)."""

import dataclasses
import os
import re
import stat
from typing import NamedTuple

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems

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


def recursive_variants(pattern: str) -> list[str]:
  """Beam's `dir/**/x` needs at least one directory between; Python's also matches `dir/x`."""
  head, separator, tail = pattern.partition("/**/")
  if not separator:
    return [pattern]
  tails = recursive_variants(tail)
  return [f"{head}/**/{t}" for t in tails] + [f"{head}/{t}" for t in tails]


def local_entries(pattern: str) -> list[str]:
  """Every directory entry a local pattern matches, in Beam's glob syntax (`*` stays within a
  directory, `**` crosses them). Beam's own match lists only what it can size as a file, so
  directories and broken links would vanish without a word; here they stay, for the reader to
  dead-letter. Directories are left out under a trailing `**`, where they are the tree's
  structure rather than inputs."""
  prefix = re.match(r"[^[*?]*", pattern).group(0)
  if prefix == pattern:
    return [pattern] if os.path.lexists(pattern) else []
  matches = re.compile(FileSystem.translate_pattern(pattern)).match
  with_directories = os.path.basename(pattern) != "**"
  entries = []
  for directory, subdirectories, names in os.walk(os.path.dirname(prefix)):
    names = names + subdirectories if with_directories else names
    entries += [path for name in names if matches(path := os.path.join(directory, name))]
  return entries


def match_pattern(pattern: str) -> dict[str, int]:
  """{path: size}: regular files with their size, other local entries with size 0."""
  if not reading.is_local(pattern):
    return {m.path: m.size_in_bytes for m in FileSystems.match([pattern])[0].metadata_list}
  return {path: regular_file_size(path) for path in local_entries(pattern)}


def regular_file_size(path: str) -> int:
  try:
    status = os.stat(path)
  except OSError:
    return 0
  return status.st_size if stat.S_ISREG(status.st_mode) else 0


def match_files(globs: list[str]) -> dict[str, int]:
  """{path: size} of everything the globs match; a glob matching nothing is a user error."""
  files = {}
  for glob in globs:
    matched = {}
    for pattern in recursive_variants(glob):
      matched |= match_pattern(pattern)
    if not matched:
      raise ValueError(f"--input glob {glob!r} matched no files; check the path and quoting")
    files |= matched
  return files


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
      files = match_files(file_globs)
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
