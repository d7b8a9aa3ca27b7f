"""Packed ArrayRecord shards -> per-process batches of int32 arrays, through Grain.

Checkpointing the iterator with Orbax: Grain's handler is `grain.checkpoint.CheckpointHandler`.
Importing grain registers it with Orbax for `grain.checkpoint.CheckpointSave`/`CheckpointRestore`
(what `iterator_save_args`/`iterator_restore_args` return), so a `CheckpointManager` driven by
`ocp.args.Composite(..., data_iter=...)` needs no extra setup. A manager built with explicit
`item_handlers` must list `data_iter=grain.checkpoint.CheckpointHandler()`. The handler writes one
`process_{i}-of-{n}.json` per JAX process, so restore with the same process count.
"""

import bisect
import functools
import itertools
import json
import os

from etils import epath
import grain
import jax

from beam_pipelines.records import (MANIFEST_NAME, RECORD_FORMAT, RECORD_FORMAT_V1, TOKENIZER_NAME,
                                    Fields, decode_record, empty_record, fields_of_manifest)
from maxlm.errors import UserError

PREPARE_COMMAND = "`python -m beam_pipelines.prepare_text`"
_MAX_SEED = 2**32


def load_manifest(data_dir: str | os.PathLike) -> dict:
  """Reads `data_dir/manifest.json`, checking its format and that every listed shard exists."""
  root = epath.Path(data_dir)
  if not root.is_dir():
    raise FileNotFoundError(
        f"--data_dir {data_dir} does not exist; point it at the output of {PREPARE_COMMAND}")
  manifest_path = root / MANIFEST_NAME
  if not manifest_path.exists():
    raise FileNotFoundError(
        f"--data_dir {data_dir} has no {MANIFEST_NAME}; run {PREPARE_COMMAND} first")
  manifest = _parse_manifest(manifest_path)
  _check_format(manifest, manifest_path)
  for split in manifest["splits"]:
    _check_shards_exist(root, manifest, split)
  return manifest


def _parse_manifest(manifest_path: epath.Path) -> dict:
  try:
    return json.loads(manifest_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{manifest_path} is not valid JSON ({e}); re-run {PREPARE_COMMAND} to rewrite it") from e


def _check_format(manifest: dict, manifest_path: epath.Path) -> None:
  found = manifest.get("format") if isinstance(manifest, dict) else None
  if found not in (RECORD_FORMAT, RECORD_FORMAT_V1):
    raise ValueError(
        f"{manifest_path} has format {found!r} but maxlm reads {RECORD_FORMAT!r} (and "
        f"{RECORD_FORMAT_V1!r}); re-run {PREPARE_COMMAND} with this version of maxlm")
  missing = {"seq_len", "splits"} - manifest.keys()
  if missing:
    raise ValueError(
        f"{manifest_path} lacks {sorted(missing)}; re-run {PREPARE_COMMAND} to rewrite it")
  try:
    fields_of_manifest(manifest)
  except ValueError as e:
    raise ValueError(f"{manifest_path}: {e}") from e


def _check_shards_exist(root: epath.Path, manifest: dict, split: str) -> None:
  for shard in manifest["splits"][split]["shards"]:
    if not (root / shard).exists():
      raise FileNotFoundError(
          f"--data_dir {root} is missing shard {shard} listed in {MANIFEST_NAME}; copy the whole "
          f"directory or re-run {PREPARE_COMMAND}")


def tokenizer_path(data_dir: str | os.PathLike) -> epath.Path:
  """The SentencePiece model the data dir was tokenized with."""
  manifest = load_manifest(data_dir)
  path = epath.Path(data_dir) / manifest.get("tokenizer", {}).get("file", TOKENIZER_NAME)
  if not path.exists():
    raise FileNotFoundError(
        f"--data_dir {data_dir} has no {path.name}; re-run {PREPARE_COMMAND} to write it")
  return path


def split_shard_paths(data_dir: str | os.PathLike, manifest: dict, split: str) -> list[str]:
  """Absolute paths of `split`'s ArrayRecord shards, in manifest order."""
  if split not in manifest["splits"]:
    raise ValueError(
        f"--data_dir {data_dir} has no split {split!r}; pick one of {sorted(manifest['splits'])}")
  return [os.fspath(epath.Path(data_dir) / shard) for shard in manifest["splits"][split]["shards"]]


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple of the "
        f"{process_count} JAX processes; set it to a multiple of {process_count}")
  return global_batch_size // process_count


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this reader; None means the JAX process's own."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(
        f"process_index={index} is outside [0, process_count={count}); pass both or neither")
  return index, count


