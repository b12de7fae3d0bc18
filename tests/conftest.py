"""Shared fixtures: the real SmolLM2 tokenizer (converted once, then read from the omoe cache)."""

import pytest

from omoe.errors import OMoEError


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (vocab 49,152; eos = pad = <|im_end|>); skips if not installed.

    The first use converts it from the bundled GGUF (~10 s) into ``$OMOE_CACHE_DIR`` (default
    ``~/.cache/omoe``); later sessions read the cache.
    """
    from omoe.models import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m-instruct")
    except (OMoEError, FileNotFoundError) as err:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")
