"""Multiple-choice log-likelihood throughput: through serving.server (lm-eval's requests), in
process (`maxlm.evals`), and Hugging Face transformers scoring the same items in process.

  python benchmarks/evaluate.py --checkpoint_dir=runs/tiny [--items=64] [--batch=8] [--json]
      [--engine_cpus=all] [--concurrent=4] [--hf_batches=8,16,32,64]

The items (`--item_kind`) come from the stdlib's `textwrap` source: `lines`, a context of
10-25 characters and four 20-character continuations; `lettered`, MMLU's shape (a 12-line
passage, four options lettered A-D, one-token answers); `endings`, HellaSwag's shape (three
lines, four endings of up to 60 characters). lm-eval sends an item's choices in one request
only when they are as long, as `lettered`'s are; elsewhere its longest-first order sends them
in different requests, and the server's cache of scored prompts (`--scoring_cache_mb`,
`serving.scoring_cache`) computes the context once for the choices that come later. Each
side scores the same token ids (tokenizing is left out of every timing): the server gets
lm-eval's `local-completions` request (echo, logprobs=1, max_tokens=1, `--batch` token-id
prompts per request, in lm-eval's order: longest first) from one client, which the server
packs into one forward, computing prompts' shared prefixes once (`serving.scoring`); the
server runs with `--engine_cpus=all`, as the other two use every core (a scoring request's
HTTP work is small beside its forward); in process,
`maxlm.evals.scoring.score` batches `--batch` rows per forward pass, each row a group of
sequences that begin alike (an item's choices: its context once); transformers runs
`LlamaForCausalLM` with the same weights (benchmarks/hf_llama.py) on right-padded batches of
`--batch` rows made as lm-eval's `hf` model makes them (`hf_rows`: its logits cache, on by
default, scores prompts that differ only in their last token in one row, so an item's one-token
choices cost one row, as `lettered`'s do) (on the CUDA GPU when JAX runs on one, float32
matmuls in TF32 on both sides). Each
figure is the best of `--rounds` passes after a warm-up pass (for the server and its replay,
`COMPILE_AFTER` passes and then until none of its scoring programs is still compiling on its
own thread: the steady state); the log-likelihoods are checked to agree.
`server_first_pass_items_per_s` is the first pass through the freshly started server (started
without a compilation cache): what a user's first run of these items meets, packs whose
programs have not compiled yet running on wider ones meanwhile.
`ratio_vs_hf` is server items/s over transformers', both at `--batch`; `http_overhead` is
in-process items/s over the server's. Two further rows: the server with `--concurrent` requests
in flight at once (lm-eval's `num_concurrent`; the server packs requests waiting together into
one forward), and transformers at the best of `--hf_batches` (`ratio_best_vs_hf_best` sets the
faster server row against it). Without torch and transformers (`pip install -e .[bench]`) the
hf fields are null.
What each side computes, to read the ratio by: `server_tokens` is the sum of the server's
forward widths over lm-eval's requests (one client: each request one pack, shared prefixes
once, a context kept from an earlier request not again, padded to a pack width),
`hf_tokens` the sum of transformers' padded batch shapes at `--batch`;
`work_ratio_hf_vs_server` is the one over the other and `rate_ratio_vs_hf` the server's
tokens/s over transformers', so `ratio_vs_hf` = work ratio x rate ratio. Where
lm-eval's requests leave little to share (`lines`: contexts of a few tokens), the work ratio
is about 1 and the ratio is the rate ratio alone. `server_forwards_only_items_per_s` replays
the server's scoring of those requests (`Scorer.score_with_cache` from an empty cache, or
with `--scoring_cache_mb=0` its packs: the same widths, the same compiled forwards) in
process with nothing around them, and
`ratio_bound_vs_hf` sets it against transformers: the most any request handling could reach.
"""

import argparse
import functools
import json
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import machine_load  # noqa: E402
from maxlm.evals import multiple_choice, scoring  # noqa: E402
from serving import scoring_cache  # noqa: E402
from serving.engine import Engine, SamplingSettings, device_settings  # noqa: E402
from serving.scoring import (COMPILE_AFTER, Scorer, pack, pack_takes,  # noqa: E402
                             score_pack_fn, scoring_graphdef)

CHOICES = 4
PASSAGE_LINES = 12
ENDING_CONTEXT_LINES = 3