def make_dataset(
    data_dir: str | os.PathLike,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool | None = None,
    read_threads: int = 0,
) -> grain.IterDataset:
  """Batches of `split` for this process: {field: [global_batch_size // process_count, *shape]}
  of each field the manifest lists, in its dtype (packed text: int32 [.., seq_len] `tokens`,
  `segment_ids` and `positions`).

  Every process sees the same global order (each epoch shuffled with its own permutation from
  `seed`; `num_epochs=None` repeats forever) and takes its own block of rows of each global
  batch, so a run is the same on any number of processes. `drop_remainder=None` means
  `shuffle`: training batches span epoch boundaries, while eval (`shuffle=False, num_epochs=1`)
  pads its last global batch with empty sequences (segment_ids 0) so every sequence is seen
  exactly once and every process runs the same number of steps. A training split written per
  source (its manifest entry has `sources` with weights) is a weighted mixture of the sources
  instead of one shuffled sequence. `read_threads > 0` decodes records in background threads.
  `iter(ds)` gives a checkpointable `grain.DatasetIterator` (`get_state`/`set_state`).
  """
  manifest = load_manifest(data_dir)
  index, count = resolve_process(process_index, process_count)
  batch_size = per_process_batch_size(global_batch_size, count)
  _check_epochs_and_seed(num_epochs, seed)
  shard_paths = split_shard_paths(data_dir, manifest, split)
  records = grain.MapDataset.source(_NamedShards(shard_paths))
  _check_record_count(records, manifest, data_dir, split, count)
  weights = source_weights(manifest, split)
  if shuffle and len(weights) > 1:
    records = mixture(data_dir, manifest, split, weights, seed, num_epochs, len(records))
  else:
    if shuffle:
      records = records.shuffle(seed=seed)
    records = records.repeat(num_epochs)
  drop_remainder = shuffle if drop_remainder is None else drop_remainder
  rows = rows_of_process(records, global_batch_size, index, count,
                         pad_last_batch=not drop_remainder and num_epochs is not None)
  sequences = rows.map(functools.partial(_decode_or_pad, fields=fields_of_manifest(manifest),
                                         shard_paths=shard_paths))
  read_options = grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=2 * batch_size if read_threads else 0)
  return sequences.to_iter_dataset(read_options).batch(batch_size, drop_remainder=True)


class _NamedShards:
  """ArrayRecord shards read as one random-access source. array_record reports a truncated or
  corrupt shard as a RuntimeError naming neither the file nor the record, at open (a cut-off
  file has lost its index, which is written last) or at read (a damaged chunk); both become a
  UserError naming the shard, and the record within it."""

  def __init__(self, paths: list[str]):
    self._paths = paths
    self._shards = [_open_shard(path) for path in paths]
    self._ends = list(itertools.accumulate(len(shard) for shard in self._shards))

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> bytes:
    shard = bisect.bisect_right(self._ends, index)
    record = index - (self._ends[shard - 1] if shard else 0)
    try:
      return self._shards[shard][record]
    except RuntimeError as error:
      raise _corrupt_shard(self._paths[shard], error,
                          f" record {record} of {len(self._shards[shard])}") from None


def _open_shard(path: str) -> grain.sources.ArrayRecordDataSource:
  try:
    return grain.sources.ArrayRecordDataSource([path])
  except RuntimeError as error:
    raise _corrupt_shard(path, error) from None


def _corrupt_shard(path: str, error: RuntimeError, where: str = "") -> UserError:
  detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail given"
  return UserError(f"ArrayRecord shard {path}{where} is corrupt or truncated ({detail}); "
                   f"rerun {PREPARE_COMMAND}")


