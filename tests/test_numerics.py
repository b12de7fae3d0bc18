"""Numerics of the adapter layers (issue 9): exact zero at initialisation, bf16 fidelity, fp16 range.

(a) An untrained adapter is the base model bit for bit, for every token count and dtype.
(b) Small expert representations survive bf16 autocast: E' agrees with float32's (``-k fidelity``;
    runs on CUDA too when there is one; ``OMOE_FIDELITY_JSON=<path>`` writes the measured cosines).
(c) float16 with a GradScaler skips no more steps under OMoE than under LoRA.
"""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from omoe import OMoEConfig, get_omoe_model
from omoe.layers import DoRAExperts, LoRAExperts, MoEFeedForward, OrthogonalMixer, Router
from omoe.models.shapes import SHAPES
from omoe.models.testing import tiny_llama

# ---------------------------------------------------------------- (a) untrained adapter == base model

EXACT_CASES = {
    "omoe": dict(),
    "omoe-dora": dict(use_dora=True),
    "omoe-top2of4": dict(num_experts=4, top_k=2),
    "omoe-down-only": dict(target_modules=["down_proj"]),
    "omoe-gate-up": dict(target_modules=["gate_proj", "up_proj"]),
    "omoe-linear": dict(topology="linear"),
    "omoe-linear-dora-top1": dict(topology="linear", use_dora=True, num_experts=3, top_k=1),
    "moe": dict(method="moe"),
    "moe-dora-top2of4": dict(method="moe", use_dora=True, num_experts=4, top_k=2),
    "moe-linear": dict(method="moe", topology="linear", num_experts=3, top_k=2),
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
}
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}
TOKEN_COUNTS = range(1, 18)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Hundreds of forwards of a tiny model: with a busy CPU, a second intra-op thread costs more
    in synchronisation than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_base():
    return tiny_llama(seed=0, vocab_size=128)


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n))


