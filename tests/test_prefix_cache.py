"""The frozen-prefix cache (omoe.models.prefix): same logits and gradients as the full forward, each
sequence computed once and independently of its batch, and a stale cache never used."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from omoe import OMoEConfig, get_omoe_model
from omoe.eval.batching import pad
from omoe.models.logits import selected_logits
from omoe.models.prefix import frozen_prefix
from omoe.models.testing import tiny_llama


def _model(method="omoe", layers="2-3"):
    torch.manual_seed(0)
    model = get_omoe_model(tiny_llama(seed=0, vocab_size=64, num_hidden_layers=4), OMoEConfig(method=method, layers=layers))
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:  # a trained-looking adapter, not the zero init
            torch.nn.init.normal_(p, std=0.1)
    return model


def _batch(lengths=(5, 9, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]
    ids, mask = pad(seqs, 0, side="right")
    keep = torch.nn.functional.one_hot(mask.sum(1) - 1, ids.shape[1]).bool()  # (B, T) last position
    return seqs, ids, mask, keep


@pytest.mark.parametrize("method", ["lora", "moe", "omoe"])
def test_cached_prefix_gives_the_full_forwards_logits_and_gradients(method):
    model = _model(method)
    model.train()
    _, ids, mask, keep = _batch()
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(3)  # the same dropout masks in both passes
    full = selected_logits(model, ids, mask, keep)  # (B, V)
    full_grads = torch.autograd.grad(full.square().sum(), params)
    with frozen_prefix(model, depth=2) as cache:
        torch.manual_seed(3)
        cached = selected_logits(model, ids, mask, keep)
        cached_grads = torch.autograd.grad(cached.square().sum(), params)
    assert cache is not None and cache.misses == 3
    assert_close(cached, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(cached_grads, full_grads):
        assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert len(model.base_model.model.layers) == 4  # the block list is restored


def test_each_sequence_is_computed_once_and_then_reused_in_any_batch():
    model = _model().eval()
    seqs, ids, mask, keep = _batch()
    with torch.no_grad(), frozen_prefix(model, depth=2) as cache:
        first = selected_logits(model, ids, mask, keep)
        # the same sequence in another batch (other neighbours, other padding) reuses its entry
        ids2, mask2 = pad([list(range(1, 13)), seqs[0]], 0, side="right")  # one new sequence, one cached
        keep2 = torch.nn.functional.one_hot(mask2.sum(1) - 1, ids2.shape[1]).bool()
        again = selected_logits(model, ids, mask, keep)
        assert cache.hits == 3 and cache.misses == 3
        alone = cache.hidden(*pad([seqs[1]], 0, side="right"))[0]  # (T, H): the entry of the first batch
        batched = cache.hidden(ids, mask)[1, : len(seqs[1])]
        assert torch.equal(alone, batched) and cache.misses == 3
        selected_logits(model, ids2, mask2, keep2)
        assert cache.misses == 4 and cache.hits == 3 + 1 + 3 + 1
    assert torch.equal(first, again)


def test_a_changed_frozen_block_clears_the_cache():
    model = _model().eval()
    _, ids, mask, keep = _batch()
    with torch.no_grad(), frozen_prefix(model, depth=2) as cache:
        before = selected_logits(model, ids, mask, keep)
        model.base_model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # in place: version counter moves
        after = selected_logits(model, ids, mask, keep)
        assert cache.misses == 6
    with torch.no_grad():
        assert_close(after, selected_logits(model, ids, mask, keep), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_depth_zero_or_an_unsupported_model_is_a_no_op():
    model = _model(layers="all")
    with frozen_prefix(model, depth=0) as cache:
        assert cache is None
    stub = torch.nn.Linear(2, 2)
    with frozen_prefix(stub, depth=3) as cache:
        assert cache is None


def test_prefixes_cached_during_evaluation_serve_a_later_training_step():
    model = _model()
    _, ids, mask, keep = _batch()
    with frozen_prefix(model, depth=2) as cache:
        with torch.inference_mode():
            selected_logits(model.eval(), ids, mask, keep)
        model.train()
        loss = selected_logits(model, ids, mask, keep).square().sum()
        loss.backward()  # would raise if the cached tensors were inference tensors
        assert cache.hits == 3
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
