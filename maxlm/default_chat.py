"""The embedded instruction and preference sets: questions about single lines of the installed
Python's standard library, written as JSONL (so a user sees the formats) and prepared by
`beam_pipelines.prepare_chat` with the default corpus's tokenizer, once, into the cache.

  python -m maxlm.default_chat      # prints the four JSONL files and the sft/preference dirs

Every answer is copied out of the line in the question by a rule (a name, a parameter list,
a module), so a small model pretrained on the same code can learn the rule rather than
memorize facts; the validation rows ask about lines no training row shows. Most training
questions are about renamed lines (stdlib lines whose identifiers are replaced by fresh names
recombined from stdlib identifier pieces), so answering cannot lean on recalled lines; the
validation rows ask about real, untouched stdlib lines. Preference pairs
pair the right answer with a plausible wrong one: another line's answer to the same question,
the answer cut short, or a different part of the same line.
"""

import argparse
import glob
import ast
import hashlib
import json
import keyword
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import gin

from beam_pipelines.records import MANIFEST_NAME
from maxlm import default_corpus, user_cache

RECIPE = 3  # bumped whenever the templates, sizes or record layout change what the sets hold
SYSTEM_PROMPT = "Answer with the exact text from the code."
HELD_OUT_PERCENT = 10
KIND_WEIGHTS = {"def": 0.45, "class": 0.25, "import": 0.1, "from": 0.2}
MAX_LINE_CHARS = 72
MAX_ANSWER_CHARS = 32
RENAMED_ROW_FRACTION = 0.9  # of the SFT training rows; the rest ask about real lines
RENAMED_NAME_FRACTION = 0.9  # of a renamed line's distinct identifiers
_IDENTIFIER = re.compile(r"(?<![\w'\"])[A-Za-z_]\w*(?!['\"])")  # not in numbers or prefixes
_CHUNK = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+|_+")  # camelCase and snake_case pieces
_NAME = r"[A-Za-z_]\w*"
_PATTERNS = {
    "def": re.compile(rf"(?:async\s+)?def\s+({_NAME})\s*\((.+)\)\s*(?:->\s*[^:]+)?:"),
    "class": re.compile(rf"class\s+({_NAME})\s*(?:\((.+)\))?\s*:"),
    "import": re.compile(r"import\s+([\w.]+)"),
    "from": re.compile(r"from\s+([\w.]+)\s+import\s+(\w+(?:, \w+)*)"),
}


class Item(NamedTuple):
  """One stdlib line and the parts questions about it ask for."""
  kind: str  # a _PATTERNS key
  line: str
  parts: tuple[str, ...]


class Sizes(NamedTuple):
  chat_train: int = 24000
  chat_validation: int = 400
  preference_train: int = 4000
  preference_validation: int = 400


DEFAULT_SIZES = Sizes()


# (item kind, question, index of the part answering it)
QUESTIONS = (
    ("def", "What is the name of the function defined here?", 0),
    ("def", "What are the parameters of this function?", 1),
    ("class", "What is the name of the class defined here?", 0),
    ("class", "Which classes does this class inherit from?", 1),
    ("import", "Which module does this line import?", 0),
    ("from", "Which module does this line import from?", 0),
    ("from", "Which names does this line import?", 1),
)
FOLLOW_UP = "What are its parameters?"  # after the name of a function, in two-turn rows


def item_of_line(line: str) -> Item | None:
  """The Item of a stripped line when it is one short def, class or import statement."""
  if len(line) > MAX_LINE_CHARS or not line.isascii():
    return None
  for kind, pattern in _PATTERNS.items():
    match = pattern.fullmatch(line)
    if match:
      parts = tuple((group or "").strip() for group in match.groups())
      if all(0 < len(part) <= MAX_ANSWER_CHARS for part in parts):
        return Item(kind, line, parts)
      return None
  return None


def stdlib_items() -> list[Item]:
  """Every distinct qualifying line of the stdlib sources the default corpus reads, sorted."""
  lines = set()
  for pattern in default_corpus.stdlib_source_globs():
    for path in glob.glob(pattern, recursive=True):
      with open(path, encoding="utf-8", errors="replace") as f:
        lines.update(line.strip() for line in f)
  return sorted(item for line in lines if (item := item_of_line(line)))


def identifier_pieces(items: list[Item]) -> list[str]:
  """The distinct lowercased word pieces (two letters or more) of the items' identifiers."""
  pieces = {chunk.lower() for item in items for name in _IDENTIFIER.findall(item.line)
            for chunk in _CHUNK.findall(name) if chunk.isalpha() and len(chunk) > 1}
  return sorted(pieces)


