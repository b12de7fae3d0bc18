"""PEFT's adapter layout for single LoRA / DoRA adapters, both ways, without importing PEFT.

PEFT writes ``adapter_config.json`` (a ``LoraConfig``, ``peft_type: "LORA"``) and
``adapter_model.safetensors`` with, per adapted linear ``M`` of the causal LM,
``base_model.model.M.lora_A.weight`` ``(r, in)``, ``base_model.model.M.lora_B.weight`` ``(out, r)``
and, for DoRA, ``base_model.model.M.lora_magnitude_vector`` ``(out,)`` (the magnitude itself). Ours
are ``M.omoe_lora.lora_A`` ``(1, r, in)``, ``M.omoe_lora.lora_B`` ``(1, out, r)`` and
``M.omoe_lora.lora_magnitude`` ``(1, out)``: the same numbers with an expert axis of length 1, and
the same scaling ``alpha / r`` (PEFT's without rsLoRA).

Mixtures (methods ``moe`` / ``omoe``) have no PEFT form: PEFT has no mixture of LoRA experts, and a
third party cannot add one (``peft.register_peft_method`` accepts only a name already in PEFT's
``PeftType`` enum).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from omoe.config import CONFIG_NAME, OMoEConfig
from omoe.errors import AdapterLoadError, ConfigError
from omoe.tuners.injection import block_index
from omoe.utils import json_text

FORMATS = ("omoe", "peft")
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name too
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the causal LM
# ours (after the adapted module's name) -> PEFT's
_TENSORS = {"omoe_lora.lora_A": "lora_A.weight", "omoe_lora.lora_B": "lora_B.weight",
            "omoe_lora.lora_magnitude": "lora_magnitude_vector"}  # fmt: skip
# LoraConfig fields whose non-default value changes what the adapter computes; we refuse those.
_UNSUPPORTED = {
    "bias": "none",
    "use_rslora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "exclude_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


def is_peft_adapter(directory: str | os.PathLike) -> bool:
    """Whether ``directory``'s ``adapter_config.json`` was written in PEFT's format."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "peft_type" in data


def check_peft_method(config: OMoEConfig) -> None:
    if config.is_moe:
        raise ConfigError(
            f"format 'peft' holds single LoRA/DoRA adapters only, not method {config.method!r}: PEFT has no "
            "mixture of LoRA experts and a third party cannot register one (peft.register_peft_method accepts "
            "only names already in its PeftType enum); save it with format='omoe'"
        )


def peft_config(config: OMoEConfig, adapter_keys, base_model_name_or_path: str | None) -> dict:
    """``LoraConfig`` fields (as PEFT's ``adapter_config.json``) equal to a lora/dora ``config`` whose
    adapter tensors are named ``adapter_keys``."""
    check_peft_method(config)
    layers = None
    if config.layers != "all":  # the blocks that were adapted, as PEFT's layers_to_transform
        layers = sorted({block_index(k.rpartition(".omoe_lora.")[0]) for k in adapter_keys})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.targets),
        "layers_to_transform": layers,
        "use_dora": config.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def to_peft_state_dict(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter tensors (keys inside the causal LM) under PEFT's names and shapes."""
    out = {}
    for key, value in adapter.items():
        module, _, leaf = key.rpartition(".omoe_lora.")
        out[f"{PEFT_PREFIX}{module}.{_TENSORS['omoe_lora.' + leaf]}"] = value[0]  # drop the expert axis
    return out


def write_peft(
    tmp: str | os.PathLike, config: OMoEConfig, adapter: dict[str, torch.Tensor], base_name
) -> None:
    """Write PEFT's two files into ``tmp`` (the caller moves them into place)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_peft_state_dict(adapter).items()}
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    text = json_text(peft_config(config, adapter, base_name), indent=2) + "\n"
    Path(tmp, CONFIG_NAME).write_text(text)


def read_peft(directory: str | os.PathLike) -> tuple[OMoEConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA/DoRA adapter as our config and our adapter tensors."""
    return omoe_config_from_peft(directory), load_peft_state_dict(directory)


def omoe_config_from_peft(directory: str | os.PathLike) -> OMoEConfig:
    """The lora/dora ``OMoEConfig`` equal to a PEFT LoRA/DoRA adapter's ``adapter_config.json``."""
    path = Path(directory) / CONFIG_NAME
    data = json.loads(path.read_text())
    if data.get("peft_type") != "LORA":
        raise AdapterLoadError(
            f"{path}: PEFT adapter type {data.get('peft_type')!r} is not loadable; omoe loads PEFT's LORA "
            "adapters (LoRA and DoRA)"
        )
    for key, default in _UNSUPPORTED.items():
        if data.get(key, default) not in (default, None, {}, [], False):
            raise AdapterLoadError(
                f"{path}: {key}={data[key]!r} is not supported; omoe loads plain LoRA/DoRA adapters "
                f"({key} must be {default!r})"
            )
    targets = data.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise AdapterLoadError(
            f"{path}: target_modules={targets!r}; omoe loads adapters whose target_modules is a list of "
            "module names (not a regular expression or 'all-linear')"
        )
    layers = data.get("layers_to_transform")
    return OMoEConfig(
        method="dora" if data.get("use_dora") else "lora",
        r=int(data["r"]),
        alpha=float(data.get("lora_alpha", 8)),
        dropout=float(data.get("lora_dropout", 0.0)),
        target_modules=targets,
        layers="all" if layers is None else ([layers] if isinstance(layers, int) else list(layers)),
    )


def load_peft_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors under our names and shapes (keys inside the causal LM)."""
    weights = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(f"{weights} is not a readable safetensors file: {err}") from None
    ours = {v: k for k, v in _TENSORS.items()}
    out = {}
    for key, value in state.items():
        leaf = next((p for p in ours if key.endswith("." + p)), None)
        if not key.startswith(PEFT_PREFIX) or leaf is None:
            raise AdapterLoadError(
                f"{weights}: tensor {key!r} is not a PEFT LoRA/DoRA tensor "
                f"({PEFT_PREFIX}<module>.{{{', '.join(ours)}}})"
            )
        module = key[len(PEFT_PREFIX) : -len(leaf) - 1]
        out[f"{module}.{ours[leaf]}"] = value.unsqueeze(0)  # add the expert axis
    return out
