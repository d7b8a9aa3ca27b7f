"""Hugging Face Llama checkpoints in and out of maxlm run dirs."""
