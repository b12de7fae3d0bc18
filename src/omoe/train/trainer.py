"""The training loop: ``train(TrainConfig) -> TrainResult``, run by a :class:`Trainer`.

The pieces of one optimizer step (the loss over the supervised positions, the lr schedule, the
dropout seeds) are in :mod:`omoe.train.loop`, with how a global batch's loss is normalised; what an
``output_dir`` may hold and what a resume may change, in :mod:`omoe.train.state`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omoe.errors import ConfigError, NonFiniteError
from omoe.models import load_model
from omoe.models.precision import autocast, autocast_dtype, precision_name
from omoe.models.prefix import frozen_prefix
from omoe.train import checkpoint as ckpt
from omoe.train import distributed, fsdp
from omoe.train.config import ORTHOGONAL_FSDP, TrainConfig
from omoe.train.data import TrainData, build_train_data, load_training_records
from omoe.train.loop import build_optimizer, micro_seed, non_finite_step, token_loss_sum
from omoe.train.metrics import MetricsLogger
from omoe.train.state import check_output_dir, check_resumable, restore_training_state, training_state
from omoe.tuners.model import OMoEModel, get_omoe_model
from omoe.utils import atomic_write_text, json_text
from omoe.version import __version__

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


def train(config: TrainConfig, *, model=None, tokenizer=None, resume: bool = False,
          records: list[dict] | None = None) -> TrainResult:  # fmt: skip
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
        trainer = Trainer(config, info, model=model, tokenizer=tokenizer, resume=resume, records=records)
        trainer.setup()
        return trainer.train()
    finally:
        distributed.teardown(info)


class Trainer:
    """One training run, in the shape of a torchtune recipe.

    ``Trainer(config, info, ...)`` checks the arguments; :meth:`setup` loads the data and the model,
    injects the adapter, builds the optimizer, restores a checkpoint when resuming and opens the
    output files; :meth:`train` runs :meth:`step` until the schedule ends, :meth:`save` every
    ``checkpoint_every`` steps, then :meth:`close` and :meth:`finish`. The run's state lives on
    ``self``; ``global_step`` counts the optimizer steps taken (it is the next step's 0-based index).
    The trainer does not evaluate: ``omoe eval`` scores the adapter it writes.
    """

    def __init__(self, config: TrainConfig, info: distributed.DistInfo, *, model=None, tokenizer=None,
                 resume: bool = False, records: list[dict] | None = None):  # fmt: skip
        self.config, self.info, self.device = config, info, info.device
        self.out = Path(config.output_dir)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # SiLU tails produce denormals; flushing them is 3-4x faster
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.accum = config.optim.accumulation_steps(info.world_size)
        if (model is None) != (tokenizer is None):
            raise ConfigError("pass both model and tokenizer, or neither (then config.model is loaded)")
        if config.optim.optimizer == "orthogonal" and fsdp.requested(config.fsdp) and info.enabled:
            raise ConfigError(ORTHOGONAL_FSDP)  # the config refuses fsdp: true; accelerate's env only here
        self.model, self.tokenizer, self.records, self.resume = model, tokenizer, records, resume
        self.global_step, self.elapsed0, self.tokens_seen = 0, 0.0, 0
        self.history: list[dict] = []  # one row per step run by this trainer
        self.resume_from: Path | None = None
        self.optimizer = self.logger = self.bar = None
        self._open = contextlib.ExitStack()  # what close() releases: the frozen-prefix cache

    def say(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(f"omoe train: {message}", file=sys.stderr)

    # ------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step, in the order that draws the random numbers."""
        self.resume_from = check_output_dir(self.out, self.resume)
        self._load_data_and_model()
        restored = self._inject_adapter()
        self._collect_parameters()
        self._build_optimizer()
        if restored is not None:
            self._restore(*restored)
        self._open_outputs()

    def _load_data_and_model(self) -> None:
        config, o = self.config, self.config.optim
        if self.records is None:  # bad data fails before the model loads
            self.records = load_training_records(config.data, config.seed)
        if self.model is None:
            self.model, self.tokenizer = load_model(
                config.model, device=self.device, quantization=config.quantization
            )
        elif config.quantization != "none":
            raise ConfigError(
                "quantization applies to the model train() loads; pass it unquantized or quantize it yourself"
            )
        self.model.to(self.device)
        data = build_train_data(
            self.tokenizer, self.records, config.data, o.global_batch_size, o.micro_batch_size, config.seed
        )
        self.data: TrainData = data
        self.total_steps = o.max_steps or o.epochs * data.steps_per_epoch
        warmup = o.warmup_for(self.total_steps)
        self.say(
            f"{len(data.examples):,d} training examples, {data.num_truncated:,d} truncated at cutoff_len "
            f"{config.data.cutoff_len}; {self.total_steps:,d} optimizer steps ({data.steps_per_epoch:,d} per "
            f"epoch) of {o.global_batch_size} = {self.info.world_size} process(es) x {self.accum} "
            f"micro-batch(es) x {o.micro_batch_size}; warmup {warmup}, {o.schedule} schedule"
        )

    def _inject_adapter(self) -> tuple[dict, dict] | None:
        """Wrap the base model in ``config.adapter``'s adapter (seeded); when resuming, load the
        newest readable checkpoint's weights into it and return its (state, metadata)."""
        if isinstance(self.model, OMoEModel):
            raise ConfigError("pass the base model; train() injects the adapter of config.adapter itself")
        torch.manual_seed(self.config.seed)
        self.model = get_omoe_model(self.model, self.config.adapter)
        self.model.to(self.device)
        self.model.train()
        if self.config.gradient_checkpointing:
            _enable_checkpointing(self.model.base_model)
        if self.resume_from is None:
            return None
        # before any sharding; a damaged newest checkpoint is skipped for the one before it
        self.resume_from, state, saved = ckpt.load_latest_checkpoint(self.out, self.model, self.say)
        check_resumable(saved, self.config, self.resume_from)
        return state, saved

    def _collect_parameters(self) -> None:
        """The trainable parameters, equal on every process (broadcast), sharded under FSDP."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        distributed.broadcast_parameters([p for _, p in named], self.info)
        self.sharded = fsdp.requested(self.config.fsdp) and self.info.enabled
        if self.sharded:
            wrapped = fsdp.shard(self.model.base_model, self.info)
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]  # now DTensors
            self.say(
                f"FSDP: sharded {', '.join(wrapped) or 'the model'} over {self.info.world_size} processes"
            )
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.trainable = sum(p.numel() for p in self.params)
        self.say(
            f"method {self.config.adapter.method}: {self.trainable:,d} trainable parameters; device "
            f"{self.device}, precision {precision_name(self.amp_dtype)} ({self.config.precision})"
        )

    def _build_optimizer(self) -> None:
        o = self.config.optim
        self.optimizer, self.scheduler = build_optimizer(self.model, self.params, o, self.total_steps)
        if o.optimizer == "orthogonal":
            self.say(self.optimizer.describe())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _restore(self, state: dict, saved: dict) -> None:
        """Put a checkpoint's optimizer, scheduler, grad-scaler and RNG states and counters back."""
        restore_training_state(state, self.optimizer, self.params, self.names, self.scheduler, self.scaler)
        self.global_step, self.elapsed0, self.tokens_seen = saved["step"], saved["elapsed_s"], saved["tokens"]
        self.say(f"resuming from {self.resume_from} (step {self.global_step} of {self.total_steps})")

    def _open_outputs(self) -> None:
        """Write the resolved config; open the metrics files (rank 0), the progress bar and the
        frozen-prefix cache; start the clock. :meth:`close` releases them."""
        config, info = self.config, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.out)
            header = f"Resolved config of this run (omoe {__version__})."
            atomic_write_text(self.out / CONFIG_FILE, config.to_yaml(header=header))
            self.logger = MetricsLogger(self.out, self.global_step, config.logging.tensorboard)
        self.bar = tqdm(
            total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True, file=sys.stderr,
            disable=not (info.is_main and config.logging.progress),
        )  # fmt: skip
        tokenizer = self.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.clock = time.perf_counter()
        if config.prefix_cache:  # the frozen blocks below the adapters: once per sequence, not per epoch
            self._open.enter_context(frozen_prefix(self.model, getattr(self.model, "frozen_depth", 0)))

    # ------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run the steps left (a checkpoint every ``checkpoint_every``), close, write the results."""
        try:
            while self.global_step < self.total_steps:
                self.step()
                every = self.config.checkpoint_every
                if every and self.global_step % every == 0:
                    self.save()
        finally:
            self.close()
        return self.finish()

    def step(self) -> dict:
        """Take optimizer step ``global_step`` on its global batch; log and return its metrics row.

        A non-finite loss (or gradient norm, without fp16 grad scaling) raises NonFiniteError before
        the update, once a checkpoint of the last good step exists.
        """
        step, t0 = self.global_step, time.perf_counter()
        lm_sum, aux_sum = _accumulate(self, step)
        if not self.sharded:  # FSDP reduce-scatters the gradients in backward
            distributed.all_reduce_gradients(self.params, self.info)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.optim.max_grad_norm or float("inf")
        grad_norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
        lm_sum, aux_sum = distributed.all_reduce_sum([lm_sum, aux_sum], self.info, self.device)
        loss = lm_sum / max(1, self.data.batch_loss_tokens(step))
        problem = non_finite_step(loss, grad_norm, self.scaler.is_enabled())
        if problem is not None:  # before the update: the model still holds the last good state
            kept = self._keep_last_good()
            raise NonFiniteError(f"{problem} at step {step + 1}; {kept} (lower optim.lr, or train in fp32)")
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step = step + 1
        row = self._row(step, loss, aux_sum, lr, grad_norm, t0)
        self._log(row)
        return row

    def _row(self, step: int, loss: float, aux_sum: float, lr: float, grad_norm: float, t0: float) -> dict:
        data = self.data
        step_tokens = data.batch_tokens(step)
        self.tokens_seen += step_tokens
        seconds = time.perf_counter() - t0
        return {
            "step": step + 1,
            "epoch": round((step + 1) / data.steps_per_epoch, 4),
            "loss": loss,
            "aux_loss": aux_sum / data.num_micro_batches(step) if self.config.adapter.is_moe else None,
            "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # None: fp16 skip
            "tokens": self.tokens_seen,
            "tokens_per_s": step_tokens / seconds,
            "elapsed_s": round(self.elapsed0 + time.perf_counter() - self.clock, 3),
        }

    def _log(self, row: dict) -> None:
        self.history.append(row)
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}"
        )
        due = row["step"] % self.config.logging.log_every == 0 or row["step"] == self.total_steps
        if self.logger is not None and due:
            self.logger.log(row)

    def _keep_last_good(self) -> str:
        """After a non-finite step and before its update: make sure a checkpoint of the last good
        step exists (write it now if the schedule did not), and say where it is."""
        latest = ckpt.latest_checkpoint(self.out)
        if self.history and (latest is None or latest.name != f"step-{self.global_step:08d}"):
            self.save()
            latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            return "no step before it finished, so no checkpoint was kept"
        return f"the last good state is checkpoint {latest}"

    # ------------------------------------------------------------------------ saving
    def save(self) -> None:
        """Write checkpoint ``global_step`` with the last step's counters (under FSDP every process
        gathers, rank 0 writes), then wait for every process. Needs a step taken by this trainer."""
        step, row = self.global_step, self.history[-1]
        adapter = ckpt.adapter_tensors(self.model) if self.sharded else None
        state = training_state(self.optimizer, self.names, self.scheduler, self.scaler)
        if self.info.is_main:
            epoch, index = self.data.position(step)
            meta = {
                "step": step, "epoch": epoch, "index": index, "elapsed_s": row["elapsed_s"],
                "tokens": row["tokens"], "loss": row["loss"], "world_size": self.info.world_size,
                "fsdp": self.sharded, "omoe_version": __version__, "config": self.config.to_dict(),
            }  # fmt: skip
            keep = self.config.keep_checkpoints
            ckpt.save_checkpoint(self.out, step, self.model, state, meta, keep=keep, adapter=adapter)
        distributed.barrier(self.info)

    def close(self) -> None:
        """Release what :meth:`setup` opened: the prefix cache, the progress bar, the metrics files
        and the orthogonal optimizer's hooks."""
        self._open.close()
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if hasattr(self.optimizer, "remove_hooks"):
            self.optimizer.remove_hooks()

    def finish(self) -> TrainResult:
        """Write the adapter and ``train_results.json`` (rank 0); return the model in eval mode."""
        self.model.eval()
        adapter = ckpt.adapter_tensors(self.model) if self.sharded else None  # collective under FSDP
        if self.info.is_main:
            self.model.save_pretrained(self.out, state_dict=adapter)
            atomic_write_text(self.out / RESULTS_FILE, json_text(self._summary(), indent=2) + "\n")
            self.say(f"wrote the adapter, {CONFIG_FILE}, metrics.jsonl/.csv and {RESULTS_FILE} to {self.out}")
        distributed.barrier(self.info)
        examples, truncated = len(self.data.examples), self.data.num_truncated
        return TrainResult(self.model, self.out, self.total_steps, examples, truncated, self.history)

    def _summary(self) -> dict:
        data = self.data
        return {
            "steps": self.total_steps,
            "epochs": round(self.total_steps / data.steps_per_epoch, 4),
            "num_examples": len(data.examples),
            "num_truncated": data.num_truncated,
            "cutoff_len": self.config.data.cutoff_len,
            "world_size": self.info.world_size,
            "precision": precision_name(self.amp_dtype),
            "trainable_parameters": self.trainable,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "elapsed_s": round(self.elapsed0 + time.perf_counter() - self.clock, 3),
            "tokens": self.tokens_seen,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
        }