def make_items(count: int) -> list[tuple[str, list[str]]]:
  lines = [line.strip() for line in Path(textwrap.__file__).read_text().splitlines()
           if len(line.strip()) > 30]
  rng = np.random.default_rng(0)
  items = []
  for _ in range(count):
    picked = [lines[i] for i in rng.choice(len(lines), CHOICES, replace=False)]
    cut = int(rng.integers(10, 25))
    items.append((picked[0][:cut], [line[cut:cut + 20] for line in picked]))
  return items


def make_lettered_items(count: int) -> list[tuple[str, list[str]]]:
  """MMLU's shape: a passage, a question listing four options lettered A-D, "Answer:", and
  the letters as the continuations (one token each). The passage is `textwrap`'s source."""
  lines = [line.rstrip() for line in Path(textwrap.__file__).read_text().splitlines()
           if line.strip()]
  options = [line.strip() for line in lines if len(line.strip()) > 30]
  rng = np.random.default_rng(0)
  items = []
  for _ in range(count):
    start = int(rng.integers(0, len(lines) - PASSAGE_LINES))
    window = lines[start:start + PASSAGE_LINES]
    inside = [line.strip() for line in window if len(line.strip()) > 30] or [window[0].strip()]
    picked = [inside[int(rng.integers(len(inside)))],
              *(options[i] for i in rng.choice(len(options), CHOICES - 1, replace=False))]
    picked = [picked[i] for i in rng.permutation(CHOICES)]
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", picked))
    context = ("\n".join(window)
               + f"\n\nWhich of these lines is from the passage above?\n{listed}\nAnswer:")
    items.append((context, list("ABCD")))
  return items


def make_ending_items(count: int) -> list[tuple[str, list[str]]]:
  """HellaSwag's shape: a context of a few lines (~50 tokens), four candidate endings of up to
  60 characters (~15-25 tokens): the line that follows and three lines from elsewhere."""
  lines = [line.strip() for line in Path(textwrap.__file__).read_text().splitlines()
           if len(line.strip()) > 30]
  rng = np.random.default_rng(0)
  items = []
  for _ in range(count):
    start = int(rng.integers(0, len(lines) - ENDING_CONTEXT_LINES - 1))
    context = "\n".join(lines[start:start + ENDING_CONTEXT_LINES])
    others = rng.choice(len(lines), CHOICES - 1, replace=False)
    endings = [lines[start + ENDING_CONTEXT_LINES], *(lines[i] for i in others)]
    items.append((context, [ending[:60] for ending in endings]))
  return items


ITEM_KINDS = {"lines": make_items, "lettered": make_lettered_items, "endings": make_ending_items}


def encoded(engine: Engine, items) -> list[tuple[list[int], int]]:
  """(context + continuation ids, context length) per choice, as lm-eval splits them."""
  pairs = []
  for context, choices in items:
    for choice in choices:
      context_ids, continuation_ids = multiple_choice.encode_pair(engine.tokenizer, context,
                                                                  " " + choice)
      pairs.append((context_ids + continuation_ids, len(context_ids)))
  return pairs


def difference(a: list[float], b: list[float]) -> float:
  return float(np.max(np.abs(np.array(a) - np.array(b))))


def best_seconds(run, rounds: int, settle=None) -> tuple[float, list[float]]:
  """The best of `rounds` passes of `run` after a warm-up pass (compiles every bucket), or
  after `settle(run)` where a scorer compiles its programs on a thread of their own
  (`settled`)."""
  result = run() if settle is None else settle(run)
  times = []
  for _ in range(rounds):
    started = time.perf_counter()
    result = run()
    times.append(time.perf_counter() - started)
  return min(times), result


def settled(compiling, most_passes: int = 12):
  """A `best_seconds` warm-up for a Scorer, whose packs ask for their own programs
  `COMPILE_AFTER` times before those compile on its compiler thread (running on wider ones
  meanwhile): that many passes, then, while a pass leaves programs compiling
  (`compiling()`), until they are done and another pass (concurrent requests pack
  differently each pass), at most `most_passes` in all."""
  def settle(run):
    for _ in range(COMPILE_AFTER):
      result = run()
    for _ in range(most_passes - COMPILE_AFTER):
      if not compiling():
        break
      deadline = time.monotonic() + 600
      while compiling() and time.monotonic() < deadline:
        time.sleep(0.2)
      result = run()
    return result
  return settle


def first_pass_seconds(run) -> float:
  started = time.perf_counter()
  run()
  return time.perf_counter() - started


