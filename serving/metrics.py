"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
  content_type = CONTENT_TYPE_LATEST

  def __init__(self):
    self.registry = CollectorRegistry()
    self.requests = Counter("maxlm_requests", "HTTP requests answered, by path and status",
                            ["path", "status"], registry=self.registry)
    self.prompt_tokens = Counter("maxlm_prompt_tokens", "Prompt tokens prefilled",
                                 registry=self.registry)
    self.generated_tokens = Counter("maxlm_generated_tokens", "Tokens generated",
                                    registry=self.registry)
    self.time_to_first_token = Histogram(
        "maxlm_time_to_first_token_seconds", "From request accepted to its first token",
        buckets=LATENCY_BUCKETS_S, registry=self.registry)
    self.time_per_output_token = Histogram(
        "maxlm_time_per_output_token_seconds", "Between consecutive tokens of one request",
        buckets=LATENCY_BUCKETS_S, registry=self.registry)
    self.queue_depth = Gauge("maxlm_queue_depth", "Requests waiting for a decode slot",
                             registry=self.registry)
    self.preemptions = Counter("maxlm_preemptions", "Requests preempted when the KV cache "
                               "ran out of blocks (each resumes later)", registry=self.registry)
    self.prefix_cache_queries = Counter(
        "maxlm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
        registry=self.registry)
    self.prefix_cache_hits = Counter(
        "maxlm_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache",
        registry=self.registry)
    self.prefix_cache_hit_rate = Gauge(
        "maxlm_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache over all "
        "prompt tokens looked up, since the start", registry=self.registry)
    self._prefix_tokens = [0, 0]  # (looked up, served from the cache) for the hit rate
    self.active_slots = Gauge("maxlm_active_slots", "Decode slots holding a request now",
                              registry=self.registry)
    self.scoring_programs_compiling = Gauge(
        "maxlm_scoring_programs_compiling", "Scoring programs (pack shapes) compiling on their "
        "own thread; their packs run on a wider compiled one until then", registry=self.registry)

  def observe_prefix_cache(self, prompt_tokens: int, cached_tokens: int):
    self.prefix_cache_queries.inc(prompt_tokens)
    self.prefix_cache_hits.inc(cached_tokens)
    self._prefix_tokens[0] += prompt_tokens
    self._prefix_tokens[1] += cached_tokens
    self.prefix_cache_hit_rate.set(self._prefix_tokens[1] / max(1, self._prefix_tokens[0]))

  def exposition(self) -> bytes:
    return generate_latest(self.registry)


class CountResponses:
  """ASGI middleware counting responses by status (pure ASGI, so streams pass straight through)."""

  def __init__(self, app: ASGIApp, metrics: ServerMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope: Scope, receive: Receive, send: Send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def counting_send(message: Message):
      if message["type"] == "http.response.start":
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.metrics.requests.labels(path, str(message["status"])).inc()
      await send(message)

    await self.app(scope, receive, send=counting_send)
