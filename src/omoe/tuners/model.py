"""``OMoEModel``: a frozen causal LM with omoe adapters, with PEFT's names for what it offers."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from omoe.config import CONFIG_NAME, OMoEConfig
from omoe.errors import AdapterLoadError, ConfigError
from omoe.layers import ExpertCapture, MoELayer, RouterStats
from omoe.layers.quantized import keep_4bit_trainable
from omoe.tuners import peft_format
from omoe.tuners.injection import adapter_modules, block_index, inject_adapters, set_module
from omoe.version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PREFIX = "omoe_"  # every adapter sub-module's attribute name starts with it
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def is_adapter_key(key: str) -> bool:
    return any(part.startswith(ADAPTER_PREFIX) for part in key.split("."))


class OMoEModel(nn.Module):
    """Wraps a Hugging Face causal LM whose targets were replaced by adapter layers.

    Build it with :func:`get_omoe_model` or :meth:`from_pretrained`. Attribute access falls
    through to the wrapped model, so ``.generate``, ``.config`` and friends work as usual.
    """

    def __init__(self, model: nn.Module, config: OMoEConfig):
        super().__init__()
        self.base_model = model
        self.omoe_config = config
        self._token_mask = inject_adapters(model, config)
        keep_4bit_trainable(model)  # a no-op unless the base is bitsandbytes 4-bit

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """The wrapped model's forward; with ``labels`` and a non-zero ``router_aux_loss_coef`` the
        returned ``loss`` includes ``coef * aux_loss``, and ``outputs.aux_loss`` holds the raw loss (mean over layers).

        The inputs are named, as in PEFT's ``PeftModelForCausalLM``, so that ``transformers.Trainer``
        keeps those dataset columns. Under Trainer's gradient accumulation (``num_items_in_batch`` =
        supervised tokens of the whole accumulated batch) the aux term is weighted by this micro-batch's
        share of those tokens, so the accumulated sum is the token-weighted mean, not ``accum`` times it.
        """
        self._token_mask.mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        try:
            named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
            outputs = self.base_model(**{k: v for k, v in named.items() if v is not None}, **kwargs)
        finally:
            self._token_mask.mask = None
        coef = self.omoe_config.router_aux_loss_coef
        if self.omoe_config.is_moe and getattr(outputs, "loss", None) is not None and coef > 0:
            aux = self.aux_loss()
            if torch.is_grad_enabled() and not aux.requires_grad and self._routers_trainable():
                raise ConfigError(
                    "the router's aux loss has no gradient: the blocks ran without autograd (reentrant "
                    "activation checkpointing, use_reentrant=True); use use_reentrant=False (transformers' "
                    "default) or router_aux_loss_coef 0"
                )
            outputs["aux_loss"] = aux
            share = aux_token_share(labels, kwargs.get("num_items_in_batch"))
            outputs["loss"] = outputs.loss + coef * (aux if share is None else aux * share)
        return outputs

    @property
    def frozen_depth(self) -> int:
        """How many bottom blocks carry no adapter (0 unless ``layers`` leaves the lowest ones out):
        their output never changes, so :func:`omoe.models.prefix.frozen_prefix` may cache it."""
        return min(block_index(name) for name, _ in adapter_modules(self.base_model))

    def _routers_trainable(self) -> bool:
        return any(p.requires_grad for m in self.moe_layers().values() for p in m.omoe_router.parameters())

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate``; router statistics of the prompt pass skip padding."""
        mask = kwargs.get("attention_mask")
        self._token_mask.mask = None if mask is None else mask.reshape(-1).bool()
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            self._token_mask.mask = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ router and experts
    def moe_layers(self) -> dict[str, MoELayer]:
        return {name: m for name, m in adapter_modules(self.base_model) if isinstance(m, MoELayer)}

    def router_stats(self) -> dict[str, RouterStats]:
        """Statistics of the last forward pass, per MoE layer (aux loss, load, entropy)."""
        return {
            n: m.last_router_stats for n, m in self.moe_layers().items() if m.last_router_stats is not None
        }

    def aux_loss(self) -> torch.Tensor:
        """Mean over MoE layers of the load-balancing loss of the last forward pass (with graph).

        The mean, not the sum: MoE-PEFT (MixLoRA) and HF Mixtral compute one loss over the router logits
        of all layers together, so their coefficient (MoE-PEFT's 0.001) is per layer, not per model."""
        losses = [s.aux_loss for s in self.router_stats().values()]
        if not losses:
            return torch.zeros(())
        return torch.stack(losses).mean()

    @contextlib.contextmanager
    def capture_representations(self, all_experts: bool = False):
        """Within the block, every MoE layer keeps its last :class:`ExpertCapture`; read them with
        :meth:`expert_representations` after each forward.

        ``all_experts``: under top-k routing also compute every expert's representation on every
        token (``ExpertCapture.all_raw``), to compare experts on the same tokens; it costs a dense
        pass over all experts. Under soft routing ``all_raw`` is ``raw`` anyway.
        """
        layers = self.moe_layers().values()
        for m in layers:
            m.capture, m.capture_all_experts, m.last_capture = True, all_experts, None
        try:
            yield self
        finally:
            for m in layers:
                m.capture, m.capture_all_experts = False, False

    def expert_representations(self) -> dict[str, ExpertCapture]:
        return {n: m.last_capture for n, m in self.moe_layers().items() if m.last_capture is not None}

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors only, keyed by their name inside the wrapped model."""
        return {k: v for k, v in self.base_model.state_dict().items() if is_adapter_key(k)}

    # ------------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        format: str = "omoe",
    ) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter weights only),
        atomically: a crash leaves either the previous files or the new ones.

        ``state_dict``: the adapter tensors to write instead of this model's own (as in PEFT), e.g.
        full tensors gathered from FSDP shards.
        ``format``: ``"omoe"``, or ``"peft"`` for PEFT's own layout (methods lora and dora), which
        ``peft.PeftModel.from_pretrained(base, directory)`` loads.
        """
        if format not in peft_format.FORMATS:
            raise ConfigError(f"unknown adapter format {format!r}; allowed: {', '.join(peft_format.FORMATS)}")
        if format == "peft":
            peft_format.check_peft_method(self.omoe_config)  # before anything is written
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.adapter_state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        base_name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-") as tmp:
            if format == "peft":
                peft_format.write_peft(tmp, self.omoe_config, tensors, base_name)
            else:
                save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
                self.omoe_config.save_pretrained(tmp, omoe_version=__version__, base_model_name_or_path=base_name)
            os.replace(os.path.join(tmp, WEIGHTS_NAME), directory / WEIGHTS_NAME)
            os.replace(os.path.join(tmp, CONFIG_NAME), directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False
    ) -> OMoEModel:
        """Inject the adapter saved in ``directory`` into ``model`` and load its weights.

        ``directory`` holds an omoe adapter or a PEFT LoRA/DoRA adapter (PEFT's layout). Only
        safetensors files are read; pickle-based files are refused.
        """
        directory = Path(directory)
        if directory.is_file():
            raise AdapterLoadError(
                f"{directory} is a file; pass the adapter directory holding {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory {directory} does not exist")
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickled:
                raise AdapterLoadError(
                    f"{directory} holds {', '.join(pickled)} but no {WEIGHTS_NAME}; omoe loads safetensors only "
                    "and never unpickles (convert with safetensors.torch.save_file)"
                )
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        if peft_format.is_peft_adapter(directory):
            config, state = peft_format.read_peft(directory)
            wrapped = cls(model, config)
        else:
            config = OMoEConfig.from_pretrained(directory)
            wrapped = cls(model, config)
            try:
                state = load_file(weights, device="cpu")
            except (SafetensorError, OSError) as err:
                raise AdapterLoadError(f"{weights} is not a readable safetensors file: {err}") from None
        wrapped.load_adapter_state_dict(state, source=str(weights))
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
            wrapped.eval()
        return wrapped

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy adapter tensors in, after checking names, shapes and that every value is finite; the
        error names the tensor (and ``source``, the file)."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
            raise AdapterLoadError(
                f"adapter {source} does not fit this model: {what} "
                f"({len(missing)} missing, {len(unexpected)} unexpected of {len(own)})"
            )
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise AdapterLoadError(
                    f"adapter {source} does not fit this model: tensor {key!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(own[key].shape)}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise AdapterLoadError(
                    f"adapter {source}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of "
                    f"{value.numel()}; refusing to load it (retrain, or take an earlier checkpoint)"
                )
        params = dict(self.base_model.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)

    # ------------------------------------------------------------------ adapters on / off, merging
    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes exactly the frozen base model."""
        modules = [m for _, m in adapter_modules(self.base_model)]
        previous = [m.disabled for m in modules]
        for m in modules:
            m.disabled = True
        try:
            yield
        finally:
            for m, was in zip(modules, previous):
                m.disabled = was

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the original model."""
        for name, module in list(adapter_modules(self.base_model)):
            set_module(self.base_model, name, module.base_layer)
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """Fold LoRA/DoRA into the frozen weights and return the plain model (lora/dora only)."""
        if self.omoe_config.is_moe:
            raise ConfigError(
                f"merge_and_unload is not possible for method {self.omoe_config.method!r}: the router's "
                "weights (and OMoE's Gram-Schmidt) depend on each input, so no fixed weight equals the "
                "adapted layer; allowed for methods 'lora' and 'dora'"
            )
        for _, module in adapter_modules(self.base_model):
            with torch.no_grad():
                module.base_layer.weight.copy_(module.merged_weight())
        return self.unload()


def aux_token_share(labels: torch.Tensor | None, num_items: torch.Tensor | int | None) -> torch.Tensor | None:
    """This micro-batch's supervised tokens over ``num_items`` (Trainer's count over the accumulated
    batch, taken on ``labels[..., 1:]``), or None when Trainer gave no count."""
    if labels is None or num_items is None:
        return None
    return (labels[..., 1:] != -100).sum() / torch.as_tensor(num_items, device=labels.device).clamp_min(1)


def get_omoe_model(model: nn.Module, config: OMoEConfig | None = None) -> OMoEModel:
    """Freeze ``model`` and inject the adapters of ``config`` (default: the paper's OMoE).

    Works on a model built on the ``meta`` device, to count parameters without memory.
    """
    return OMoEModel(model, config or OMoEConfig())


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The raw ``adapter_config.json`` of a saved adapter (with version and base model name)."""
    return json.loads((Path(directory) / CONFIG_NAME).read_text())