def in_process(engine: Engine, pairs, batch: int):
  model = scoring.EvalModel(scoring_graphdef(engine), engine.params, engine.tokenizer,
                            engine.context_length, batch_size=batch)
  def run():
    scored = scoring.score(model, [ids for ids, _ in pairs])
    return [float(np.sum(logprobs[length - 1:])) for (_, length), (logprobs, _) in
            zip(pairs, scored)]
  return run


def server_batches(prompts: list[list[int]], budget: int) -> list[list[list[int]]]:
  """One request's `prompts` as the server's Scorer takes them with no other request waiting:
  in order, each pack while it takes the next prompt (`pack_takes`, as `Scorer._next_batch`)."""
  batches = []
  for prompt in prompts:
    if batches and pack_takes(batches[-1], prompt, budget):
      batches[-1].append(prompt)
    else:
      batches.append([prompt])
  return batches


def server_packs(pairs, batch: int, budget: int) -> list:
  """The server's packs for lm-eval's requests (one client), as its Scorer lays them within
  `budget` (the context length)."""
  return [pack(prompts, budget) for chunk in request_chunks(pairs, batch)
          for prompts in server_batches([pairs[i][0] for i in chunk], budget)]


def packs_alone(engine: Engine, packs):
  """The server's own forwards over `packs` (the logprobs=1 program), with nothing else: no
  HTTP, no request handling, no response. What serving can reach at best with this work."""
  score = jax.jit(functools.partial(score_pack_fn, scoring_graphdef(engine), top=1))

  def run():
    return [jax.device_get(score(engine.params, laid.tokens, laid.positions, laid.segment_ids,
                                 laid.branch_ids, laid.predecessor, laid.last)[0])
            for laid in packs]
  return run


def cached_scoring_alone(engine: Engine, pairs, batch: int, cache_bytes: int):
  """The server's scoring of lm-eval's requests with its cache of scored prompts
  (`Scorer.score_with_cache`, a request a forward, from an empty cache each pass), with
  nothing else: no HTTP, no request handling, no response. Returns (run, widths, settle):
  the row width of each forward of the last pass, and its `best_seconds` warm-up."""
  scorer, widths = Scorer(engine, cache_bytes=cache_bytes), []
  greedy = device_settings(SamplingSettings(temperature=0.0))
  forward = scorer._score_context[1]

  def counted(*arguments, **windows):
    if threading.current_thread() is threading.main_thread():  # not the compiler's
      widths.append(arguments[1].shape[1])
    return forward(*arguments, **windows)

  scorer._score_context[1] = counted

  def run():
    scorer.context_cache, widths[:] = scoring_cache.ContextCache(cache_bytes), []
    return [scorer.score_with_cache(prompts, 1, [greedy] * len(prompts))
            for chunk in request_chunks(pairs, batch)
            for prompts in server_batches([pairs[i][0] for i in chunk], scorer.budget)]
  return run, widths, settled(scorer.programs_compiling)


def lm_eval_order(pairs) -> list[int]:
  """The order lm-eval's local-completions sends log-likelihood requests in: longest first,
  then by token ids (its Collator), so an item's choices meet in one request only when their
  lengths do."""
  return sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]), tuple(pairs[i][0])))


def request_chunks(pairs, batch: int) -> list[list[int]]:
  """lm-eval's requests: `batch` prompts each, in its order."""
  order = lm_eval_order(pairs)
  return [order[start:start + batch] for start in range(0, len(order), batch)]


def hf_rows(pairs) -> list[list[int]]:
  """Transformers' rows as lm-eval's `hf` model makes them (its logits cache, on by default):
  each row is a prompt without its last token, and prompts that differ only in their last
  token share one row (an item's one-token choices: its context once). Each row lists the
  pairs it scores."""
  rows: dict[tuple[int, ...], list[int]] = {}
  for i, (ids, _) in enumerate(pairs):
    rows.setdefault(tuple(ids[:-1]), []).append(i)
  return list(rows.values())


def hf_tokens(pairs, batch: int) -> int:
  """Transformers' padded batch shapes summed: `with_transformers`'s batches of `batch` rows."""
  lengths = sorted(len(pairs[members[0]][0]) - 1 for members in hf_rows(pairs))
  return sum(len(rows) * max(rows) for rows in
             (lengths[start:start + batch] for start in range(0, len(lengths), batch)))


