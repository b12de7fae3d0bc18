"""``omoe analyze``: the diversity metrics against hand computations, every expert's representation
under top-k, and the command on tiny trained adapters (OMoE's mixed representations are orthogonal,
a PNG is written, bad input is a one-line error that writes nothing)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from omoe import OMoEConfig, get_omoe_model
from omoe.analysis import effective_rank, pairwise_cosine
from omoe.analysis.metrics import by_expert
from omoe.analysis.run import aggregate, aggregate_table
from omoe.cli.main import main
from omoe.models.testing import tiny_llama
from omoe.train import train
from omoe.train.config import load_config


# ---------------------------------------------------------------------------- metrics
def test_pairwise_cosine_of_orthogonal_identical_and_opposite_slots():
    e = torch.eye(3, dtype=torch.float64)
    orthogonal = torch.stack([e[0], e[1], e[2]])[:, None, :]  # (S=3, N=1, d=3)
    assert pairwise_cosine(orthogonal) == {"mean": 0.0, "mean_abs": 0.0, "max_abs": 0.0}
    same = torch.stack([e[0], 2 * e[0]])[:, None, :]
    assert pairwise_cosine(same)["mean"] == pytest.approx(1.0)
    opposite = torch.stack([e[0], -e[0]])[:, None, :]
    assert pairwise_cosine(opposite) == pytest.approx({"mean": -1.0, "mean_abs": 1.0, "max_abs": 1.0})
    # Two tokens: cos 1 on the first, 0 on the second -> mean 0.5.
    two = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[0], e[1]])])  # (S=2, N=2, d=3)
    assert pairwise_cosine(two)["mean"] == pytest.approx(0.5)
    assert pairwise_cosine(orthogonal[:1]) is None  # one slot: nothing to compare


def test_effective_rank_is_roy_and_vetterli():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert effective_rank(torch.ones(4, 3)) == pytest.approx(1.0)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(
        math.exp(-(p * p.log()).sum())
    )
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_by_expert_groups_top_k_slots():
    reps = torch.arange(12.0).view(2, 3, 2)  # (S=2, N=3, d=2)
    indices = torch.tensor([[0, 1, 0], [2, 2, 1]])
    groups = by_expert(reps, indices, num_experts=4)
    assert sorted(groups) == [0, 1, 2]
    assert_close(groups[0], reps[0, [0, 2]])
    assert_close(groups[2], reps[1, [0, 1]])


# ---------------------------------------------------------------------------- capture of every expert
def test_aggregate_groups_a_methods_seeds_and_averages_over_layers_then_seeds():
    def adapter(label, raw):
        layers = {f"l{i}": {"cos_raw": {"mean": v}, "cos_mixed": {"mean": 0.0}} for i, v in enumerate(raw)}
        return {"label": label, "routing": "soft, 2 experts", "layers": layers}

    result = {"adapters": [adapter("moe__multi__seed0", [0.8, 1.0]), adapter("omoe__multi__seed0", [0.2, 0.4]),
                           adapter("moe__multi__seed1", [0.6, 0.8]), adapter("mixlora", [0.1, 0.3])]}  # fmt: skip
    rows = {r["group"]: r for r in aggregate(result)}
    assert list(rows) == ["moe__multi", "omoe__multi", "mixlora"]
    assert rows["moe__multi"]["cos_raw"] == pytest.approx([0.9, 0.7])
    assert rows["moe__multi"]["cos_raw_mean"] == pytest.approx(0.8)
    assert rows["moe__multi"]["cos_raw_std"] == pytest.approx(math.sqrt(0.02))
    assert rows["omoe__multi"]["cos_raw_std"] is None and rows["mixlora"]["cos_raw_mean"] == pytest.approx(
        0.2
    )
    table = aggregate_table(aggregate(result))
    assert "| moe__multi | soft, 2 experts | 2 | +0.800 ± 0.141 | +0.000 ± 0.000 | +0.900 +0.700 |" in table


@pytest.mark.parametrize("topology", ["ffn", "linear"])
def test_every_experts_representation_under_top_k_matches_the_selected_ones_and_soft_routing(topology):
    base = tiny_llama(0)
    topk = get_omoe_model(base, OMoEConfig(num_experts=4, top_k=2, topology=topology)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in topk.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids = torch.randint(3, 1000, (2, 7))
    with torch.no_grad(), topk.capture_representations(all_experts=True):
        out = topk(input_ids=ids).logits
    caps = topk.expert_representations()
    assert caps
    for cap in caps.values():
        assert cap.all_raw.shape[0] == 4 and cap.raw.shape[0] == 2
        assert_close(cap.all_raw.gather(0, cap.indices[..., None].expand_as(cap.raw)), cap.raw)
    with torch.no_grad():
        assert_close(topk(input_ids=ids).logits, out)  # capturing does not change the output
    # Each layer alone, same input: every expert's representation under top-k = soft routing's.
    for layer in topk.moe_layers().values():
        x = torch.randn(5, layer.omoe_router.weight.shape[1])
        layer.capture, layer.capture_all_experts = True, True
        with torch.no_grad():
            layer(x)
            every = layer.last_capture.all_raw
            layer.omoe_router.routing = "soft"
            layer(x)
        assert_close(every, layer.last_capture.raw)
        assert torch.equal(layer.last_capture.all_raw, layer.last_capture.raw)  # soft: all_raw is raw


# ---------------------------------------------------------------------------- the command
def _train_tiny(path, model_dir, tokenizer, **adapter):
    config = load_config(None, {
        "model": str(model_dir), "output_dir": str(path), "device": "cpu",
        "data.tasks": ["boolq"], "data.limit": 8, "data.cutoff_len": 48, "data.train_on_inputs": True,
        "optim.global_batch_size": 4, "optim.micro_batch_size": 4, "optim.max_steps": 2, "optim.warmup_steps": 0,
        "optim.lr": 1e-2, "logging.progress": False, "logging.tensorboard": False,
        **{f"adapter.{k}": v for k, v in adapter.items()},
    })  # fmt: skip
    train(config, model=tiny_llama(0), tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "moe_soft": _train_tiny(root / "moe_soft", tiny_model_dir, smollm2_tokenizer, method="moe"),
        "omoe_top2": _train_tiny(
            root / "omoe_top2", tiny_model_dir, smollm2_tokenizer, num_experts=4, top_k=2
        ),
        "lora": _train_tiny(root / "lora", tiny_model_dir, smollm2_tokenizer, method="lora"),
    }


def test_analyze_compares_adapters_and_omoe_mixed_representations_are_orthogonal(adapters, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", "--adapter", str(adapters["moe_soft"]), "--adapter", str(adapters["omoe_top2"]),
            "--task", "boolq", "--tokens", "150", "--tsne-points", "60", "--output", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "analysis.json").read_text())
    assert (out / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.md").read_text().strip() in printed
    vanilla, omoe = result["adapters"]
    assert (vanilla["method"], vanilla["routing"]) == ("moe", "soft, 2 experts")
    assert (omoe["method"], omoe["routing"]) == ("omoe", "top-2 of 4")
    assert list(omoe["layers"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]  # first and last of 2 blocks
    for layer in omoe["layers"].values():
        assert layer["tokens"] >= 150
        assert layer["cos_mixed"]["max_abs"] < 1e-4  # after Gram-Schmidt
        assert layer["cos_raw"]["mean_abs"] > 1e-3  # the raw representations are not orthogonal
        assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0, abs=1e-5)
        assert 0 < layer["routing_entropy_normalized"] <= 1
        assert 1 <= layer["erank_raw"]["mean"] <= layer["erank_raw"]["joint"]
    for layer in vanilla["layers"].values():  # vanilla MoE mixes its raw representations
        assert layer["cos_mixed"] == pytest.approx(layer["cos_raw"])


@pytest.mark.parametrize(
    "which, extra, message",
    [
        ("lora", [], "the adapter has no MoE layers"),
        (
            "omoe_top2",
            ["--layers", "0,5"],
            "--layers 5: no MoE layer in that block; blocks with MoE layers: 0-1",
        ),
        ("omoe_top2", ["--task", "siqa"], "unknown task 'siqa'"),
        ("omoe_top2", ["--tokens", "0"], "--tokens must be an integer >= 1"),
        ("omoe_top2", ["--tokens", "10000000"], "the task's prompts hold only"),
        ("omoe_top2", ["--view", "both"], "unknown --view 'both'"),
        ("missing", [], "adapter directory not found"),
    ],
)
def test_analyze_errors_are_one_line_and_write_nothing(adapters, tmp_path, capsys, which, extra, message):
    adapter = adapters.get(which, tmp_path / "nowhere")
    out = tmp_path / "analysis"
    argv = [
        "analyze",
        "--adapter",
        str(adapter),
        "--task",
        "boolq",
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
