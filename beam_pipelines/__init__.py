"""Beam pipelines that turn raw text into packed, tokenized ArrayRecord shards."""