def through_server(url: str, pairs, batch: int, concurrent: int = 1):
  """lm-eval's requests of `batch` prompts, `concurrent` of them in flight at once."""
  client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=concurrent))
  chunks = request_chunks(pairs, batch)
  results = [0.0] * len(pairs)

  def send(chunk):
    body = client.post(f"{url}/v1/completions", json={
        "model": "bench", "prompt": [pairs[i][0] for i in chunk], "max_tokens": 1,
        "logprobs": 1, "echo": True, "temperature": 0}).json()
    for i, choice in zip(chunk, body["choices"]):
      results[i] = float(sum(choice["logprobs"]["token_logprobs"][pairs[i][1]:-1]))

  def run():
    client.post(f"{url}/reset_prefix_cache").raise_for_status()  # each pass as the first
    if concurrent == 1:
      for chunk in chunks:
        send(chunk)
    else:
      with ThreadPoolExecutor(concurrent) as pool:
        list(pool.map(send, chunks))
    return list(results)
  return run


def server_compiling(url: str) -> int:
  """The server's scoring programs compiling now (its /metrics gauge)."""
  for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
    if line.startswith("maxlm_scoring_programs_compiling "):
      return int(float(line.split()[1]))
  raise SystemExit("the server's /metrics has no maxlm_scoring_programs_compiling")


