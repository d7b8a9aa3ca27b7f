"""Beam pipelines that turn raw text into packed, tokenized ArrayRecord shards."""

import logging


class _WithoutBeamsApitoolsNotice(logging.Filter):
  """Drops the one line `import apache_beam` logs wherever Google's apitools is not installed
  (plain `apache-beam`, without its `[gcp]` extra): "apitools not found, and bigquery client
  libraries are not available despite the import not raising an ImportError". Nothing here
  uses BigQuery, and as the first line of `python -m maxlm.train` it read as a failure.
  Only records logged on the root logger with that text are dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


logging.getLogger().addFilter(_WithoutBeamsApitoolsNotice())
