"""Serving: a JetStream-style engine, continuous batching, an OpenAI-compatible REST server."""

from serving.engine import ContextLengthError, Engine, SamplingSettings
from serving.orchestrator import Delta, Orchestrator, QueueFull, Request, Unavailable

__all__ = ["ContextLengthError", "Delta", "Engine", "Orchestrator", "QueueFull", "Request",
           "SamplingSettings", "Unavailable"]
