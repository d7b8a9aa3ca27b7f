"""Exact (equal cleaned text) and near-duplicate (MinHash + LSH banding) removal, keeping one
document per cluster. Removed documents are listed as DUPLICATES JSON lines."""

import json
from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam
import numpy as np

from beam_pipelines import minhash
from beam_pipelines import stage_report
from beam_pipelines.cleaning import utf8_size
from beam_pipelines.documents import Document

DUPLICATES = "duplicates"
MAX_PAIRWISE_BUCKET = 64  # larger buckets compare each member with the first few only
CANDIDATE_SLACK = 0.1


def duplicate_line(kind: str, removed: Document, kept_origin: str) -> str:
  return json.dumps({"kind": kind, "source": removed.source, "origin": removed.origin,
                     "kept": kept_origin})


def keep_first_of_equal(group: tuple[int, Iterable[Document]]):
  """Of the documents with one key, keeps the one with the smallest (source, origin)."""
  docs = sorted(group[1], key=lambda d: (d.source, d.origin))
  for doc in docs:
    stage_report.count_in("exact_dedup", utf8_size(doc.text))
  stage_report.count_out("exact_dedup", utf8_size(docs[0].text))
  yield docs[0]
  for doc in docs[1:]:
    stage_report.count_drop("exact_dedup", "duplicate")
    yield beam.pvalue.TaggedOutput(DUPLICATES, duplicate_line("exact", doc, docs[0].origin))


class ExactDedup(beam.PTransform):
  """Documents -> {"documents": one per distinct text, DUPLICATES: JSON lines}."""

  def expand(self, docs):
    return (docs
            | "ByKey" >> beam.Map(lambda doc: (doc.key, doc))
            | "GroupEqual" >> beam.GroupByKey()
            | "KeepFirst" >> beam.FlatMap(keep_first_of_equal).with_outputs(
                DUPLICATES, main="documents"))


class BandEntries(beam.DoFn):
  """Document -> (band bucket, (key, origin, signature bytes)) for each LSH band."""

  def __init__(self, num_perm: int, bands: int, rows: int, seed: int):
    self._num_perm, self._bands, self._rows, self._seed = num_perm, bands, rows, seed

  def setup(self):
    self._a, self._b = minhash.permutations(self._num_perm, self._seed)

  def process(self, doc: Document):
    with stage_report.timed("near_dedup"):
      shingles = minhash.shingles(doc.text)
      if not len(shingles):
        return
      sig = minhash.signature(shingles, self._a, self._b)
      buckets = minhash.band_keys(sig, self._bands, self._rows)
    entry = (doc.key, doc.origin, sig.tobytes())
    for bucket in buckets:
      yield bucket, entry


def candidate_pairs(bucket: tuple[bytes, Iterable[tuple]], min_estimate: float):
  """Pairs of a band bucket whose estimated Jaccard reaches `min_estimate`, as
  (key, origin, key, origin) with the smaller key first."""
  members = sorted(set(bucket[1]))
  if len(members) < 2:
    return
  sigs = [np.frombuffer(sig, np.uint32) for _, _, sig in members]
  anchors = len(members) if len(members) <= MAX_PAIRWISE_BUCKET else 4
  for i in range(anchors):
    for j in range(i + 1, len(members)):
      if minhash.estimated_jaccard(sigs[i], sigs[j]) >= min_estimate:
        yield members[i][:2] + members[j][:2]


class Candidates(NamedTuple):
  pairs: set[tuple]  # (key, origin, key, origin), smaller key first
  keys: set[int]  # every key in a pair


class CandidateSet(beam.CombineFn):
  """Candidate pairs -> one Candidates: the distinct pairs and the keys they mention."""

  def create_accumulator(self):
    return set()

  def add_input(self, pairs, pair):
    pairs.add(pair)
    return pairs

  def merge_accumulators(self, accumulators):
    return set().union(*accumulators)

  def extract_output(self, pairs):
    return Candidates(pairs, {key for pair in pairs for key in (pair[0], pair[2])})


def candidate_shingles(doc: Document, candidates: Candidates):
  if doc.key in candidates.keys:
    yield doc.key, minhash.shingles(doc.text)


def reaches_threshold(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
  """Whether the exact Jaccard of two shingle sets reaches `threshold`."""
  common = len(np.intersect1d(a, b, assume_unique=True))
  return common >= threshold * (len(a) + len(b) - common)


def clusters(pairs: Iterable[tuple]) -> dict[tuple[int, str], str]:
  """Pairs (key, origin, key, origin) -> {(key, origin) removed: origin of the kept document}:
  in each connected component the document with the smallest (key, origin) is kept. Documents
  are told apart by origin too, so identical texts cluster even when exact dedup is off."""
  parent = {}

  def root(node):
    while parent.get(node, node) != node:
      parent[node] = parent.get(parent[node], parent[node])
      node = parent[node]
    return node

  for key_a, origin_a, key_b, origin_b in pairs:
    low, high = sorted((root((key_a, origin_a)), root((key_b, origin_b))))
    if low != high:
      parent[high] = low
  return {node: root(node)[1] for node in list(parent) if root(node) != node}


def near_duplicates(candidates: Candidates, shingles: dict[int, np.ndarray],
                    threshold: float) -> dict[tuple[int, str], str]:
  """The clusters of the candidate pairs whose exact Jaccard reaches `threshold`."""
  return clusters(pair for pair in candidates.pairs
                  if reaches_threshold(shingles[pair[0]], shingles[pair[2]], threshold))


def drop_near_duplicates(doc: Document, removed: dict[tuple[int, str], str]):
  size = utf8_size(doc.text)
  stage_report.count_in("near_dedup", size)
  kept_origin = removed.get((doc.key, doc.origin))
  if kept_origin is None:
    stage_report.count_out("near_dedup", size)
    yield doc
  else:
    stage_report.count_drop("near_dedup", "near_duplicate")
    yield beam.pvalue.TaggedOutput(DUPLICATES, duplicate_line("near", doc, kept_origin))


class NearDedup(beam.PTransform):
  """Documents -> {"documents": one per near-duplicate cluster, DUPLICATES: JSON lines}.

  LSH band collisions whose MinHash estimate is within CANDIDATE_SLACK of the threshold are
  candidates; a candidate pair is a duplicate when its exact shingle-set Jaccard reaches the
  threshold (the estimate alone lets pairs just below it through). Only candidates' shingle sets
  are built, and they travel as a side input: fine while candidates are a small share of the
  corpus.
  """

  def __init__(self, threshold: float, num_perm: int = 128, seed: int = 0):
    super().__init__()
    self._threshold, self._num_perm, self._seed = threshold, num_perm, seed

  def expand(self, docs):
    bands, rows = minhash.lsh_bands(self._threshold, self._num_perm)
    candidates = (docs
                  | "Bands" >> beam.ParDo(BandEntries(self._num_perm, bands, rows, self._seed))
                  | "GroupBuckets" >> beam.GroupByKey()
                  | "Candidates" >> beam.FlatMap(candidate_pairs,
                                                 self._threshold - CANDIDATE_SLACK)
                  | "CandidateSet" >> beam.CombineGlobally(CandidateSet()))
    shingles = docs | "CandidateShingles" >> beam.FlatMap(
        candidate_shingles, beam.pvalue.AsSingleton(candidates))
    removed = candidates | "ExactJaccardClusters" >> beam.Map(
        near_duplicates, beam.pvalue.AsDict(shingles), self._threshold)
    return docs | "DropNear" >> beam.FlatMap(
        drop_near_duplicates, beam.pvalue.AsSingleton(removed)).with_outputs(
            DUPLICATES, main="documents")

