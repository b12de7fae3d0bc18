"""OMoEModel on tiny random LLaMAs: one matrix of (method, topology, routing, base) cases."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from omoe import OMoEConfig, OMoEModel, get_omoe_model
from omoe.errors import AdapterLoadError, ConfigError, TargetNotFoundError
from omoe.layers import ExpertMixer, MoEFeedForward, MoELinear, OrthogonalMixer
from omoe.models.shapes import SHAPES
from omoe.models.testing import tiny_llama

CASES = {
    "omoe-default": dict(),
    "omoe-dora": dict(use_dora=True),
    "omoe-top2of4": dict(num_experts=4, top_k=2),
    "omoe-switch": dict(num_experts=3, routing="switch"),
    "omoe-linear": dict(topology="linear"),
    "omoe-linear-dora-top1": dict(topology="linear", use_dora=True, num_experts=3, top_k=1),
    "moe-soft": dict(method="moe"),
    "moe-mixlora": dict(method="moe", num_experts=8, top_k=2, router_aux_loss_coef=0.01),
    "moe-linear": dict(method="moe", topology="linear", num_experts=3, top_k=2),
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
}


def _base(layers=3):
    return tiny_llama(seed=0, vocab_size=128, num_hidden_layers=layers)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("case", CASES)
def test_adapted_model_equals_base_model_at_initialisation(case):
    base = _base()
    ids, mask = _batch()
    ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_omoe_model(copy.deepcopy(base), OMoEConfig(**CASES[case])).eval()
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("case", CASES)
def test_training_steps_reduce_loss_and_save_load_reproduces_outputs(case, tmp_path):
    torch.manual_seed(0)
    model = get_omoe_model(_base(), OMoEConfig(**CASES[case]))
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "omoe_" not in n]
    assert frozen == []

    model.eval()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = OMoEModel.from_pretrained(_base(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    assert loaded.omoe_config == model.omoe_config


@pytest.mark.parametrize("method", ["moe", "omoe"])
def test_top_k_of_all_experts_is_soft_routing_in_loss_and_gradients(method):
    """Top-2 of 2 selects every expert and renormalises the softmax over them: the soft router's
    weights. The two code paths must agree (Fig. 4's k = 2 point of the top-2 line)."""
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for top_k in (None, 2):
        torch.manual_seed(0)  # the same A and router initialisation for both
        model = get_omoe_model(
            tiny_llama(0), OMoEConfig(method=method, num_experts=2, top_k=top_k, dropout=0.0)
        )
        gen = torch.Generator().manual_seed(7)
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad and "lora_B" in name:
                p.data = 0.02 * torch.randn(p.shape, generator=gen)  # non-zero experts
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (soft_loss, soft), (top_loss, top) = results
    assert_close(top_loss, soft_loss, rtol=1e-6, atol=1e-6)
    assert soft.keys() == top.keys()
    for name in soft:
        assert_close(top[name], soft[name], rtol=1e-4, atol=1e-6 * soft[name].abs().max().item(), msg=name)


def test_mixlora_aux_loss_is_added_to_the_loss_with_its_coefficient():
    model = get_omoe_model(
        _base(), OMoEConfig(method="moe", num_experts=8, top_k=2, router_aux_loss_coef=0.5)
    )
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    stats = model.router_stats()
    # The mean over layers (MoE-PEFT's and HF Mixtral's scale), not the sum.
    assert_close(out.aux_loss, torch.stack([s.aux_loss for s in stats.values()]).mean())
    plain = model.base_model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert_close(out.loss, plain + 0.5 * out.aux_loss, rtol=1e-5, atol=1e-5)
    assert len(stats) == 3
    # Balanced top-2 of 8 gives E * sum f*P >= top_k; padded tokens are excluded from f.
    assert all(s.aux_loss.item() >= 2 - 1e-4 for s in stats.values())
    assert all(abs(s.token_fraction.sum().item() - 1) < 1e-5 for s in stats.values())


def test_capture_returns_raw_and_orthonormalised_representations_per_layer():
    model = get_omoe_model(_base(), OMoEConfig(num_experts=3)).eval()
    _perturb(model)
    ids, mask = _batch()
    with model.capture_representations():
        model(input_ids=ids, attention_mask=mask)
    reps = model.expert_representations()
    assert len(reps) == 3
    cap = next(iter(reps.values()))
    assert cap.raw.shape == cap.mixed.shape == (3, 18, 64)
    assert cap.mask.sum() == 15
    gram = torch.einsum("snd,tnd->nst", cap.mixed, cap.mixed)
    assert_close(gram, torch.eye(3).expand(18, 3, 3), atol=1e-5, rtol=0)


def test_disable_adapter_gives_the_base_model_and_restores():
    base = _base()
    ids, mask = _batch()
    ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_omoe_model(copy.deepcopy(base), OMoEConfig()).eval()
    _perturb(model)
    adapted = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(adapted, ref)
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, adapted)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unload_equals_unmerged_output(method):
    model = get_omoe_model(_base(), OMoEConfig(method=method)).eval()
    _perturb(model)
    ids, mask = _batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    merged = model.merge_and_unload()
    assert not any("omoe_" in n for n, _ in merged.named_parameters())
    assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["moe", "omoe"])