def _logits(model, n: int, dtype, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return model(input_ids=_ids(n)).logits.detach()


@pytest.fixture(scope="module")
def disabled_logits(tiny_base):
    """``disable_adapter()`` logits for each (dtype, token count), computed once: every case's
    disabled model is the same frozen base."""
    model = get_omoe_model(copy.deepcopy(tiny_base), OMoEConfig()).eval()
    with model.disable_adapter():
        ref = {(d, n): _logits(model, n, dtype, False) for d, dtype in AUTOCAST.items() for n in TOKEN_COUNTS}
    assert all(torch.equal(ref[d, n], _logits(tiny_base, n, AUTOCAST[d], False)) for d, n in ref)
    return ref


@pytest.mark.parametrize("case", EXACT_CASES)
def test_untrained_adapter_logits_equal_disabled_adapter_bitwise_for_1_to_17_tokens(
    case, tiny_base, disabled_logits
):
    model = get_omoe_model(copy.deepcopy(tiny_base), OMoEConfig(**EXACT_CASES[case])).eval()
    failures = []
    for (dtype_name, n), ref in disabled_logits.items():
        for grad in (False, True):  # with grad the FFN experts take the checkpointed path
            out = _logits(model, n, AUTOCAST[dtype_name], grad)
            if not torch.equal(out, ref):
                failures.append((dtype_name, grad, n, (out.float() - ref.float()).abs().max().item()))
    assert failures == []


@pytest.mark.parametrize("case", ["omoe-dora", "dora"])
def test_untrained_dora_stays_exact_after_the_model_is_cast_to_bfloat16(case, tiny_base):
    """``m - ||W0||`` uses the norm ``m`` was initialised from (cast with it), not a recomputation
    from the cast weights, which rounds differently."""
    model = get_omoe_model(copy.deepcopy(tiny_base), OMoEConfig(**EXACT_CASES[case])).eval()
    model.to(torch.bfloat16)
    for n in (1, 5, 9):
        out = _logits(model, n, None, False)
        with model.disable_adapter():
            ref = _logits(model, n, None, False)
        assert torch.equal(out, ref), n


def test_dora_scale_minus_one_is_zero_untrained_and_equals_m_over_n_minus_one_trained():
    base = torch.nn.Linear(7, 5, bias=True, dtype=torch.float64)
    e = DoRAExperts(7, 5, num_experts=3, r=2, alpha=6).double()
    e.init_magnitude(base)
    assert torch.equal(e.scale_minus_one(base), torch.zeros(3, 5, dtype=torch.float64))
    with torch.no_grad():
        e.lora_B.normal_(std=1e-3)
        e.lora_magnitude.mul_(1 + 1e-4)
    expected = e.lora_magnitude / e.weight_norm(base) - 1
    torch.testing.assert_close(e.scale_minus_one(base), expected, rtol=1e-9, atol=1e-15)


# ---------------------------------------------------------------- (b) bf16 fidelity of small E'

FIDELITY_SHAPES = {  # (hidden, intermediate)
    name: (SHAPES[shape].hidden_size, SHAPES[shape].intermediate_size)
    for name, shape in (("llama2-7b", "llama2-7b"), ("smollm2", "smollm2-135m"))
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _GatedMLP(torch.nn.Module):
    """A LLaMA MLP block: ``down(silu(gate(x)) * up(x))``, no biases, weights ``N(0, 0.02)``."""

    def __init__(self, hidden: int, intermediate: int, generator: torch.Generator):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()
        with torch.no_grad():
            for lin in (self.gate_proj, self.up_proj, self.down_proj):
                lin.weight.normal_(0.0, 0.02, generator=generator)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _omoe_block(hidden, intermediate, device, seed=0, k=2, r=16):
    g = torch.Generator().manual_seed(seed)
    mlp = _GatedMLP(hidden, intermediate, g)
    experts = {}
    for p in ("gate", "up", "down"):
        lin = getattr(mlp, f"{p}_proj")
        experts[p] = LoRAExperts(lin.in_features, lin.out_features, num_experts=k, r=r, alpha=2 * r)
        with torch.no_grad():
            experts[p].lora_B.normal_(generator=g)
    layer = MoEFeedForward(mlp, Router(hidden, k), experts, OrthogonalMixer()).to(device).eval()
    layer.capture = True
    x = torch.randn(8, hidden, generator=g).to(device)  # 8 tokens of a post-RMSNorm hidden state
    return layer, x


def _capture(layer, x, dtype):
    with (
        torch.no_grad(),
        torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        out = layer(x)
    cap = layer.last_capture
    return out, cap.raw.float(), cap.mixed.float()


def _set_relative_size(layer, x, target):
    """Scale every B so that the median ``|E_s| / |FFN_0(x)|`` (float32) is about ``target``."""
    ffn0 = layer.base_layer(x).norm(dim=-1)  # (N,)
    for _ in range(2):  # E is almost linear in B at these sizes: two rescalings suffice
        _, raw, _ = _capture(layer, x, None)
        ratio = (raw.norm(dim=-1) / ffn0).median().item()
        with torch.no_grad():
            for e in layer.omoe_experts.values():
                e.lora_B.mul_(target / ratio)
    _, raw, _ = _capture(layer, x, None)
    return (raw.norm(dim=-1) / ffn0).median().item()


def _record(key: str, result: dict) -> None:
    path = os.environ.get("OMOE_FIDELITY_JSON")
    if not path:
        return
    file = Path(path)
    data = json.loads(file.read_text()) if file.exists() else {}
    data[key] = result
    file.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", FIDELITY_SHAPES)
@pytest.mark.parametrize("relative_size", [1e-4, 1e-3])
def test_bf16_fidelity_of_orthonormalised_representations(shape, relative_size, device):
    hidden, intermediate = FIDELITY_SHAPES[shape]
    layer, x = _omoe_block(hidden, intermediate, device)
    measured = _set_relative_size(layer, x, relative_size)
    _, _, q32 = _capture(layer, x, None)
    _, _, q16 = _capture(layer, x, torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(q16, q32, dim=-1).flatten()  # (S*N,) per slot and token
    result = {
        "shape": shape,
        "device": device,
        "relative_size_target": relative_size,
        "relative_size_measured": measured,
        "cos_median": cos.median().item(),
        "cos_min": cos.min().item(),
        "tokens": x.shape[0],
        "slots": q32.shape[0],
    }
    _record(f"{shape}/{device}/{relative_size:g}", result)
    assert abs(measured / relative_size - 1) < 0.2, result
    assert result["cos_median"] >= 0.99, result


# ---------------------------------------------------------------- (c) float16 with a GradScaler


def _fp16_run(base, config: OMoEConfig, steps: int = 10, half_base: bool = False):
    """Hand loop: float16 autocast (or a float16 base model with float32 adapters), GradScaler,
    AdamW. Returns (skipped steps, losses, max |grad| per step)."""
    torch.manual_seed(0)
    base = copy.deepcopy(base).half() if half_base else copy.deepcopy(base)
    model = get_omoe_model(base, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    skipped, losses, grad_max = 0, [], []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.float16, enabled=not half_base):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_max.append(max(p.grad.abs().max().item() for p in params if p.grad is not None))
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < scale  # the scaler lowers its scale exactly when it skips
        opt.zero_grad()
        losses.append(loss.item())
    return skipped, losses, grad_max


@pytest.fixture(scope="module")
def lora_fp16(tiny_base):
    """LoRA's run under float16 autocast (False) and on a float16 base (True), run once each."""
    runs = {}

    def run(half_base: bool):
        if half_base not in runs:
            runs[half_base] = _fp16_run(
                tiny_base, OMoEConfig(method="lora", dropout=0.0), half_base=half_base
            )
        return runs[half_base]

    return run


FP16_CASES = {
    "omoe": dict(),
    "omoe-dora": dict(use_dora=True),
    "omoe-linear": dict(topology="linear"),
    "omoe-top2of4": dict(num_experts=4, top_k=2),
    "omoe-float16-base": dict(),  # no autocast: a float16 model, float32 adapters
}


@pytest.mark.parametrize("case", FP16_CASES)
def test_fp16_gradscaler_skips_no_more_steps_under_omoe_than_lora(case, tiny_base, lora_fp16):
    half_base = case.endswith("float16-base")
    skipped, losses, grad_max = _fp16_run(
        tiny_base, OMoEConfig(dropout=0.0, **FP16_CASES[case]), half_base=half_base
    )
    lora_skipped, _, lora_grad_max = lora_fp16(half_base)
    assert skipped <= lora_skipped, (skipped, lora_skipped, losses)
    assert losses[-1] < losses[0] - 0.1, losses
    # The first step's gradient is Gram-Schmidt's 1/eps at E = 0 (docs/method.md, "Numerics"): it
    # is finite and far above LoRA's, and falls to a few times LoRA's from the second step on.
    assert grad_max[0] > 1e3 * lora_grad_max[0], (grad_max[0], lora_grad_max[0])
    assert max(grad_max[1:]) < 1e3 * max(lora_grad_max), grad_max


def test_first_step_gradient_reaches_only_the_experts_b(tiny_base):
    """At B = 0 every E_s is exactly 0, so the 1/eps of Gram-Schmidt multiplies exact zeros except on
    the experts' B: soft routing and top-2 of 2 (the same function) then give the same gradient to
    every other parameter bit for bit, and zero to the experts' A and the routers."""
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for top_k in (None, 2):
        torch.manual_seed(0)
        model = get_omoe_model(copy.deepcopy(tiny_base), OMoEConfig(num_experts=2, top_k=top_k, dropout=0.0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    soft, top = grads
    experts_b = [n for n in soft if "mlp.omoe_experts" in n and n.endswith("lora_B")]
    assert experts_b
    for name in soft:
        if name in experts_b:
            torch.testing.assert_close(
                top[name], soft[name], rtol=1e-4, atol=1e-6 * soft[name].abs().max().item()
            )
            assert soft[name].abs().max() > 0
        elif "mlp.omoe" in name:  # the experts' A and the routers
            assert soft[name].abs().max() == 0 and top[name].abs().max() == 0, name
        else:
            assert torch.equal(top[name], soft[name]), name


def test_float16_frozen_down_backward_keeps_a_1e8_gradient_finite_and_accurate():
    from omoe.layers.moe import _frozen_down

    down = torch.nn.Linear(32, 8, bias=False)
    dh = torch.randn(2, 5, 32, requires_grad=True)
    grad_out = torch.randn(2, 5, 8) * 1e8  # Gram-Schmidt's 1/eps times a loss-scaled gradient
    with torch.autocast("cpu", dtype=torch.float16):
        out = _frozen_down(down, dh, torch.float16)
    assert out.dtype == torch.float32
    out.backward(grad_out)
    expected = grad_out @ down.weight  # float32 reference
    assert torch.isfinite(dh.grad).all()
    torch.testing.assert_close(dh.grad, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