def source_weights(manifest: dict, split: str) -> dict[str, float]:
  """{source: mixture weight} of a split written per source; empty for a single-source split."""
  sources = manifest["splits"][split].get("sources", {})
  return {name: float(entry["weight"]) for name, entry in sources.items() if entry["sequences"]}


def mixture(data_dir, manifest: dict, split: str, weights: dict[str, float], seed: int,
            num_epochs: int | None, total: int) -> grain.MapDataset:
  """Sequences drawn from each source in proportion to its weight, each source reshuffled
  every time it runs out. `num_epochs` counts epochs of the whole split's size."""
  parts = []
  for i, name in enumerate(weights):
    paths = [os.fspath(epath.Path(data_dir) / shard)
             for shard in manifest["splits"][split]["sources"][name]["shards"]]
    part = grain.MapDataset.source(_NamedShards(paths))
    parts.append(part.shuffle(seed=(seed + i) % _MAX_SEED).repeat(None))
  mixed = grain.MapDataset.mix(parts, list(weights.values()))
  return mixed if num_epochs is None else mixed[:num_epochs * total]


def rows_of_process(records: grain.MapDataset, global_batch_size: int, index: int, count: int,
                    *, pad_last_batch: bool) -> grain.MapDataset:
  """Process `index`'s rows of every global batch, so that the global batch (and the training
  run) is the same whatever the number of processes: element j is global element
  (j // b) * global_batch_size + index * b + j % b, with b = global_batch_size // count.
  `pad_last_batch` fills a short last global batch with empty records (padding) instead of
  dropping it (Grain drops `None` elements, so padding is `b""`).
  """
  local = global_batch_size // count
  total = len(records)
  num_batches = -(-total // global_batch_size) if pad_last_batch else total // global_batch_size

  def fetch(j: int):
    position = (j // local) * global_batch_size + index * local + j % local
    return records[position] if position < total else b""

  return grain.MapDataset.range(num_batches * local).map(fetch)


def _decode_or_pad(record: bytes, fields: Fields, shard_paths: list[str]) -> dict:
  """A record, or for padding an all-zero one (packed text: segment 0, no loss, no attention)."""
  if not record:
    return empty_record(fields)
  try:
    return decode_record(record, fields)
  except ValueError as e:
    raise ValueError(f"{_shard_of_size(len(record), shard_paths)}: {e}") from e


def _shard_of_size(size: int, shard_paths: list[str]) -> str:
  """Names the first shard whose first record has `size` bytes (a shard is written at one size);
  Grain hands the decoder bytes without their shard, and this runs only on an error."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
  for path in shard_paths:
    reader = ArrayRecordReader(path)
    try:
      if reader.num_records() and len(reader.read([0])[0]) == size:
        return f"shard {path}"
    finally:
      reader.close()
  return f"a shard of {len(shard_paths)}"


def _check_epochs_and_seed(num_epochs: int | None, seed: int) -> None:
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be positive; use None to repeat forever")
  if not 0 <= seed < _MAX_SEED:
    raise ValueError(f"seed={seed} must be in [0, 2**32); pick a seed in that range")


def _check_record_count(records: grain.MapDataset, manifest: dict, data_dir, split: str,
                        process_count: int) -> None:
  expected = manifest["splits"][split].get("sequences", len(records))
  if len(records) != expected:
    raise ValueError(
        f"split {split!r} shards hold {len(records)} sequences but {MANIFEST_NAME} says "
        f"{expected}; re-run {PREPARE_COMMAND} (a shard was truncated or replaced)")
  if not records:
    raise UserError(f"--data_dir {data_dir}: split {split!r} has no sequences (its pipeline "
                    "kept no row: see report.md and dead_letter.jsonl there)")
  if len(records) < process_count:
    raise UserError(
        f"--data_dir {data_dir}: split {split!r} has {len(records)} sequences, fewer than the "
        f"{process_count} processes reading it; prepare more data or use fewer processes")


def iterator_save_args(iterator: grain.DatasetIterator):
  """Orbax args saving `iterator`'s position, for `ocp.args.Composite(data_iter=...)`."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
  """Orbax args restoring a saved position into `iterator` (a fresh one from the same dataset)."""
  return grain.checkpoint.CheckpointRestore(iterator)
