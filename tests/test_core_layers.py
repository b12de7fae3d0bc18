"""Math of the adapter layers, in float64 where gradients are checked."""

import pytest
import torch
from torch.testing import assert_close

from omoe.layers import (
    DoRAExperts,
    ExpertMixer,
    LoRAExperts,
    MoEFeedForward,
    MoELinear,
    OrthogonalMixer,
    Router,
    expert_matmul,
    gram_schmidt,
    load_balancing_loss,
)


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("k", [2, 3, 7])
def test_gram_schmidt_output_is_orthonormal_in_float32(k):
    g = torch.Generator().manual_seed(k)
    reps = torch.randn(k, 500, 64, generator=g)
    reps[1] = reps[0] + 0.05 * reps[1]  # nearly parallel pair, like collapsed experts (cos ~ 0.999)
    q = gram_schmidt(reps)
    assert q.dtype == torch.float32
    assert_close(q.norm(dim=-1), torch.ones(k, 500), atol=1e-6, rtol=0)
    worst = max(_cos(q[i], q[j]).abs().max().item() for i in range(k) for j in range(i))
    assert worst < 1e-5


def test_gram_schmidt_computes_in_float32_from_bfloat16():
    reps = torch.randn(2, 10, 32).bfloat16()
    q = gram_schmidt(reps)
    assert q.dtype == torch.float32
    assert _cos(q[0], q[1]).abs().max() < 1e-5


def test_gram_schmidt_matches_qr_up_to_sign():
    reps = torch.randn(3, 1, 16, dtype=torch.float64)
    q = gram_schmidt(reps, eps=1e-12).double()
    ref, _ = torch.linalg.qr(reps[:, 0].T)  # columns: orthonormal basis in expert order
    for s in range(3):
        assert_close(q[s, 0].abs(), ref[:, s].abs(), atol=1e-5, rtol=0)


def test_gram_schmidt_maps_zero_representations_to_exactly_zero_with_finite_gradient():
    reps = torch.zeros(2, 4, 8, requires_grad=True)
    q = gram_schmidt(reps)
    assert torch.equal(q, torch.zeros_like(q))
    q.sum().backward()
    assert torch.isfinite(reps.grad).all()


def test_gram_schmidt_ablation_switches():
    reps = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reps[1] += reps[0]  # correlated pair
    same = gram_schmidt(reps, orthogonalize=False, normalize=False)
    assert_close(same, reps)
    unit = gram_schmidt(reps, orthogonalize=False)
    assert_close(unit.norm(dim=-1), torch.ones(2, 5, dtype=torch.float64))
    assert _cos(unit[0], unit[1]).abs().min() > 1e-3  # still correlated: not orthogonalised
    orth = gram_schmidt(reps, normalize=False)  # orthogonal, keeping norms
    assert _cos(orth[0], orth[1]).abs().max() < 1e-10
    assert_close(orth[0], reps[0])  # the first vector is untouched


def test_gram_schmidt_gradcheck_float64():
    reps = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gram_schmidt(x, eps=1e-6), (reps,))
    assert torch.autograd.gradcheck(lambda x: gram_schmidt(x, normalize=False), (reps,))


def test_expert_matmul_grouped_equals_per_slot_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 4, (2, 9), generator=g)
    out = expert_matmul(x, w, idx)
    ref = torch.stack([torch.stack([w[idx[s, n]] @ x[s, n] for n in range(9)]) for s in range(2)])
    assert_close(out, ref)
    dense = expert_matmul(x, w[:2], None)
    assert_close(dense, torch.einsum("sni,soi->sno", x, w[:2]))


def test_router_topk_weights_are_renormalised_and_sorted_by_expert():
    router = Router(6, 5, routing="topk", top_k=2)
    x = torch.randn(11, 6)
    r = router(x)
    assert r.weights.shape == (2, 11) and r.indices.shape == (2, 11)
    assert_close(r.weights.sum(0), torch.ones(11))
    assert (r.indices[0] < r.indices[1]).all()
    top2 = r.probs.topk(2, dim=-1).indices.sort(-1).values.t()
    assert torch.equal(r.indices, top2)


