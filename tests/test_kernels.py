"""The fast forms of dropout and of the expert hidden (omoe.layers.kernels) against the reference ones."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from omoe.layers import kernels
from omoe.layers.kernels import Dropout, dropout_mask, frozen_linear, reference_kernels
from omoe.layers.mixing import OrthogonalMixer
from omoe.layers.moe import fused_hidden_delta, hidden_delta


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_mask_keeps_one_minus_p_and_is_unbiased(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep, scale = dropout_mask(torch.Size([n]), p, torch.device("cpu"))
    rate = keep.float().mean().item()
    std = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 6 * std  # p is rounded to 2**-16: far below 6 std here
    assert scale * (1 - round(p * 65536) / 65536) == pytest.approx(1.0, abs=1e-12)  # E[keep * scale] = 1
    # the four 16-bit fields of one draw are independent: neighbours' masks are uncorrelated
    k = keep.float().view(-1, 4)
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        corr = torch.corrcoef(torch.stack([k[:, a], k[:, b]]))[0, 1].item()
        assert abs(corr) < 6 / math.sqrt(k.shape[0])


def test_dropout_zeroes_and_scales_and_backward_uses_the_same_mask():
    torch.manual_seed(0)
    layer = Dropout(0.25).train()
    x = torch.randn(64, 257, requires_grad=True)
    out = layer(x)
    keep = out != 0
    scale = 65536 / (65536 - round(0.25 * 65536))
    torch.testing.assert_close(out[keep], x[keep] * scale, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() * scale, rtol=0, atol=0)


def test_dropout_is_seeded_identity_in_eval_and_nn_dropout_under_reference_kernels():
    layer = Dropout(0.1).train()
    x = torch.randn(8, 100)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), a, rtol=0, atol=0)
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    with reference_kernels():
        torch.manual_seed(3)
        ref = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ref, F.dropout(x, 0.1, True), rtol=0, atol=0)
    assert kernels._state["fused"]  # restored on exit


def _hidden_inputs(dtype, scale=1e-2, slots=2, n=37, inter=96):
    g = torch.Generator().manual_seed(0)
    g0, u0 = (torch.randn(n, inter, generator=g).to(dtype) for _ in range(2))
    dg, du = ((torch.randn(slots, n, inter, generator=g) * scale).to(dtype) for _ in range(2))
    return g0, u0, dg, du


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_hidden_delta_matches_reference_and_is_exactly_zero_for_zero_deltas(dtype):
    g0, u0, dg, du = _hidden_inputs(dtype)
    with torch.no_grad():
        fused = fused_hidden_delta(F.silu, g0, u0, dg, du)
        ref = hidden_delta(F.silu, g0, u0, dg, du)
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # fused rounds once, the reference per op
        torch.testing.assert_close(fused, ref, rtol=tol, atol=tol * ref.abs().max().item())
        zero = fused_hidden_delta(F.silu, g0, u0, torch.zeros_like(dg), torch.zeros_like(du))
        assert zero.dtype == dtype and not zero.any()
        assert not fused_hidden_delta(F.silu, g0, u0, torch.zeros_like(dg), None).any()


PATTERNS = ["gate+up", "gate", "up"]  # which deltas exist


def _pattern(pattern, dg, du):
    return (None if pattern == "up" else dg), (None if pattern == "gate" else du)


def _grads(fn, leaves, with_h0):
    """Gradients of a loss reading both outputs (dh and h0 + dh), for the leaves that are tensors."""
    g0, u0, dg, du = leaves
    h0 = (F.silu(g0) * u0) if with_h0 else None
    out = fn(F.silu, g0, u0, dg, du, None, h0)
    dh, h = out if with_h0 else (out, None)
    loss = dh.pow(2).sum() + (0 if h is None else (h * torch.linspace(-1, 1, h.shape[-1])).sum())
    tensors = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)  # u0 is unused with no gate delta
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_fused_hidden_delta_gradients_match_reference(pattern, with_h0):
    """The compiled form's gradients are autograd's of the reference, for every pattern of adapted
    projections, with and without h."""
    g0, u0, dg, du = _hidden_inputs(torch.float32)
    dg, du = _pattern(pattern, dg, du)
    grads = []
    for fn in (fused_hidden_delta, hidden_delta):
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in (g0, u0, dg, du)]
        grads.append(_grads(fn, leaves, with_h0))
    out = fused_hidden_delta(F.silu, *leaves)
    assert "Compiled" in type(out.grad_fn).__name__  # the compiled form ran
    for fused, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_compiled_hidden_change_passes_gradcheck(pattern):
    g0, u0, dg, du = (t.double() for t in _hidden_inputs(torch.float32, scale=0.3, n=5, inter=7))
    dg, du = _pattern(pattern, dg, du)
    h0 = (F.silu(g0) * u0).detach()
    present = [name for name, t in zip(("dg", "du"), (dg, du), strict=True) if t is not None]

    def outputs(g0, u0, h0, *deltas):
        given = dict(zip(present, deltas, strict=True))
        return fused_hidden_delta(F.silu, g0, u0, given.get("dg"), given.get("du"), None, h0)

    inputs = [t.requires_grad_(True) for t in (g0, u0, h0, dg, du) if t is not None]
    assert torch.autograd.gradcheck(outputs, inputs)


def test_zero_deltas_send_exactly_zero_gradient_to_the_frozen_gate_and_up():
    """At initialisation (B = 0) the expert path adds nothing to the frozen model's gradients."""
    g0, u0, dg, du = _hidden_inputs(torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (g0, u0, torch.zeros_like(dg), torch.zeros_like(du))]
    dh = fused_hidden_delta(F.silu, *leaves)
    weights = torch.linspace(-1, 1, dh.numel()).view(dh.shape)  # a loss whose gradient is not 0 at dh = 0
    grad_g0, grad_u0, grad_dg, grad_du = torch.autograd.grad((dh * weights).sum(), leaves)
    assert not grad_g0.any() and not grad_u0.any()
    assert grad_dg.dtype == grad_du.dtype == torch.bfloat16 and grad_dg.any() and grad_du.any()


