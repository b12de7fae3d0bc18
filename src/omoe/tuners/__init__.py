"""Injection of omoe adapters into Hugging Face causal language models."""
