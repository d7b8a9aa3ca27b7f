"""Held-out accuracy of a vision run on the embedded image set, asked through the
OpenAI-compatible server with the official `openai` client and an image_url data URL part.

  python benchmarks/vision_accuracy.py --run_dir=runs/vision_tiny_sft [--json]

Starts `serving.server` on the run and asks every row of the image set's validation file
(`maxlm.default_vision`: digits of held-out writers, shapes drawn from another seed) its
question, the PNG sent as a base64 `data:` URL, greedy, several at once so the server
batches them. A digit is right when the reply is the digit; a shape when the reply names
both its color and its kind ("a red circle"); the table also counts color and kind alone.
The validation file is found beside the run's data dir (its checkpoint records it), or
given with --validation. A run dir that is missing or text-only, or no validation file, is
one line and exit 2 before the server starts.
"""

import argparse
import base64
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.chat_exact_match import Server
from maxlm import checkpoint, default_vision
from maxlm.errors import UserError

MAX_TOKENS = 8  # the answers are at most "a purple triangle" (4 tokens or so)


def data_url(png: Path) -> str:
  return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def held_out_questions(validation: Path) -> list[dict]:
  """[{"image": PNG path, "question", "answer"}] of every validation row, in file order."""
  questions = []
  for line in validation.read_text(encoding="utf-8").splitlines():
    row = json.loads(line)
    user, assistant = row["messages"]
    questions.append({"image": validation.parent / row["image"], "question": user["content"],
                      "answer": assistant["content"]})
  return questions


def checked_validation_file(run_dir: str, validation: str | None) -> Path:
  """The held-out rows to ask, once `run_dir` is known to be a vision run: a mistake is a
  ValueError of one line, raised before a server starts."""
  try:
    _, meta = checkpoint.read_meta(run_dir)
    vision = checkpoint.config_from_meta(meta).vision
  except (FileNotFoundError, checkpoint.CorruptCheckpointError, UserError) as error:
    raise ValueError(f"--run_dir: {str(error).splitlines()[0]}") from None
  if vision is None:
    raise ValueError(f"--run_dir {run_dir} is a text-only run (no ModelConfig.vision); pass a "
                     "vision run, e.g. runs/vision_tiny_sft")
  if validation:
    if not Path(validation).is_file():
      raise ValueError(f"--validation {validation} is not a file")
    return Path(validation)
  beside = Path(meta["data_dir"]).parent / "validation.jsonl"
  if not beside.is_file():
    raise ValueError(f"--run_dir {run_dir} was trained on {meta['data_dir']}, which has no "
                     f"{beside.name} beside it (maxlm.default_vision's set has); pass "
                     "--validation=FILE of image chat rows")
  return beside


def ask(client: openai.OpenAI, model: str, question: dict) -> str:
  response = client.chat.completions.create(
      model=model, temperature=0.0, max_tokens=MAX_TOKENS, messages=[{
          "role": "user", "content": [
              {"type": "image_url", "image_url": {"url": data_url(question["image"])}},
              {"type": "text", "text": question["question"]}]}])
  return (response.choices[0].message.content or "").strip()


def words(text: str) -> list[str]:
  return text.lower().replace(".", " ").split()


def scores(questions: list[dict], replies: list[str]) -> dict[str, float]:
  """Fractions right: digit (the reply is the digit), shape (the answer's words, case and a
  full stop aside: color and kind both right), and shape color / shape kind alone."""
  right = {"digit": [], "shape": [], "shape_color": [], "shape_kind": []}
  for question, reply in zip(questions, replies):
    if question["question"] == default_vision.DIGIT_QUESTION:
      right["digit"].append(reply == question["answer"])
      continue
    _, color, kind = question["answer"].split()
    said = words(reply)
    right["shape"].append(said == words(question["answer"]))
    right["shape_color"].append(color in said)
    right["shape_kind"].append(kind in said)
  return {name: sum(hits) / max(len(hits), 1) for name, hits in right.items()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run_dir", required=True, help="a `python -m maxlm.train` workdir")
  parser.add_argument("--validation", default=None,
                      help="the image set's validation.jsonl; default: beside the run's data")
  parser.add_argument("--port", type=int, default=8012)
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
  args = parser.parse_args(argv)
  try:
    questions = held_out_questions(checked_validation_file(args.run_dir, args.validation))
  except ValueError as error:
    parser.error(str(error))
  with Server(args.run_dir, args.port, args.slots) as server:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=300)
    model = client.models.list().data[0].id
    started = time.perf_counter()
    with ThreadPoolExecutor(args.slots) as pool:
      replies = list(pool.map(lambda question: ask(client, model, question), questions))
    elapsed = time.perf_counter() - started
  accuracy = scores(questions, replies)
  digits = sum(q["question"] == default_vision.DIGIT_QUESTION for q in questions)
  for question, reply in list(zip(questions, replies))[:6]:
    print(f"  {question['image'].name} {question['question']!r}: answer "
          f"{question['answer']!r} | reply {reply!r}")
  print(f"| run | digits | digit accuracy | shapes | shape accuracy (color + kind) | color | kind "
        f"| seconds |\n|---|---|---|---|---|---|---|---|\n"
        f"| {args.run_dir} | {digits} | {accuracy['digit']:.3f} | {len(questions) - digits} "
        f"| {accuracy['shape']:.3f} | {accuracy['shape_color']:.3f} "
        f"| {accuracy['shape_kind']:.3f} | {elapsed:.0f} |")
  result = {"run_dir": args.run_dir, "digits": digits, "shapes": len(questions) - digits,
            **{f"{name}_accuracy": round(value, 4) for name, value in accuracy.items()},
            "seconds": round(elapsed, 1)}
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