def fresh_name(name: str, pieces: list[str], rng: random.Random) -> str:
  """`name` with each word piece replaced by a random one of the same case; underscores,
  digits and one-letter pieces keep their shape."""
  def piece(chunk: str) -> str:
    if not chunk.isalpha():
      return chunk
    if len(chunk) == 1:
      letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
      return letter.upper() if chunk.isupper() else letter
    new = rng.choice(pieces)
    return new.upper() if chunk.isupper() else new.capitalize() if chunk[0].isupper() else new
  return "".join(piece(chunk) for chunk in _CHUNK.findall(name))


def renamed(item: Item, pieces: list[str], rng: random.Random) -> Item:
  """The Item of `item`'s line with most identifiers replaced by fresh names, the same name
  for each occurrence; `item` itself when the new line is not valid Python or asks nothing."""
  names = {}
  for name in dict.fromkeys(_IDENTIFIER.findall(item.line)):
    if not keyword.iskeyword(name) and rng.random() < RENAMED_NAME_FRACTION:
      names[name] = fresh_name(name, pieces, rng)
  line = _IDENTIFIER.sub(lambda match: names.get(match.group(), match.group()), item.line)
  new = item_of_line(line)
  if new is None or new.kind != item.kind or any(map(keyword.iskeyword, names.values())):
    return item
  try:
    ast.parse(line + ("\n  pass" if line.endswith(":") else ""))
  except SyntaxError:
    return item
  return new


def is_held_out(item: Item) -> bool:
  digest = hashlib.blake2b(item.line.encode(), digest_size=8, person=b"chat-split").digest()
  return int.from_bytes(digest, "little") % 100 < HELD_OUT_PERCENT


def question(item: Item, rng: random.Random) -> tuple[list[dict], str, int]:
  """(messages of the question, its answer, index of the part answering it)."""
  choices = [(text, part) for kind, text, part in QUESTIONS if kind == item.kind]
  text, part = rng.choice(choices)
  messages = [{"role": "user", "content": f"{text}\n{item.line}"}]
  if rng.random() < 1 / 3:
    messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
  return messages, item.parts[part], part


def chat_row(item: Item, rng: random.Random) -> dict:
  """A `messages` row (two turns for some functions), or now and then `prompt`/`completion`."""
  messages, answer, part = question(item, rng)
  messages.append({"role": "assistant", "content": answer})
  if item.kind == "def" and part == 0 and rng.random() < 0.5:
    messages += [{"role": "user", "content": FOLLOW_UP},
                 {"role": "assistant", "content": item.parts[1]}]
  if len(messages) == 2 and rng.random() < 0.2:
    return {"prompt": messages[0]["content"], "completion": answer}
  return {"messages": messages}


def wrong_answer(item: Item, part: int, others: list[Item], rng: random.Random) -> str:
  """A plausible wrong answer: another line's same part, this answer cut, or another part."""
  answer = item.parts[part]
  candidates = [rng.choice(others).parts[part]]
  if len(answer) > 1:
    candidates.append(answer[:rng.randrange(1, len(answer))])
  candidates += [p for i, p in enumerate(item.parts) if i != part]
  wrong = [c for c in candidates if c != answer]
  return rng.choice(wrong) if wrong else answer + "_"


def preference_row(item: Item, others: list[Item], rng: random.Random) -> dict:
  """Prompt, chosen and rejected as strings, or now and then as message lists."""
  messages, answer, part = question(item, rng)
  rejected = wrong_answer(item, part, [o for o in others if o.kind == item.kind], rng)
  if len(messages) == 1 and rng.random() < 0.7:
    return {"prompt": messages[0]["content"], "chosen": answer, "rejected": rejected}
  reply = lambda text: [{"role": "assistant", "content": text}]
  return {"prompt": messages, "chosen": reply(answer), "rejected": reply(rejected)}


def rows(items: list[Item], count: int, make_row: Callable, seed: int) -> list[dict]:
  """`count` rows, each about an item of a kind drawn by KIND_WEIGHTS; items of a kind are
  drawn without replacement while they last. Deterministic."""
  rng = random.Random(seed)
  by_kind = {kind: [i for i in items if i.kind == kind] for kind in KIND_WEIGHTS}
  by_kind = {kind: group for kind, group in by_kind.items() if group}
  queues = {kind: [] for kind in by_kind}
  chosen = []
  for kind in rng.choices(list(by_kind), [KIND_WEIGHTS[k] for k in by_kind], k=count):
    if not queues[kind]:
      queues[kind] = rng.sample(by_kind[kind], len(by_kind[kind]))
    chosen.append(queues[kind].pop())
  return [make_row(item, rng) for item in chosen]


def write_jsonl(path: Path, lines: list[dict]) -> Path:
  path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
  return path