def _accumulate(trainer: Trainer, step: int) -> tuple[float, float]:
    """Forward/backward this process's micro-batches of ``step``; return (summed token loss, summed
    aux). A module function (not a method) so that the tests can interrupt it."""
    data, info, device = trainer.data, trainer.info, trainer.device
    coef = trainer.config.adapter.router_aux_loss_coef
    n_tokens = max(1, data.batch_loss_tokens(step))
    n_micro = data.num_micro_batches(step)
    lm_total = torch.zeros((), dtype=torch.float64, device=device)
    aux_total = torch.zeros((), dtype=torch.float64, device=device)
    mine = [(m, indices, 1.0) for m, indices in data.micro_batches(step, info.rank, info.world_size)]
    # FSDP gathers weights collectively in every forward: all processes must run as many micro-batches.
    # FSDP also averages gradients over processes; our loss is a global-batch sum, so scale it back.
    scale = float(info.world_size) if trainer.sharded else 1.0
    if trainer.sharded:
        first = data.micro_batches(step, 0, 1)[0]
        mine += [(first[0], first[1], 0.0)] * (math.ceil(n_micro / info.world_size) - len(mine))
    for m, indices, weight in mine:
        torch.manual_seed(micro_seed(trainer.config.seed, step, m))
        batch = {k: v.to(device) for k, v in data.collate(indices, trainer.pad_id).items()}
        with autocast(trainer.amp_dtype, device):
            lm = token_loss_sum(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = lm / n_tokens
        if trainer.config.adapter.is_moe:
            aux = trainer.model.aux_loss()
            aux_total += weight * aux.detach().double()
            if coef > 0:
                loss = loss + coef * aux / n_micro
        trainer.scaler.scale(loss * (weight * scale)).backward()
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
