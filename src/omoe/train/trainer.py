"""The training loop: ``train(TrainConfig) -> TrainResult``.

One optimizer step sees one global batch (``optim.global_batch_size`` examples over all processes).
Its loss is the mean token cross-entropy over the whole global batch: each micro-batch's summed
token loss is divided by the global batch's token count, known in advance on every process, so
the gradient does not depend on how the batch is split into micro-batches or processes. With
``router_aux_loss_coef`` > 0 the mean over micro-batches of the router's load-balancing loss, times
the coefficient, is added (the ``aux_loss`` column logs that mean whatever the coefficient).

Logits are computed only at the supervised positions (:func:`token_loss_sum`), never as the full
``(B, T, vocab)`` tensor: for a short response after a long prompt that is most of the LM head's
cost saved, in forward and backward.

Dropout masks are drawn after seeding torch with ``(seed, step, micro-batch number)``, so they do
not depend on the number of processes or on where a run was resumed.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from omoe.data.tokenize import IGNORE_INDEX
from omoe.errors import ConfigError, NonFiniteError
from omoe.models.logits import selected_logits
from omoe.models.precision import autocast_dtype, precision_name
from omoe.models.prefix import frozen_prefix
from omoe.train import checkpoint as ckpt
from omoe.train import distributed, fsdp
from omoe.train.config import ORTHOGONAL_FSDP, RESULT_FREE_KEYS, TrainConfig
from omoe.train.data import TrainData, build_train_data, load_training_records
from omoe.train.metrics import MetricsLogger
from omoe.utils import atomic_write_text, json_text

CONFIG_FILE = "train_config.yaml"
RESULTS_FILE = "train_results.json"


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (eval mode) and a summary of the run."""

    model: torch.nn.Module
    output_dir: Path
    steps: int
    num_examples: int
    num_truncated: int
    history: list[dict] = field(default_factory=list)  # one row per step run by this call

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Linear warmup reaches the peak at step ``warmup - 1`` (the first step already moves), then
    ``linear``/``cosine`` decay towards 0 at step ``total``; ``constant`` stays at the peak.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def token_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Summed next-token cross-entropy (float32 scalar) over the positions whose label is not -100.

    Args:
        input_ids, attention_mask, labels: ``(B, T)``; ``labels[b, t]`` is the target of position
            ``t - 1`` (Hugging Face's convention), -100 where nothing is learned.

    The LM head runs on those positions only: the result equals the cross-entropy of the full
    ``(B, T, vocab)`` logits up to float rounding (see the tests).
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): logits at t predict token t+1
    keep = targets != IGNORE_INDEX  # (B, T)
    logits = selected_logits(model, input_ids, attention_mask, keep)  # (M, V), M = keep.sum()
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def train(
    config: TrainConfig,
    *,
    model=None,
    tokenizer=None,
    resume: bool = False,
    records: list[dict] | None = None,
) -> TrainResult:
    """Train an adapter as ``config`` says; write it, its config and metrics into ``output_dir``.

    Args:
        model, tokenizer: an in-memory base model (a Hugging Face causal LM, not yet wrapped) and its
            tokenizer, instead of loading ``config.model``; the adapter is injected into ``model``.
        resume: continue from the newest checkpoint in ``output_dir/checkpoints``.
        records: training records instead of those ``config.data`` names.

    Under ``torchrun``/``accelerate launch`` every process calls this; only rank 0 writes files.
    """
    info = distributed.setup(config.device)
    try:
        return _train(config, info, model, tokenizer, resume, records)
    finally:
        distributed.teardown(info)