def test_router_switch_weight_is_the_raw_probability():
    router = Router(6, 4, routing="switch")
    r = router(torch.randn(7, 6))
    assert_close(r.weights[0], r.probs.max(-1).values)


def test_aux_loss_matches_hand_computed_value():
    # Two tokens, three experts, top-1.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    indices = torch.tensor([[0, 1]])  # token 0 -> expert 0, token 1 -> expert 1
    loss, f = load_balancing_loss(probs, indices)
    # f = (1/2, 1/2, 0), P = (0.4, 0.4, 0.2): loss = 3 * (0.5*0.4 + 0.5*0.4) = 1.2
    assert_close(f, torch.tensor([0.5, 0.5, 0.0]))
    assert_close(loss, torch.tensor(1.2))
    # Masking the second token: f = (1, 0, 0), P = (0.7, 0.2, 0.1): 3 * 0.7 = 2.1
    masked, _ = load_balancing_loss(probs, indices, mask=torch.tensor([True, False]))
    assert_close(masked, torch.tensor(2.1))


def test_router_stats_soft_aux_loss_is_constant_num_experts():
    router = Router(6, 4)
    stats = Router.stats(router(torch.randn(9, 6)))
    assert_close(stats.aux_loss, torch.tensor(4.0))
    assert_close(stats.load.sum(), torch.tensor(1.0))
    assert 0 < stats.entropy < torch.log(torch.tensor(4.0)) + 1e-6


class _MLP(torch.nn.Module):
    def __init__(self, h=6, i=10, dtype=torch.float64, bias=False):
        super().__init__()
        self.gate_proj = torch.nn.Linear(h, i, bias=bias, dtype=dtype)
        self.up_proj = torch.nn.Linear(h, i, bias=bias, dtype=dtype)
        self.down_proj = torch.nn.Linear(i, h, bias=bias, dtype=dtype)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _ffn(mixer, k=3, routing="soft", top_k=None, dora=False, bias=False, seed=0):
    torch.manual_seed(seed)
    mlp = _MLP(bias=bias)
    cls = DoRAExperts if dora else LoRAExperts
    experts = {}
    for p in ("gate", "up", "down"):
        lin = getattr(mlp, f"{p}_proj")
        e = cls(lin.in_features, lin.out_features, num_experts=k, r=2, alpha=4, dropout=0.0)
        torch.nn.init.normal_(e.lora_B, std=0.3)
        if dora:
            e.init_magnitude(lin)
            torch.nn.init.normal_(e.lora_magnitude, mean=1.0, std=0.1)
        experts[p] = e.double()
    router = Router(6, k, routing=routing, top_k=top_k).double()
    return MoEFeedForward(mlp, router, experts, mixer)


def _explicit_ffn(layer, x):
    """Reference: per expert, FFN_i with its own adapted weights, E_i = FFN_i - FFN_0, Eq. (5)-(7)."""
    mlp, k = layer.base_layer, layer.omoe_router.num_experts
    routing = layer.omoe_router(x)
    outs = []
    for i in range(k):
        w = {}
        for p in ("gate", "up", "down"):
            lin, e = getattr(mlp, f"{p}_proj"), layer.omoe_experts[p]
            wi = lin.weight + e.scaling * e.lora_B[i] @ e.lora_A[i]
            if e.is_dora:
                wi = e.lora_magnitude[i][:, None] * wi / wi.norm(dim=1, keepdim=True)
            w[p] = wi
        h = torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)
        outs.append(h @ w["down"].T - mlp(x))
    reps = torch.stack(outs)  # (k, N, H)
    dense = torch.zeros(x.shape[0], k, dtype=x.dtype)
    if routing.indices is None:
        dense = routing.weights.t()
        sel = reps
    else:
        dense.scatter_(1, routing.indices.t(), routing.weights.t())
        sel = torch.stack(
            [reps[routing.indices[s], torch.arange(x.shape[0])] for s in range(routing.indices.shape[0])]
        )
    mixed = layer.mixer.transform(sel).double()
    w = routing.weights
    return mlp(x) + torch.einsum("sn,snd->nd", w, mixed), dense


