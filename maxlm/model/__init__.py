"""The decoder-only transformer."""

from maxlm.model.transformer import (KVCache, ModelConfig, Transformer, count_params,
                                     init_kv_cache)

__all__ = ["KVCache", "ModelConfig", "Transformer", "count_params", "init_kv_cache"]