def test_merge_and_unload_refuses_input_dependent_methods(method):
    model = get_omoe_model(_base(), OMoEConfig(method=method))
    with pytest.raises(ConfigError, match="depend on each input"):
        model.merge_and_unload()


def test_generate_runs_through_the_wrapper_with_kv_cache():
    model = get_omoe_model(_base(), OMoEConfig(num_experts=4, top_k=2)).eval()
    _perturb(model)
    ids, mask = _batch()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2
    )
    assert out.shape == (2, 13)


@pytest.mark.parametrize(
    "spec,num_blocks,expected",
    [
        ("low", 32, set(range(10))),
        ("medium", 32, set(range(10, 20))),
        ("high", 32, set(range(20, 32))),
        ("low+high", 32, set(range(10)) | set(range(20, 32))),
        ("low", 30, set(range(9))),
        ("medium", 30, set(range(9, 19))),
        ("high", 30, set(range(19, 30))),
        ("0-2,5", 32, {0, 1, 2, 5}),
        ([1, 4], 32, {1, 4}),
        ("none", 8, set()),
    ],
)
def test_orthogonal_layer_selection(spec, num_blocks, expected):
    assert OMoEConfig(orthogonal_layers=spec).orthogonal_blocks(num_blocks) == expected


def test_layerwise_omoe_puts_vanilla_moe_on_the_other_blocks():
    model = get_omoe_model(_base(layers=6), OMoEConfig(orthogonal_layers="high"))
    mixers = {int(n.split(".")[2]): type(m.mixer) for n, m in model.moe_layers().items()}
    # 6 blocks: boundaries round(6*10/32)=2 and round(6*20/32)=4, so 'high' is blocks 4..5
    assert mixers == {
        0: ExpertMixer,
        1: ExpertMixer,
        2: ExpertMixer,
        3: ExpertMixer,
        4: OrthogonalMixer,
        5: OrthogonalMixer,
    }


def test_linear_topology_puts_a_router_on_every_target():
    model = get_omoe_model(_base(), OMoEConfig(topology="linear"))
    layers = model.moe_layers()
    assert len(layers) == 3 * 7 and all(isinstance(m, MoELinear) for m in layers.values())
    ffn = get_omoe_model(_base(), OMoEConfig())
    assert all(isinstance(m, MoEFeedForward) for m in ffn.moe_layers().values())


# ----------------------------------------------------------------------------- parameter fidelity
@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(r=2, alpha=4), 8_159_232),
        (dict(r=4, alpha=8), 16_056_320),
        (dict(r=8, alpha=16), 31_850_496),
        (dict(), 63_438_848),
        (dict(r=32, alpha=64), 126_615_552),
        (dict(method="moe", num_experts=8, top_k=2), 203_423_744),
        (dict(method="lora", r=80, alpha=160), 199_884_800),
    ],
)
def test_trainable_parameters_match_the_paper_on_llama2_7b_shape(kwargs, expected):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        base = LlamaForCausalLM(SHAPES["llama2-7b"].llama_config())
    model = get_omoe_model(base, OMoEConfig(**kwargs))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == 6_738_415_616 + expected


def test_print_trainable_parameters_uses_peft_format(capsys):
    model = get_omoe_model(_base(), OMoEConfig(method="lora"))
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    trainable, total = model.get_nb_trainable_parameters()
    assert (
        line
        == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="lorax"), "unknown method 'lorax'; allowed: lora, dora, moe, omoe"),
        (dict(top_k=3), "top_k=3 exceeds num_experts=2"),
        (dict(r=0), "r must be an integer >= 1, got 0"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(routing="hash"), "unknown routing 'hash'"),
        (dict(orthogonal_layers="middle"), "orthogonal_layers 'middle' not understood"),
        (dict(method="moe", orthogonal_layers="low"), "applies to method 'omoe' only"),
    ],
)
def test_bad_config_values_raise_config_error_saying_what_is_allowed(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OMoEConfig(**kwargs)


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key.*experts_count.*valid keys:.*num_experts"):
        OMoEConfig.from_dict({"experts_count": 3})


def test_missing_target_lists_what_the_model_has():
    with pytest.raises(
        TargetNotFoundError,
        match=r"c_attn not found.*down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    ):
        get_omoe_model(_base(), OMoEConfig(target_modules=["q_proj", "c_attn"]))


def test_unsupported_architecture_for_ffn_topology_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TargetNotFoundError, match="not found in GPT2LMHeadModel"):
        get_omoe_model(gpt2, OMoEConfig())


def test_orthogonal_layers_beyond_the_model_are_rejected():
    with pytest.raises(ConfigError, match=r"names block\(s\) \[7\]; this model has blocks 0..2"):
        get_omoe_model(_base(), OMoEConfig(orthogonal_layers=[0, 7]))


def test_adapter_for_another_shape_names_the_tensor(tmp_path):
    get_omoe_model(_base(), OMoEConfig()).save_pretrained(tmp_path)
    wider = tiny_llama(seed=0, vocab_size=128, num_hidden_layers=3, intermediate_size=96)
    with pytest.raises(
        AdapterLoadError, match=r"tensor 'model\.layers\.0\.mlp\.omoe_experts\.down\.lora_A' has shape"
    ):
        OMoEModel.from_pretrained(wider, tmp_path)


def test_adapter_with_missing_tensor_is_refused(tmp_path):
    get_omoe_model(_base(layers=2), OMoEConfig()).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"missing tensor 'model\.layers\.2"):
        OMoEModel.from_pretrained(_base(layers=3), tmp_path)


