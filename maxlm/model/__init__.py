"""The decoder-only transformer."""

from maxlm.model.transformer import (KVCache, ModelConfig, Transformer, count_params,
                                     init_kv_cache, training_flops_per_token)

__all__ = ["KVCache", "ModelConfig", "Transformer", "count_params", "init_kv_cache",
           "training_flops_per_token"]
