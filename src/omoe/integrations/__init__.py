"""Glue to other libraries: Hugging Face Trainer / TRL (``hf``). PEFT's adapter layout is
:mod:`omoe.tuners.peft_format`."""