def renamed_chat_row(pieces: list[str]) -> Callable:
  """chat_row, about a renamed line RENAMED_ROW_FRACTION of the time."""
  def make_row(item: Item, rng: random.Random) -> dict:
    if rng.random() < RENAMED_ROW_FRACTION:
      item = renamed(item, pieces, rng)
    return chat_row(item, rng)
  return make_row


def write_default_sets(directory: Path, items: list[Item], sizes: Sizes = DEFAULT_SIZES,
                       seed: int = 0) -> dict[str, Path]:
  """chat_{train,validation}.jsonl and preference_{train,validation}.jsonl; the validation
  files ask about held-out lines only, as they are; chat_train mostly about renamed lines."""
  splits = {"train": [i for i in items if not is_held_out(i)],
            "validation": [i for i in items if is_held_out(i)]}
  chat_rows = {"train": renamed_chat_row(identifier_pieces(splits["train"])),
               "validation": chat_row}
  directory.mkdir(parents=True, exist_ok=True)
  paths = {}
  for offset, (split, split_items) in enumerate(splits.items()):
    paths[f"chat_{split}"] = write_jsonl(
        directory / f"chat_{split}.jsonl",
        rows(split_items, getattr(sizes, f"chat_{split}"), chat_rows[split], seed + offset))
    paths[f"preference_{split}"] = write_jsonl(
        directory / f"preference_{split}.jsonl",
        rows(split_items, getattr(sizes, f"preference_{split}"),
             lambda item, rng, others=split_items: preference_row(item, others, rng),
             seed + 2 + offset))
  return paths


def questions_and_answers(path: str | Path) -> list[tuple[list[dict], str]]:
  """(messages up to the last reply, the reply) of each chat row: what exact match asks."""
  pairs = []
  for line in Path(path).read_text(encoding="utf-8").splitlines():
    row = json.loads(line)
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]},
                                       {"role": "assistant", "content": row["completion"]}]
    pairs.append((messages[:-1], messages[-1]["content"]))
  return pairs


def tokenizer_sha256(tokenizer_dir: str) -> str:
  return json.loads((Path(tokenizer_dir) / MANIFEST_NAME).read_text())["tokenizer"]["sha256"]


@gin.configurable(module="maxlm")
def ensure_default_chat(kind: str = "sft", tokenizer_dir: str | None = None,
                        seq_len: int | None = None, cache_dir: str | None = None,
                        sizes: Sizes = DEFAULT_SIZES, items: list[Item] | None = None) -> str:
  """The data dir of the default `kind` set ("sft" or "preference"), building both sets
  first if they are not cached. `tokenizer_dir` (a data dir) defaults to the default
  corpus, whose seq_len is the default too."""
  tokenizer_dir = tokenizer_dir or default_corpus.ensure_default_corpus()
  manifest = json.loads((Path(tokenizer_dir) / MANIFEST_NAME).read_text())
  seq_len = seq_len or manifest["seq_len"]
  version = f"py{sys.version_info.major}.{sys.version_info.minor}"
  root = Path(cache_dir) if cache_dir else user_cache.cache_root()
  built = root / (f"chat-{version}-t{manifest['tokenizer']['sha256'][:12]}-s{seq_len}-"
                  f"n{sum(sizes)}-r{RECIPE}")
  if not (built / kind / MANIFEST_NAME).exists():
    build(built, tokenizer_dir, seq_len, sizes, items)
  return str(built / kind)


def build(built: Path, tokenizer_dir: str, seq_len: int, sizes: Sizes,
          items: list[Item] | None) -> None:
  print(f"building the default instruction and preference sets into {built} (once)",
        flush=True)
  from beam_pipelines import prepare_chat  # noqa: PLC0415 - Beam costs a trainer ~2 s to import
  user_cache.report_other_builds(built)
  with user_cache.building(built) as partial:
    paths = write_default_sets(partial, stdlib_items() if items is None else items, sizes)
    for kind, stem in (("sft", "chat"), ("preference", "preference")):
      prepare_chat.run([str(paths[f"{stem}_train"])], str(partial / kind),
                       validation_inputs=[str(paths[f"{stem}_validation"])],
                       tokenizer=tokenizer_dir, seq_len=seq_len, kind=kind)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokenizer", default=None,
                      help="a data dir whose tokenizer to use (default: the default corpus)")
  parser.add_argument("--seq_len", type=int, default=None)
  parser.add_argument("--cache_dir", default=None)
  flags = parser.parse_args(argv)
  sft = ensure_default_chat("sft", flags.tokenizer, flags.seq_len, flags.cache_dir)
  preference = ensure_default_chat("preference", flags.tokenizer, flags.seq_len,
                                   flags.cache_dir)
  for name in ("chat_train", "chat_validation", "preference_train", "preference_validation"):
    print(Path(sft).parent / f"{name}.jsonl")
  print(f"sft data: {sft}\npreference data: {preference}")


if __name__ == "__main__":
  main()
