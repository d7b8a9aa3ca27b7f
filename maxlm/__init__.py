"""maxlm: raw text to a served language model on JAX."""