def with_transformers(engine: Engine, pairs):
  """`run_at(batch)`, transformers' scoring pass at a batch size over one model built once,
  or None without torch and transformers."""
  try:
    import torch  # noqa: PLC0415
    from benchmarks.hf_llama import to_hf_llama  # noqa: PLC0415
  except ImportError:
    return None
  # on the CUDA GPU when JAX (the server) runs on one, its float32 matmuls in TF32 as XLA's are
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  model = to_hf_llama(engine.params, engine.config).to(device)
  rows = sorted(hf_rows(pairs), key=lambda members: len(pairs[members[0]][0]))

  def run_at(batch: int):
    def run():
      results = [0.0] * len(pairs)
      with torch.no_grad():
        for start in range(0, len(rows), batch):
          batch_rows = rows[start:start + batch]
          inputs = [pairs[members[0]][0][:-1] for members in batch_rows]
          width = max(map(len, inputs))
          tokens = torch.zeros((len(inputs), width), dtype=torch.long)
          mask = torch.zeros((len(inputs), width), dtype=torch.long)
          for row, ids in enumerate(inputs):
            tokens[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
          logprobs = torch.log_softmax(model(tokens.to(device), attention_mask=mask.to(
              device)).logits.float(), -1)
          for row, members in enumerate(batch_rows):
            for i in members:
              ids, length = pairs[i]
              targets = torch.tensor(ids[length:], device=device)
              results[i] = float(logprobs[row, length - 1:len(ids) - 1].gather(
                  -1, targets[:, None]).sum())
      return results
    return run
  return run_at


def start_server(checkpoint_dir: str, port: int, engine_cpus: str,
                 scoring_cache_mb: int) -> subprocess.Popen:
  process = subprocess.Popen([sys.executable, "-m", "serving.server",
                              f"--checkpoint_dir={checkpoint_dir}", f"--port={port}",
                              "--model_name=bench", f"--engine_cpus={engine_cpus}",
                              f"--scoring_cache_mb={scoring_cache_mb}",
                              "--compilation_cache_dir="],  # its first pass as a new user's
                             cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    try:
      if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
        return process
    except httpx.TransportError:
      time.sleep(0.5)
  process.kill()
  raise SystemExit("serving.server did not become healthy in 300 s")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--items", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--item_kind", choices=sorted(ITEM_KINDS), default="lines")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--port", type=int, default=8765)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--engine_cpus", default="all", help="serving.server's --engine_cpus")
  parser.add_argument("--scoring_cache_mb", type=int, default=scoring_cache.DEFAULT_MEGABYTES,
                      help="serving.server's --scoring_cache_mb (0: no cache of scored prompts)")
  parser.add_argument("--concurrent", type=int, default=4,
                      help="requests in flight at once for the server's second row")
  parser.add_argument("--hf_batches", default="8,16,32,64",
                      help="transformers batch sizes tried for its best row")
  args = parser.parse_args(argv)
  machine = machine_load.load_before_run()
  engine = Engine.from_checkpoint(args.checkpoint_dir, slots=1)
  pairs = encoded(engine, ITEM_KINDS[args.item_kind](args.items))
  local_s, local = best_seconds(in_process(engine, pairs, args.batch), args.rounds)
  if args.scoring_cache_mb:
    replay, widths, settle = cached_scoring_alone(engine, pairs, args.batch,
                                                  args.scoring_cache_mb << 20)
    forward_s, _ = best_seconds(replay, args.rounds, settle)
    served_tokens = sum(widths)
  else:
    packs = server_packs(pairs, args.batch, engine.context_length)
    forward_s, _ = best_seconds(packs_alone(engine, packs), args.rounds)
    served_tokens = sum(laid.tokens.shape[1] for laid in packs)
  hf_seconds = {}  # batch size -> (seconds, log-likelihoods)
  if hf_run := with_transformers(engine, pairs):
    for batch in sorted({args.batch, *map(int, args.hf_batches.split(","))}):
      hf_seconds[batch] = best_seconds(hf_run(batch), args.rounds)
  hf_s = hf_seconds[args.batch][0] if args.batch in hf_seconds else None
  hf_best_batch = min(hf_seconds, key=lambda batch: hf_seconds[batch][0], default=None)
  server = start_server(args.checkpoint_dir, args.port, args.engine_cpus, args.scoring_cache_mb)
  url = f"http://127.0.0.1:{args.port}"
  try:
    settle = settled(lambda: server_compiling(url))
    first_s = first_pass_seconds(through_server(url, pairs, args.batch))
    server_s, served = best_seconds(through_server(url, pairs, args.batch), args.rounds, settle)
    concurrent_s, served_concurrently = best_seconds(
        through_server(url, pairs, args.batch, args.concurrent), args.rounds, settle)
  finally:
    server.terminate()
    server.wait()
  per_s = lambda seconds: args.items / seconds if seconds else None  # noqa: E731
  padded_tokens = hf_tokens(pairs, args.batch)
  hf_best_s = hf_seconds[hf_best_batch][0] if hf_seconds else None
  result = {"items": args.items, "choices_per_item": CHOICES, "batch": args.batch,
            "engine_cpus": args.engine_cpus, "scoring_cache_mb": args.scoring_cache_mb,
            "server_items_per_s": per_s(server_s), "in_process_items_per_s": per_s(local_s),
            "server_first_pass_items_per_s": per_s(first_s),
            "hf_items_per_s": per_s(hf_s),
            "ratio_vs_hf": per_s(server_s) / per_s(hf_s) if hf_s else None,
            "http_overhead": per_s(local_s) / per_s(server_s),
            "server_forwards_only_items_per_s": per_s(forward_s),
            "ratio_bound_vs_hf": per_s(forward_s) / per_s(hf_s) if hf_s else None,
            "server_tokens": served_tokens, "hf_tokens": padded_tokens,
            "work_ratio_hf_vs_server": padded_tokens / served_tokens,
            "rate_ratio_vs_hf": (served_tokens / server_s) / (padded_tokens / hf_s)
                                if hf_s else None,
            "concurrent": args.concurrent,
            "server_concurrent_items_per_s": per_s(concurrent_s),
            "hf_best_batch": hf_best_batch, "hf_best_items_per_s": per_s(hf_best_s),
            "ratio_best_vs_hf_best": (per_s(min(server_s, concurrent_s)) / per_s(hf_best_s)
                                      if hf_best_s else None),
            "max_loglikelihood_difference_server_vs_in_process": max(
                difference(served, local), difference(served_concurrently, local)),
            "max_loglikelihood_difference_hf_vs_in_process":
                max(difference(hf_, local) for _, hf_ in hf_seconds.values())
                if hf_seconds else None,
            "machine_before_run": machine}
  rows = [("server", "server_items_per_s"), ("server 1st pass", "server_first_pass_items_per_s"),
          (f"server x{args.concurrent}", "server_concurrent_items_per_s"),
          ("in_process", "in_process_items_per_s"),
          ("server forwards", "server_forwards_only_items_per_s"), ("hf", "hf_items_per_s"),
          (f"hf batch {hf_best_batch}", "hf_best_items_per_s")]
  print(f"\n{'scorer':<16}{'items/s':>10}")
  for name, key in rows:
    value = result[key]
    print(f"{name:<16}{value:>10.1f}" if value else f"{name:<16}{'n/a':>10}")
  print(f"tokens computed: server {served_tokens}, transformers b{args.batch} {padded_tokens} "
        f"(work ratio {result['work_ratio_hf_vs_server']:.2f})")
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
