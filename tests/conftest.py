"""Shared fixtures: the real SmolLM2 tokenizer (converted once, then read from the omoe cache)."""

import os

import pytest

from omoe.errors import OMoEError

# precision "auto" means fp32 on a CPU without native bf16: make every test (and the subprocesses it
# starts) see such a CPU, so tolerances do not depend on the machine; bf16 is tested explicitly.
os.environ.setdefault("OMOE_CPU_BF16", "0")


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A Hugging Face directory with the tiny random LLaMA and the SmolLM2 tokenizer (for subprocesses)."""
    from omoe.models.testing import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: threads only add overhead on the shared CPUs);
    use it for a whole module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
