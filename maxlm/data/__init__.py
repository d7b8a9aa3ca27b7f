"""ArrayRecord shards -> Grain -> per-process batches whose iterator state is checkpointable."""

from maxlm.data.loader import (
    iterator_restore_args,
    iterator_save_args,
    load_manifest,
    make_dataset,
    tokenizer_path,
)

__all__ = [
    "iterator_restore_args",
    "iterator_save_args",
    "load_manifest",
    "make_dataset",
    "tokenizer_path",
]
