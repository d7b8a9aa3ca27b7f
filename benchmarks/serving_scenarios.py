"""Prefix caching and chunked prefill, each on and off, on two servers alternating in one run.

  python benchmarks/serving.py --scenario=prefix_cache|chunked_prefill [--json] [--rounds=3]

prefix_cache: every request is one 200-token system prompt plus its own question (token ids,
so the prefix is exactly 200 tokens), from --concurrency clients; TTFT with
--enable_prefix_caching against --no-enable_prefix_caching (`ttft_p50_ratio`, target <= 0.5).
chunked_prefill: --concurrency streams decode long generations while long prompts arrive
every --arrival_s; the streams' TPOT and gap between tokens with --max_prefill_chunk=32
against prefilling every prompt whole (`tpot_p99_ratio`).
"""

import asyncio
import random
from pathlib import Path

import httpx
import numpy as np

from benchmarks import serving as bench

SYSTEM_TOKENS = 200


def token_prompts(run_dir: Path, count: int, length: int, seed: int) -> list[list[int]]:
  """`count` prompts of `length` token ids from stdlib text, bos first."""
  import sentencepiece as spm

  from maxlm import checkpoint
  _, tokenizer_file = checkpoint.run_paths(run_dir)
  tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
  rng, texts = random.Random(seed), bench.stdlib_texts()
  result = []
  while len(result) < count:
    text = texts[rng.randrange(len(texts))]
    start = rng.randrange(max(1, len(text) - 4000))
    ids = tokenizer.encode(text[start:start + 4000])
    if len(ids) >= length - 1:
      result.append([tokenizer.bos_id()] + ids[:length - 1])
  return result


def request(model: str, prompt_ids: list[int], max_tokens: int) -> dict:
  return {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def gaps(outcome: bench.Outcome) -> list[float]:
  return list(np.diff(outcome.token_times))


def prefix_cache_round(url: str, model: str, run_dir: Path, args, seed: int) -> list:
  [system] = token_prompts(run_dir, 1, SYSTEM_TOKENS, seed=1000 + seed)
  questions = token_prompts(run_dir, args.requests, 24, seed=seed)
  requests = [request(model, system + question[1:], args.max_tokens) for question in questions]
  _, outcomes = asyncio.run(bench.drive(url, requests, args.concurrency))
  return outcomes


async def streams_under_arrivals(url: str, model: str, streams: list[list[int]],
                                 arrivals: list[list[int]], args) -> list[bench.Outcome]:
  """The streams' outcomes; the arrivals come while the streams decode (a tiny model makes
  its tokens in a few ms each, so they come `arrival_s` apart from the streams' start)."""
  async with httpx.AsyncClient(base_url=url, timeout=600,
                               limits=httpx.Limits(max_connections=64)) as client:
    running = [asyncio.create_task(bench.stream_one(client, request(model, ids, args.long_tokens)))
               for ids in streams]
    await asyncio.sleep(args.arrival_s)
    arriving = []
    for ids in arrivals:
      arriving.append(asyncio.create_task(bench.stream_one(client, request(model, ids, 4))))
      await asyncio.sleep(args.arrival_s)
    outcomes = await asyncio.gather(*running)
    await asyncio.gather(*arriving)
  return outcomes


def chunked_prefill_round(url: str, model: str, run_dir: Path, args, seed: int) -> list:
  streams = token_prompts(run_dir, args.concurrency, 16, seed=seed)
  arrivals = token_prompts(run_dir, args.arrivals, 240, seed=500 + seed)
  return asyncio.run(streams_under_arrivals(url, model, streams, arrivals, args))


SCENARIOS = {
    "prefix_cache": (prefix_cache_round, ("--enable_prefix_caching",
                                          "--no-enable_prefix_caching")),
    "chunked_prefill": (chunked_prefill_round, ("--max_prefill_chunk=32",
                                                "--max_prefill_chunk=0")),
}


def summary(outcomes: list) -> dict:
  tpots = [t for o in outcomes if (t := bench.tpot(o))]
  return {"ttft_p50_ms": 1e3 * bench.percentile([o.ttft_s for o in outcomes], 50),
          "ttft_p99_ms": 1e3 * bench.percentile([o.ttft_s for o in outcomes], 99),
          "tpot_p50_ms": 1e3 * bench.percentile(tpots, 50),
          "tpot_p99_ms": 1e3 * bench.percentile(tpots, 99),
          "token_gap_p99_ms": 1e3 * bench.percentile([g for o in outcomes for g in gaps(o)],
                                                     99)}


def run(args, run_dir: Path, workdir: Path) -> dict:
  """Both servers up at once (an idle one costs nothing), rounds alternating between them."""
  round_fn, (on_flag, off_flag) = SCENARIOS[args.scenario]
  servers = {}
  try:
    for port, (name, flag) in enumerate((("on", on_flag), ("off", off_flag)), args.port):
      servers[name] = bench.Server(run_dir, args.slots, port, workdir / f"{name}.log",
                                   args.kv_cache_memory, extra_args=[flag])
    model = servers["on"].model_name()
    outcomes = {name: [] for name in servers}
    for seed in range(args.rounds + 1):
      for name, server in servers.items():
        round_outcomes = round_fn(server.url, model, run_dir, args, seed)
        if seed:  # the first round warms connections and caches alike on both
          outcomes[name] += round_outcomes
    metrics = httpx.get(f"{servers['on'].url}/metrics", timeout=10).text
  finally:
    for server in servers.values():
      server.stop()
  result = {"scenario": args.scenario, "rounds": args.rounds, "concurrency": args.concurrency,
            "flags_on_off": [on_flag, off_flag]}
  for name in servers:
    result.update({f"{key}_{name}": value for key, value in summary(outcomes[name]).items()})
  for key in ("ttft_p50", "tpot_p99", "token_gap_p99"):
    result[f"{key}_ratio"] = result[f"{key}_ms_on"] / result[f"{key}_ms_off"]
  result["prefix_cache_hit_rate_on"] = next(
      (float(line.split()[-1]) for line in metrics.splitlines()
       if line.startswith("maxlm_prefix_cache_hit_rate ")), float("nan"))
  return result