def test_fused_falls_back_to_the_reference_once_compiling_fails(monkeypatch):
    class InductorError(Exception):
        pass

    InductorError.__module__ = "torch._inductor.exc"  # what a missing C++ compiler raises

    def broken(*args, **kwargs):
        raise InductorError("no compiler")

    calls = []

    def reference(x):
        calls.append(x)
        return x + 1

    run = kernels.fused(reference)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    monkeypatch.setitem(kernels._state, "broken", False)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        assert run(1) == 2
    assert kernels._state["broken"] and run(2) == 3 and calls == [1, 2]


def test_fused_lets_other_errors_through(monkeypatch):
    def wrong(x):
        raise ValueError("a real bug")

    monkeypatch.setitem(kernels._state, "broken", False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with pytest.raises(ValueError, match="a real bug"):
        kernels.fused(wrong)(1)
    assert not kernels._state["broken"]


def _frozen(in_features=48, out_features=40, bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    lin.requires_grad_(False)
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_frozen_linear_equals_autocast_bit_for_bit_and_casts_once(bias):
    lin = _frozen(bias=bias)
    x = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lin(x)
        out = frozen_linear(lin, x)
        cast = kernels._casts[id(lin.weight)][1]
        frozen_linear(lin, x)
        assert kernels._casts[id(lin.weight)][1] is cast  # reused, not cast again
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_frozen_linear_recasts_a_changed_weight_and_serves_training_after_inference_mode():
    lin = _frozen()
    x = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            frozen_linear(lin, x)  # the cast is made here
        with torch.no_grad():
            lin.weight.mul_(2)  # written in place: the cast is stale
        xg = x.clone().requires_grad_(True)
        out = frozen_linear(lin, xg)  # saved for backward: must not be an inference tensor
        torch.testing.assert_close(out, lin(x), rtol=0, atol=0)
        out.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_frozen_linear_leaves_trainable_weights_and_plain_precision_to_the_module():
    lin = _frozen()
    x = torch.randn(5, 48)
    assert frozen_linear(lin, x).dtype == torch.float32  # no autocast: the module's own call
    lin.weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        frozen_linear(lin, x).float().sum().backward()
    assert id(lin.weight) not in kernels._casts and lin.weight.grad is not None


def test_logits_only_at_restores_the_head():
    from omoe.models.logits import logits_only_at
    from omoe.models.testing import tiny_llama

    model = tiny_llama(vocab_size=128)
    head = model.get_output_embeddings()
    ids = torch.randint(3, 128, (2, 6))
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, -1] = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=ids).logits[keep]
        with logits_only_at(model, keep):
            picked = model(input_ids=ids).logits
    assert "forward" not in vars(head) and torch.equal(picked, full)


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_recomputing_the_hidden_in_backward_gives_the_same_gradients(monkeypatch, precision):
    from omoe import OMoEConfig, get_omoe_model
    from omoe.layers.moe import MoEFeedForward
    from omoe.models.testing import tiny_llama

    model = get_omoe_model(tiny_llama(vocab_size=128), OMoEConfig(dropout=0.0)).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # trained-looking experts
    ids = torch.randint(3, 128, (2, 7))
    grads = {}
    for recompute in (False, True):
        monkeypatch.setattr(MoEFeedForward, "recompute_hidden", staticmethod(lambda x, r=recompute: r))
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
            model(input_ids=ids, labels=ids).loss.backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and any("gate" in n for n in grads[True])
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=0, msg=name)


def test_only_known_stateless_activations_are_fused():
    from transformers.activations import ACT2FN

    assert kernels.plain_activation(ACT2FN["silu"]) is F.silu  # one compiled function for every model
    assert kernels.plain_activation(torch.nn.SiLU()) is F.silu
    assert kernels.plain_activation(ACT2FN["gelu"]) is None  # such a block keeps the reference form


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_orthogonal_mix_matches_the_reference_mixer_with_gradients(dtype, normalize):
    """On CPU, OMoE's Gram-Schmidt and mixture run compiled (OrthogonalMixer.combine); the reference
    kernels give the plain Gram-Schmidt and einsum: same values and gradients up to rounding."""
    mixer = OrthogonalMixer(normalize=normalize)
    g = torch.Generator().manual_seed(0)
    reps = (torch.randn(3, 29, 40, generator=g) * 1e-2).to(dtype)  # (S, N, d)
    weights = torch.softmax(torch.randn(3, 29, generator=g), 0)  # (S, N)
    results = []
    for kernels_of in (nullcontext, kernels.reference_kernels):
        leaves = reps.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        with kernels_of():
            out = mixer.combine(*leaves)
        results.append((out, *torch.autograd.grad((out * torch.linspace(-1, 1, 40)).sum(), leaves)))
    assert "Compiled" in type(results[0][0].grad_fn).__name__  # the compiled form ran
    for fused, ref in zip(*results, strict=True):
        torch.testing.assert_close(fused.float(), ref.float(), rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    zero = mixer.combine(torch.zeros_like(reps), weights)
    assert not zero.any()  # untrained experts (B = 0) add exactly nothing