def _train(config: TrainConfig, info: distributed.DistInfo, model, tokenizer, resume, records) -> TrainResult:
    out = Path(config.output_dir)
    device = info.device
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # SiLU tails produce denormals; flushing them is 3-4x faster
    amp_dtype = autocast_dtype(config.precision, device)
    accum = config.optim.accumulation_steps(info.world_size)
    if (model is None) != (tokenizer is None):
        raise ConfigError("pass both model and tokenizer, or neither (then config.model is loaded)")
    if config.optim.optimizer == "orthogonal" and fsdp.requested(config.fsdp) and info.enabled:
        raise ConfigError(ORTHOGONAL_FSDP)  # fsdp: true is refused by the config; accelerate's env only here

    resume_from = _check_output_dir(out, resume)
    say = _printer(info)
    if records is None:
        records = load_training_records(config.data, config.seed)  # bad data fails before the model loads
    if model is None:
        from omoe.models import load_model

        model, tokenizer = load_model(config.model, device=device, quantization=config.quantization)
    elif config.quantization != "none":
        raise ConfigError(
            "quantization applies to the model train() loads; pass it unquantized or quantize it yourself"
        )
    model.to(device)

    data = build_train_data(
        tokenizer,
        records,
        config.data,
        config.optim.global_batch_size,
        config.optim.micro_batch_size,
        config.seed,
    )
    total_steps = config.optim.max_steps or config.optim.epochs * data.steps_per_epoch
    warmup = config.optim.warmup_for(total_steps)
    say(
        f"{len(data.examples):,d} training examples, {data.num_truncated:,d} truncated at cutoff_len "
        f"{config.data.cutoff_len}; {total_steps:,d} optimizer steps ({data.steps_per_epoch:,d} per epoch) of "
        f"{config.optim.global_batch_size} = {info.world_size} process(es) x {accum} micro-batch(es) x "
        f"{config.optim.micro_batch_size}; warmup {warmup}, {config.optim.schedule} schedule"
    )

    from omoe.tuners.model import OMoEModel, get_omoe_model

    if isinstance(model, OMoEModel):
        raise ConfigError("pass the base model; train() injects the adapter of config.adapter itself")
    torch.manual_seed(config.seed)
    model = get_omoe_model(model, config.adapter)
    model.to(device)
    model.train()
    if config.gradient_checkpointing:
        _enable_checkpointing(model.base_model)
    state, saved = None, None
    if resume_from is not None:  # adapter weights go in before any sharding
        resume_from, state, saved = ckpt.load_latest_checkpoint(out, model, say)  # skips a damaged one
        _check_resumable(saved, config, resume_from)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    distributed.broadcast_parameters([p for _, p in named], info)
    sharded = fsdp.requested(config.fsdp) and info.enabled
    if sharded:
        wrapped = fsdp.shard(model.base_model, info)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # now DTensors
        say(f"FSDP: sharded {', '.join(wrapped) or 'the model'} over {info.world_size} processes")
    names, params = [n for n, _ in named], [p for _, p in named]
    trainable = sum(p.numel() for p in params)
    say(
        f"method {config.adapter.method}: {trainable:,d} trainable parameters; device {device}, "
        f"precision {precision_name(amp_dtype)} ({config.precision})"
    )

    o = config.optim
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay
    )
    if o.optimizer == "orthogonal":
        from omoe.optim import OrthogonalExpertOptimizer

        optimizer = OrthogonalExpertOptimizer(model, optimizer, o.orthogonal)
        say(optimizer.describe())

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total_steps, o.schedule)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_step, elapsed0, tokens_seen = 0, 0.0, 0
    if resume_from is not None:
        ckpt.load_optimizer_state(optimizer, params, names, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        start_step, elapsed0, tokens_seen = saved["step"], saved["elapsed_s"], saved["tokens"]
        say(f"resuming from {resume_from} (step {start_step} of {total_steps})")

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(out)
        atomic_write_text(
            out / CONFIG_FILE, config.to_yaml(header=f"Resolved config of this run (omoe {_version()}).")
        )
    logger = MetricsLogger(out, start_step, config.logging.tensorboard) if info.is_main else None
    bar = tqdm(
        total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
        disable=not (info.is_main and config.logging.progress),
    )  # fmt: skip

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype))
        if amp_dtype is not None
        else contextlib.nullcontext
    )
    coef = config.adapter.router_aux_loss_coef
    history: list[dict] = []
    clock = time.perf_counter()
    cleanup = contextlib.ExitStack()
    if config.prefix_cache:  # the frozen blocks below the lowest adapter: once per sequence, not per epoch
        cleanup.enter_context(frozen_prefix(model, getattr(model, "frozen_depth", 0)))
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            lm_sum, aux_sum = _accumulate(
                model,
                data,
                step,
                info,
                pad_id,
                autocast,
                coef,
                scaler,
                config.seed,
                config.adapter.is_moe,
                sharded,
            )
            if not sharded:  # FSDP reduce-scatters the gradients in backward
                distributed.all_reduce_gradients(params, info)
            scaler.unscale_(optimizer)
            grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm or float("inf")))
            lm_sum, aux_sum = distributed.all_reduce_sum([lm_sum, aux_sum], info, device)
            loss = lm_sum / max(1, data.batch_loss_tokens(step))
            problem = non_finite_step(loss, float(grad_norm), scaler.is_enabled())
            if problem is not None:  # before the update: the model still holds the last good state
                kept = _keep_last_good(out, step, history, model, names, optimizer, scheduler, scaler, data,
                                       config, info, sharded)  # fmt: skip
                raise NonFiniteError(
                    f"{problem} at step {step + 1}; {kept} (lower optim.lr, or train in fp32)"
                )
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_tokens = data.batch_tokens(step)
            tokens_seen += step_tokens
            seconds = time.perf_counter() - t0
            row = {
                "step": step + 1,
                "epoch": round((step + 1) / data.steps_per_epoch, 4),
                "loss": loss,
                "aux_loss": aux_sum / data.num_micro_batches(step) if config.adapter.is_moe else None,
                "lr": lr,
                "grad_norm": float(grad_norm) if math.isfinite(grad_norm) else None,  # None: fp16 skip
                "tokens": tokens_seen,
                "tokens_per_s": step_tokens / seconds,
                "elapsed_s": round(elapsed0 + time.perf_counter() - clock, 3),
            }
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if logger is not None and ((step + 1) % config.logging.log_every == 0 or step + 1 == total_steps):
                logger.log(row)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                _save(
                    out,
                    step + 1,
                    model,
                    names,
                    optimizer,
                    scheduler,
                    scaler,
                    data,
                    config,
                    info,
                    row,
                    sharded,
                )
                distributed.barrier(info)
    finally:
        cleanup.close()
        bar.close()
        if logger is not None:
            logger.close()
        if hasattr(optimizer, "remove_hooks"):
            optimizer.remove_hooks()

    model.eval()
    adapter = ckpt.adapter_tensors(model) if sharded else None  # collective under FSDP
    if info.is_main:
        model.save_pretrained(out, state_dict=adapter)
        summary = {
            "steps": total_steps,
            "epochs": round(total_steps / data.steps_per_epoch, 4),
            "num_examples": len(data.examples),
            "num_truncated": data.num_truncated,
            "cutoff_len": config.data.cutoff_len,
            "world_size": info.world_size,
            "precision": precision_name(amp_dtype),
            "trainable_parameters": trainable,
            "final_loss": history[-1]["loss"] if history else None,
            "elapsed_s": round(elapsed0 + time.perf_counter() - clock, 3),
            "tokens": tokens_seen,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        atomic_write_text(out / RESULTS_FILE, json_text(summary, indent=2) + "\n")
        say(f"wrote the adapter, {CONFIG_FILE}, metrics.jsonl/.csv and {RESULTS_FILE} to {out}")
    distributed.barrier(info)
    return TrainResult(model, out, total_steps, len(data.examples), data.num_truncated, history)


def non_finite_step(loss: float, grad_norm: float, grad_scaling: bool) -> str | None:
    """What makes an optimizer step unusable, or None. Under fp16 grad scaling an infinite or NaN
    gradient norm is the scaler's overflow signal: it skips that step and lowers its scale, so it
    is not an error; a non-finite loss always is."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm) and not grad_scaling:
        return f"the gradient norm is {grad_norm} (the loss was {loss:.4f})"
    return None


def _keep_last_good(
    out, step, history, model, names, optimizer, scheduler, scaler, data, config, info, sharded
):
    """After a non-finite step ``step + 1`` and before its update: make sure a checkpoint of the last
    good step exists (write it now if the schedule did not), and say where it is."""
    latest = ckpt.latest_checkpoint(out)
    if history and (latest is None or latest.name != f"step-{step:08d}"):
        _save(out, step, model, names, optimizer, scheduler, scaler, data, config, info, history[-1], sharded)
        distributed.barrier(info)
        latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return "no step before it finished, so no checkpoint was kept"
    return f"the last good state is checkpoint {latest}"


def _accumulate(model, data: TrainData, step, info, pad_id, autocast, coef, scaler, seed, is_moe, sharded):
    """Forward/backward this process's micro-batches of ``step``; return (summed token loss, summed aux)."""
    device = info.device
    n_tokens = max(1, data.batch_loss_tokens(step))
    n_micro = data.num_micro_batches(step)
    lm_total = torch.zeros((), dtype=torch.float64, device=device)
    aux_total = torch.zeros((), dtype=torch.float64, device=device)
    mine = [(m, indices, 1.0) for m, indices in data.micro_batches(step, info.rank, info.world_size)]
    # FSDP gathers weights collectively in every forward: all processes must run as many micro-batches.
    # FSDP also averages gradients over processes; our loss is a global-batch sum, so scale it back.
    scale = float(info.world_size) if sharded else 1.0
    if sharded:
        first = data.micro_batches(step, 0, 1)[0]
        mine += [(first[0], first[1], 0.0)] * (math.ceil(n_micro / info.world_size) - len(mine))
    for m, indices, weight in mine:
        torch.manual_seed(_micro_seed(seed, step, m))
        batch = {k: v.to(device) for k, v in data.collate(indices, pad_id).items()}
        with autocast():
            lm = token_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = lm / n_tokens
        if is_moe:
            aux = model.aux_loss()
            aux_total += weight * aux.detach().double()
            if coef > 0:
                loss = loss + coef * aux / n_micro
        scaler.scale(loss * (weight * scale)).backward()
        lm_total += weight * lm.detach().double()
    return lm_total.item(), aux_total.item()


def _enable_checkpointing(base) -> None:
    """Recompute each block in backward (non-reentrant: no need for inputs that require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing")
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


def _micro_seed(seed: int, step: int, micro: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro) % (2**63)


def _save(out, step, model, names, optimizer, scheduler, scaler, data, config, info, row, sharded) -> None:
    """Write checkpoint ``step`` (gathering on every process under FSDP, writing on rank 0)."""
    adapter = ckpt.adapter_tensors(model) if sharded else None
    optim_state = ckpt.optimizer_state(optimizer, names)
    if not info.is_main:
        return
    epoch, index = data.position(step)
    state = {
        "optimizer": optim_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": ckpt.rng_state(),
    }
    meta = {
        "step": step,
        "epoch": epoch,
        "index": index,
        "elapsed_s": row["elapsed_s"],
        "tokens": row["tokens"],
        "loss": row["loss"],
        "world_size": info.world_size,
        "fsdp": sharded,
        "omoe_version": _version(),
        "config": config.to_dict(),
    }
    ckpt.save_checkpoint(out, step, model, state, meta, keep=config.keep_checkpoints, adapter=adapter)


def _check_output_dir(out: Path, resume: bool) -> Path | None:
    latest = ckpt.latest_checkpoint(out)
    if resume:
        if latest is None:
            raise ConfigError(
                f"--resume: no checkpoint in {out / ckpt.CHECKPOINTS} (checkpoints are written every "
                "checkpoint_every steps; 0 writes none)"
            )
        return latest
    from omoe.tuners.model import WEIGHTS_NAME

    if latest is not None or (out / WEIGHTS_NAME).exists():
        raise ConfigError(
            f"output_dir {out} already holds a training run; pass --resume to continue it, "
            "or choose another output_dir"
        )
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    old, new = _flatten(saved["config"]), _flatten(config.to_dict())
    differ = [
        k for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith(RESULT_FREE_KEYS)
    ]  # fmt: skip
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differ)
        raise ConfigError(
            f"cannot resume {path}: the config differs in {shown}; a resume continues the same run "
            "(start a new output_dir to change them)"
        )


def _printer(info: distributed.DistInfo):
    def say(message: str) -> None:
        if info.is_main:
            tqdm.write(f"omoe train: {message}", file=sys.stderr)

    return say


def _version() -> str:
    from omoe import __version__

    return __version__
