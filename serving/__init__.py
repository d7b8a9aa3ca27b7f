"""Serving: a checkpoint behind an engine (text in, text out) and an OpenAI-compatible server."""

from serving.engine import Completion, ContextLengthError, Delta, Engine

__all__ = ["Completion", "ContextLengthError", "Delta", "Engine"]
