"""Hugging Face ``Trainer`` and TRL ``SFTTrainer`` glue for an :class:`~omoe.OMoEModel`.

An ``OMoEModel`` trains under a plain ``transformers.Trainer`` as it is (its forward names its inputs,
as PEFT's wrapper does, and adds the router's aux loss). What Trainer cannot know is how to save and
reload it: it writes every weight of a model it does not recognise. The classes here change only that:

    from omoe.integrations.hf import OMoETrainer        # or OMoESFTTrainer, or omoe_trainer(AnyTrainer)

    trainer = OMoETrainer(model=get_omoe_model(base, OMoEConfig()), args=TrainingArguments("out"), train_dataset=ds)
    trainer.train()                                  # out/checkpoint-N/: adapter_model.safetensors + adapter_config.json
    trainer.train(resume_from_checkpoint=True)       # continues from the newest checkpoint

Each checkpoint holds the adapter (``OMoEModel.from_pretrained(base, "out/checkpoint-N")`` loads it)
plus Trainer's own state for resuming (optimizer, scheduler, RNG, ``trainer_state.json``), never the
frozen base weights.

TRL's ``SFTTrainer`` computes the loss itself from a fused LM head that it patches onto the model's
forward; :class:`OMoESFTTrainer` moves that patch from the wrapper onto the wrapped causal LM (where
TRL puts it for a PEFT model) and adds the router's aux loss to TRL's loss.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import Trainer

from omoe.config import OMoEConfig
from omoe.errors import AdapterLoadError
from omoe.tuners.model import WEIGHTS_NAME, OMoEModel, aux_token_share, is_adapter_key

TRAINING_ARGS_NAME = "training_args.bin"  # Trainer's own name (transformers.trainer)
_WRAPPER_PREFIX = "base_model."  # OMoEModel.state_dict() keys start with it; adapter keys do not


def load_adapter_weights(model: OMoEModel, directory: str | os.PathLike) -> None:
    """Load the adapter saved in ``directory`` into ``model`` in place (a checkpoint of the same run).

    The saved config must equal the model's: a checkpoint of another adapter is refused with the keys
    that differ.
    """
    directory = Path(directory)
    saved = OMoEConfig.from_pretrained(directory).to_dict()
    own = model.omoe_config.to_dict()
    differ = sorted(k for k in own if saved.get(k) != own[k])
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k)!r}, the model has {own[k]!r})" for k in differ)
        raise AdapterLoadError(f"the adapter in {directory} is another configuration: {shown}")
    weights = directory / WEIGHTS_NAME
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(f"{weights} is not a readable safetensors file: {err}") from None
    model.load_adapter_state_dict(state, source=str(weights))


class OMoETrainerMixin:
    """Adapter-only checkpoints and resume for a ``transformers.Trainer`` (sub)class training an
    ``OMoEModel``; anything else is left to the Trainer class it is mixed into."""

    def _omoe_model(self) -> OMoEModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, OMoEModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._omoe_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        adapter = None
        if state_dict is not None:  # gathered by Trainer (FSDP, DeepSpeed): the wrapper's keys
            adapter = {k.removeprefix(_WRAPPER_PREFIX): v for k, v in state_dict.items() if is_adapter_key(k)}
        model.save_pretrained(output_dir, state_dict=adapter)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer does
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self._omoe_model() if model is None or model is self.model else None
        if target is None or not (Path(resume_from_checkpoint) / WEIGHTS_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        target = self._omoe_model()
        best = self.state.best_model_checkpoint
        if target is None or best is None or not (Path(best) / WEIGHTS_NAME).is_file():
            return super()._load_best_model()
        load_adapter_weights(target, best)
        return None


class _SFTMixin(OMoETrainerMixin):
    """TRL ``SFTTrainer`` specifics: its fused LM head on the wrapped model, and the router aux loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._omoe_model()
        self._omoe_fused_loss = model is not None and "forward" in vars(model)
        if self._omoe_fused_loss:
            # SFTTrainer replaced the wrapper's forward by its fused-LM-head forward, which runs
            # ``self.base_model`` as the backbone; for OMoEModel that is the whole causal LM. Put the
            # patch where TRL puts it for a PEFT model: on the wrapped causal LM, below our forward.
            from trl.trainer.utils import add_fused_lm_head

            del model.forward
            add_fused_lm_head(model.base_model, outputs=("log_probs", "entropy", "is_top1"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        wrapped = self._omoe_model()
        if (
            not self._omoe_fused_loss
            or not wrapped.omoe_config.is_moe
            or wrapped.omoe_config.router_aux_loss_coef == 0
        ):
            return result  # without TRL's fused head the loss is the model's own, aux term included
        # TRL's loss is its own NLL from the fused head: it ignores the model's ``loss``, so add the aux
        # term here, weighted as OMoEModel.forward weights it (share of the accumulated batch's tokens).
        share = aux_token_share(labels, num_items_in_batch)
        aux = wrapped.aux_loss()
        term = wrapped.omoe_config.router_aux_loss_coef * (aux if share is None else aux * share)
        if return_outputs:
            loss, outputs = result
            return loss + term, outputs
        return result + term


@functools.cache
def omoe_trainer(trainer_class: type) -> type:
    """``trainer_class`` (``transformers.Trainer`` or a subclass) with adapter-only checkpoints and
    resume for an ``OMoEModel``; TRL's ``SFTTrainer`` (and its subclasses) also get the SFT glue."""
    mixin = OMoETrainerMixin
    if any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl.") for c in trainer_class.__mro__):
        mixin = _SFTMixin
    return type(f"OMoE{trainer_class.__name__}", (mixin, trainer_class), {"__doc__": trainer_class.__doc__})


OMoETrainer = omoe_trainer(Trainer)


def __getattr__(name: str):
    if name == "OMoESFTTrainer":  # TRL is optional: imported on first use
        from trl import SFTTrainer

        return omoe_trainer(SFTTrainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OMoETrainer", "OMoETrainerMixin", "load_adapter_weights", "omoe_trainer"]