@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("routing,top_k", [("soft", None), ("topk", 2), ("switch", None)])
@pytest.mark.parametrize("dora", [False, True])
def test_ffn_layer_equals_explicit_per_expert_ffns(orthogonal, routing, top_k, dora):
    mixer = OrthogonalMixer(eps=1e-12) if orthogonal else ExpertMixer()
    layer = _ffn(mixer, routing=routing, top_k=top_k, dora=dora)
    x = torch.randn(8, 6, dtype=torch.float64)
    expected, _ = _explicit_ffn(layer, x)
    assert_close(layer(x), expected, atol=1e-5 if orthogonal else 1e-10, rtol=1e-5 if orthogonal else 1e-10)


def test_vanilla_fast_path_equals_explicit_path():
    layer = _ffn(ExpertMixer(), routing="topk", top_k=2, bias=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    fast = layer(x)
    layer.capture = True  # capture needs the representations, so it takes the explicit path
    explicit = layer(x)
    assert layer.last_capture is not None
    assert_close(fast, explicit)


def test_ffn_layer_gradcheck_float64():
    layer = _ffn(OrthogonalMixer(eps=1e-9), k=2)
    names = ["omoe_experts.gate.lora_B", "omoe_experts.down.lora_A", "omoe_router.weight"]
    params = dict(layer.named_parameters())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    inputs = (x, *[params[n].detach().clone().requires_grad_(True) for n in names])

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("layer_kind", ["ffn", "linear"])
def test_topk_unselected_experts_get_no_gradient_from_a_token(layer_kind):
    torch.manual_seed(1)
    k = 4
    if layer_kind == "ffn":
        layer = _ffn(OrthogonalMixer(), k=k, routing="topk", top_k=2)
        experts = layer.omoe_experts["gate"]
    else:
        base = torch.nn.Linear(6, 5, dtype=torch.float64)
        experts = LoRAExperts(6, 5, num_experts=k, r=2).double()
        torch.nn.init.normal_(experts.lora_B, std=0.3)
        layer = MoELinear(base, Router(6, k, "topk", 2).double(), experts, OrthogonalMixer())
    x = torch.randn(1, 6, dtype=torch.float64)  # one token
    chosen = set(layer.omoe_router(x).indices[:, 0].tolist())
    layer(x).sum().backward()
    for e in range(k):
        has_grad = experts.lora_B.grad[e].abs().sum() > 0
        assert bool(has_grad) == (e in chosen), (e, chosen)


def test_topk_with_all_experts_equals_soft_routing():
    soft = _ffn(OrthogonalMixer(), k=3)
    full = _ffn(OrthogonalMixer(), k=3, routing="topk", top_k=3)
    x = torch.randn(6, 6, dtype=torch.float64)
    assert_close(soft(x), full(x))


def test_omoe_without_orthogonalisation_or_normalisation_equals_vanilla_moe():
    vanilla = _ffn(ExpertMixer(), k=3)
    plain = _ffn(OrthogonalMixer(orthogonalize=False, normalize=False), k=3)
    x = torch.randn(6, 6, dtype=torch.float64)
    assert_close(plain(x), vanilla(x), atol=1e-6, rtol=1e-6)  # float32 Gram-Schmidt path


def test_captured_omoe_representations_are_orthonormal():
    layer = _ffn(OrthogonalMixer(), k=3)
    layer.capture = True
    layer(torch.randn(20, 6, dtype=torch.float64))
    q = layer.last_capture.mixed
    for i in range(3):
        assert_close(q[i].norm(dim=-1), torch.ones(20, dtype=q.dtype), atol=1e-6, rtol=0)
        for j in range(i):
            assert _cos(q[i], q[j]).abs().max() < 1e-5
    assert not torch.allclose(layer.last_capture.raw, q)


def test_dora_weight_norm_equals_norm_of_formed_weight():
    base = torch.nn.Linear(7, 5, bias=True, dtype=torch.float64)
    e = DoRAExperts(7, 5, num_experts=3, r=2, alpha=6).double()
    torch.nn.init.normal_(e.lora_B)
    expected = torch.stack(
        [(base.weight + e.scaling * e.lora_B[i] @ e.lora_A[i]).norm(dim=1) for i in range(3)]
    )
    assert_close(e.weight_norm(base).double(), expected, atol=1e-5, rtol=1e-5)
