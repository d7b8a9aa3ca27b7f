"""Held-out exact match of a chat run on the embedded instruction set, answered through the
OpenAI-compatible server.

  python benchmarks/chat_exact_match.py --run_dir=runs/sft_tiny [--questions=200] [--json]

Starts `serving.server` on the run, asks the first `--questions` rows of the instruction set's
validation file (`maxlm.default_chat`: questions about stdlib lines no training row shows) with
the official `openai` client through /v1/chat/completions, greedy, several at once so the
server batches them, and counts a reply right when it equals the row's answer (surrounding
whitespace aside). A row of two turns asks its last one, with the first answered as in the
data. Prints a table (overall and per question, the kinds of default_chat.QUESTIONS plus its
two-turn follow-up) and, with --json, one JSON line.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from maxlm import default_chat  # noqa: E402

MAX_TOKENS = 48  # the answers are at most default_chat.MAX_ANSWER_CHARS (32) characters


def is_exact_match(reply: str | None, answer: str) -> bool:
  return reply is not None and reply.strip() == answer.strip()


def ask(client: openai.OpenAI, model: str, messages: list[dict]) -> str | None:
  response = client.chat.completions.create(model=model, messages=messages, temperature=0.0,
                                            max_tokens=MAX_TOKENS)
  return response.choices[0].message.content


def exact_match(client: openai.OpenAI, pairs: list[tuple[list[dict], str]],
                concurrency: int = 8) -> tuple[float, list[str | None]]:
  """(fraction of `pairs` (messages, answer) whose greedy reply is the answer, the replies)."""
  model = client.models.list().data[0].id
  with ThreadPoolExecutor(concurrency) as pool:
    replies = list(pool.map(lambda pair: ask(client, model, pair[0]), pairs))
  right = sum(is_exact_match(reply, answer) for reply, (_, answer) in zip(replies, pairs))
  return right / max(len(pairs), 1), replies


def question_text(messages: list[dict]) -> str:
  """The question a row asks last: its last user turn's first line (the line comes after)."""
  return [m for m in messages if m["role"] == "user"][-1]["content"].split("\n")[0]


def exact_match_by_question(pairs: list[tuple[list[dict], str]],
                            replies: list[str | None]) -> dict[str, tuple[int, float]]:
  """{question text: (how many rows ask it, fraction answered exactly)}, in first-asked order."""
  right, asked = {}, {}
  for (messages, answer), reply in zip(pairs, replies):
    text = question_text(messages)
    asked[text] = asked.get(text, 0) + 1
    right[text] = right.get(text, 0) + is_exact_match(reply, answer)
  return {text: (count, right[text] / count) for text, count in asked.items()}


class Server:
  """`python -m serving.server` on a run dir, until the context ends."""

  def __init__(self, run_dir: str, port: int, slots: int):
    self.url = f"http://127.0.0.1:{port}"
    self.log = tempfile.NamedTemporaryFile("w+", prefix="chat_exact_match_", suffix=".log")
    self.process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", f"--checkpoint_dir={run_dir}",
         f"--port={port}", f"--slots={slots}", "--max_queue=256"],
        cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)

  def __enter__(self) -> "Server":
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        self.log.seek(0)
        raise RuntimeError(f"the server exited:\n{self.log.read()[-2000:]}")
      try:
        if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
          return self
      except httpx.TransportError:
        pass
      time.sleep(0.5)
    raise RuntimeError("the server did not become healthy in 600 s")

  def __exit__(self, *exc):
    self.process.terminate()
    self.process.wait(timeout=120)
    self.log.close()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run_dir", required=True, help="a `python -m maxlm.train` workdir")
  parser.add_argument("--questions", type=int, default=200,
                      help="how many validation rows to ask, from the first")
  parser.add_argument("--port", type=int, default=8011)
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
  args = parser.parse_args(argv)
  validation = Path(default_chat.ensure_default_chat("sft")).parent / "chat_validation.jsonl"
  pairs = default_chat.questions_and_answers(validation)[:args.questions]
  with Server(args.run_dir, args.port, args.slots) as server:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=300)
    started = time.perf_counter()
    score, replies = exact_match(client, pairs, concurrency=args.slots)
    elapsed = time.perf_counter() - started
  for (messages, answer), reply in list(zip(pairs, replies))[:5]:
    print(f"  {messages[-1]['content']!r}\n    answer {answer!r} | reply {reply!r}")
  by_question = exact_match_by_question(pairs, replies)
  result = {"run_dir": args.run_dir, "questions": len(pairs), "exact_match": score,
            "seconds": round(elapsed, 1),
            "by_question": {text: {"questions": count, "exact_match": round(em, 3)}
                            for text, (count, em) in by_question.items()}}
  print(f"| run | questions | exact match | seconds |\n|---|---|---|---|\n"
        f"| {args.run_dir} | {len(pairs)} | {score:.3f} | {elapsed:.0f} |\n")
  print("| question | questions | exact match |\n|---|---|---|")
  for text, (count, em) in by_question.items():
    print(f"| {text} | {count} | {em:.3f} |")
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
