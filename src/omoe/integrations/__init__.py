"""Glue to other libraries: Hugging Face Trainer / TRL (``hf``), PEFT's adapter format (``peft``)."""
