"""The decoder-only transformer."""

from maxlm.model.transformer import (LORA_TARGETS, KVCache, ModelConfig, Transformer,
                                     count_params, init_kv_cache, merge_adapters,
                                     training_flops_per_token)

__all__ = ["LORA_TARGETS", "KVCache", "ModelConfig", "Transformer", "count_params",
           "init_kv_cache", "merge_adapters", "training_flops_per_token"]
