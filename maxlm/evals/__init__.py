"""Evaluators of a model: perplexity and bits per byte, multiple-choice log-likelihood, and
generation scored by exact match or a regex. `maxlm.evaluate` runs them on a checkpoint and
`maxlm.train` runs them every `eval_every` steps (`train.evals`)."""
