"""The chat template, as serving uses it; `beam_pipelines.chat_template` owns it, so a served
prompt renders to the ids the same turns had in training."""

from beam_pipelines.chat_template import (CHAT_STOPS, IMAGE_TOKEN, RESERVED_TOKENS, ROLES,
                                          chat_prompt, missing_pieces)

__all__ = ["CHAT_STOPS", "IMAGE_TOKEN", "RESERVED_TOKENS", "ROLES", "chat_prompt",
           "missing_pieces"]
