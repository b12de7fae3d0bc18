"""OMoEModel under transformers.Trainer and TRL's SFTTrainer on the tiny random LLaMA (issue 12)."""

import copy
import os

import pytest
import torch
from torch.testing import assert_close

from omoe import OMoEConfig, OMoEModel, get_omoe_model
from omoe.errors import AdapterLoadError, ConfigError
from omoe.models.testing import tiny_llama

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from omoe.integrations.hf import OMoETrainer, load_adapter_weights  # noqa: E402

VOCAB = 128
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# Trainer's own state for resume_from_checkpoint; what a PEFT checkpoint holds besides the adapter
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n=16, length=12, extra_column=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, length), generator=g).tolist()
    columns = {"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids}
    if extra_column:  # Trainer drops the columns the model's forward does not name
        columns["text"] = ["unused"] * n
    return datasets.Dataset.from_dict(columns)


def _args(out, **overrides):
    kwargs = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def _model(**config):
    config = {"dropout": 0.0, **config}
    torch.manual_seed(0)  # the adapter's A and the router are drawn from torch's RNG
    return get_omoe_model(tiny_llama(0, vocab_size=VOCAB), OMoEConfig(**config))


def _adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def _logits(model, ids=None):
    ids = torch.arange(3, 15).view(2, 6) if ids is None else ids
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_plain_trainer_keeps_the_input_columns_and_trains_the_adapter(tmp_path):
    model = _model(method="moe", router_aux_loss_coef=0.01)
    before = _adapter(model)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=_dataset()
    )
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = _adapter(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_A" not in k and "lora_B" not in k
               and "router" not in k)  # fmt: skip


@pytest.mark.parametrize("config", [dict(), dict(method="moe", num_experts=4, top_k=2, router_aux_loss_coef=0.01),
                                    dict(method="dora")])  # fmt: skip
def test_checkpoints_hold_the_adapter_only_and_reload_to_the_same_logits(tmp_path, config):
    model = _model(**config)
    trainer = OMoETrainer(
        model=model, args=_args(tmp_path, activation_checkpointing=True), train_dataset=_dataset()
    )
    trainer.train()
    for step in (2, 4):
        files = set(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert files == ADAPTER_FILES | TRAINER_FILES, files
    loaded = OMoEModel.from_pretrained(tiny_llama(0, vocab_size=VOCAB), tmp_path / "checkpoint-4")
    assert torch.equal(_logits(loaded), _logits(model))


def test_resume_from_checkpoint_continues_the_run_to_the_same_adapter(tmp_path):
    config = dict(method="omoe", dropout=0.1, router_aux_loss_coef=0.01)  # dropout: the RNG state resumes too
    full = _model(**config)
    OMoETrainer(model=full, args=_args(tmp_path / "full"), train_dataset=_dataset()).train()

    resumed = _model(**config)  # as a new process would build it
    trainer = OMoETrainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    want, got = _adapter(full), _adapter(resumed)
    assert want.keys() == got.keys()
    for k in want:
        assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)
    at_two = OMoEModel.from_pretrained(tiny_llama(0, vocab_size=VOCAB), tmp_path / "full" / "checkpoint-2")
    key = "model.layers.0.mlp.omoe_experts.up.lora_B"
    assert not torch.equal(at_two.adapter_state_dict()[key], got[key])  # steps 3 and 4 did run


def test_loading_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    model = _model(r=4)
    model.save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"another configuration: r \(4, the model has 8\)"):
        load_adapter_weights(_model(r=8), tmp_path)


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_backward():
    """Through Trainer's entry point (the wrapped model's activation checkpointing), aux loss included."""
    ids = torch.arange(3, 27).view(2, 12)
    grads = []
    for checkpointed in (False, True):
        model = _model(num_experts=3, top_k=2, router_aux_loss_coef=0.1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        if checkpointed:
            model.activation_checkpointing_enable()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads[1].items() if "router" in n)