def test_pickled_adapter_is_refused_without_unpickling(tmp_path):
    OMoEConfig().save_pretrained(tmp_path)
    marker = tmp_path / "unpickled"
    # A pickle that would create a file if it were ever loaded.
    import pickle

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(AdapterLoadError, match="safetensors only and never unpickles"):
        OMoEModel.from_pretrained(_base(), tmp_path)
    assert not marker.exists()


def test_corrupt_safetensors_file_is_refused(tmp_path):
    OMoEConfig().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        OMoEModel.from_pretrained(_base(), tmp_path)


def test_save_pretrained_writes_adapter_tensors_only(tmp_path):
    model = get_omoe_model(_base(), OMoEConfig())
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    trainable = {n.removeprefix("base_model.") for n, p in model.named_parameters() if p.requires_grad}
    assert set(keys) == trainable


def test_loading_into_the_wrong_method_is_refused(tmp_path):
    model = get_omoe_model(_base(), OMoEConfig(method="lora"))
    state = model.adapter_state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "adapter_model.safetensors")
    OMoEConfig().save_pretrained(tmp_path)  # claims omoe, holds lora tensors
    with pytest.raises(AdapterLoadError, match="does not fit this model"):
        OMoEModel.from_pretrained(_base(), tmp_path)


@pytest.mark.parametrize("case", ["omoe-default", "omoe-linear", "dora"])
def test_unload_restores_the_original_modules(case):
    base = _base()
    ids, mask = _batch()
    ref = base(input_ids=ids, attention_mask=mask).logits
    names = {n: type(m) for n, m in base.named_modules()}
    model = get_omoe_model(base, OMoEConfig(**CASES[case]))
    _perturb(model)
    restored = model.unload()
    assert {n: type(m) for n, m in restored.named_modules()} == names
    assert torch.equal(restored(input_ids=ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_ffn_topology_supports_other_llama_family_models(family):
    import transformers

    cls, cfg = {
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
    }[family]
    torch.manual_seed(0)
    base = cls(
        cfg(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    ).eval()
    ids, mask = _batch()
    ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_omoe_model(copy.deepcopy(base), OMoEConfig())
    assert len(model.moe_layers()) == 2
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable > 0


@pytest.mark.parametrize("method,topology", [("lora", "ffn"), ("omoe", "ffn"), ("moe", "linear")])
def test_layers_puts_adapters_on_the_named_blocks_only(method, topology):
    base = _base(layers=4)
    frozen = copy.deepcopy(base.model.layers[0].state_dict())
    model = get_omoe_model(base, OMoEConfig(method=method, topology=topology, layers="2-3"))
    trainable = {int(n.split("layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {2, 3}
    # the blocks outside `layers` are the base's own modules, weights untouched
    assert type(model.base_model.model.layers[0].mlp).__name__ == "LlamaMLP"
    for key, value in model.base_model.model.layers[0].state_dict().items():
        assert torch.equal(value, frozen[key])


def test_layers_with_a_layerwise_preset_uses_the_models_depth():
    # 'high' of a 6-block model is blocks 4..5 whether or not the low blocks carry adapters
    model = get_omoe_model(_base(layers=6), OMoEConfig(layers="3-5", orthogonal_layers="high"))
    mixers = {int(n.split(".")[2]): type(m.mixer) for n, m in model.moe_layers().items()}
    assert mixers == {3: ExpertMixer, 4: OrthogonalMixer, 5: OrthogonalMixer}


def test_layers_beyond_the_model_or_empty_are_rejected():
    with pytest.raises(ConfigError, match=r"layers names block\(s\) \[9\]; this model has blocks 0..2"):
        get_omoe_model(_base(), OMoEConfig(layers=[1, 9]))
    with pytest.raises(ConfigError, match="layers names no block"):
        OMoEConfig(layers="none")