def test_reentrant_checkpointing_with_an_aux_loss_is_refused_not_silently_ungradiented():
    """Reentrant checkpointing runs the blocks without autograd: the router statistics, and so the
    aux loss, would carry no gradient (top-1 routers would get none at all)."""
    model = _model(method="moe", num_experts=4, top_k=1, router_aux_loss_coef=1.0)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.arange(3, 27).view(2, 12)
    with pytest.raises(ConfigError, match="use_reentrant=False"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():  # evaluation needs no gradient
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_aux_loss_under_gradient_accumulation_is_weighted_by_the_token_share():
    model = _model(method="moe", router_aux_loss_coef=0.5)
    model.train()
    ids = torch.arange(3, 27).view(2, 12)
    labels = ids.clone()
    labels[1] = -100  # 11 supervised tokens (labels[..., 1:]) in this micro-batch
    plain = model(input_ids=ids, labels=labels)
    lm = plain.loss - 0.5 * plain.aux_loss
    accumulated = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(44))
    # the base model divides by num_items_in_batch (44) instead of 11; the aux term by 44/11 too
    assert_close(accumulated.loss, lm * 11 / 44 + 0.5 * plain.aux_loss * 11 / 44)


def _sft(tmp_path, model, tokenizer, **overrides):
    from trl import SFTConfig

    from omoe.integrations.hf import OMoESFTTrainer

    texts = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}." for i in range(16)]
    args = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)  # fmt: skip
    args.update(overrides)
    return OMoESFTTrainer(model=model, args=SFTConfig(**args), train_dataset=datasets.Dataset.from_dict({"text": texts}),
                          processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize("method", ["omoe", "lora"])
def test_sft_trainer_trains_with_its_defaults_and_saves_loadable_adapters(
    tmp_path, smollm2_tokenizer, method
):
    pytest.importorskip("trl")
    model = get_omoe_model(
        tiny_llama(0), OMoEConfig(method=method, router_aux_loss_coef=0.01 if method == "omoe" else 0)
    )
    trainer = _sft(tmp_path, model, smollm2_tokenizer)
    assert trainer.args.gradient_checkpointing  # SFTConfig's default
    history = trainer.train()
    assert history.global_step == 4
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert set(os.listdir(tmp_path / "checkpoint-4")) >= ADAPTER_FILES
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(tmp_path / "checkpoint-4"))
    ids = torch.tensor(smollm2_tokenizer(["Question 3: what is 3 plus 3?"]).input_ids)
    loaded = OMoEModel.from_pretrained(tiny_llama(0), tmp_path / "checkpoint-4")
    saved, trained_adapter = _adapter(loaded), _adapter(model)
    assert all(torch.equal(saved[k], trained_adapter[k]) for k in trained_adapter)
    # SFTConfig trains under bf16 autocast, which accelerate left on the model's forward: take it off
    trained = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    assert torch.equal(_logits(loaded, ids), _logits(trained, ids))


def test_sft_trainer_adds_the_router_aux_loss_to_its_own_loss(tmp_path, smollm2_tokenizer):
    pytest.importorskip("trl")
    losses = {}
    for coef in (0.0, 1.0):
        model = get_omoe_model(
            tiny_llama(0), OMoEConfig(method="moe", num_experts=4, top_k=1, router_aux_loss_coef=coef)
        )
        trainer = _sft(tmp_path / str(coef), model, smollm2_tokenizer, max_steps=1)
        batch = next(iter(trainer.get_train_dataloader()))
        model.train()
        losses[coef] = trainer.compute_loss(model, batch).item()
        aux = model.aux_loss().item()
    assert aux > 0.9  # Switch loss: about 1 for balanced routing, at least 1/E; never 0
    assert losses[1.0] == pytest.approx(losses[0.0] + aux, rel=1e-5)


def test_trainer_on_a_copy_leaves_the_base_model_untouched(tmp_path):
    base = tiny_llama(0, vocab_size=VOCAB)
    reference = copy.deepcopy(base)
    model = get_omoe_model(base, OMoEConfig(dropout=0.0))
    OMoETrainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=_dataset()).train()
    with model.disable_adapter():
        assert torch.equal(_logits(model), _logits(reference))
