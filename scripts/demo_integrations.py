"""What docs/integrations.md shows, run for real: omoe adapters under Hugging Face Trainer, TRL's
SFTTrainer, PEFT interchange and quantized bases, on the bundled SmolLM2-135M-Instruct and BoolQ.

    python scripts/demo_integrations.py trainer|sft|peft|quantized [--out DIR] [--steps N]

Each section prints what it did and what it measured; docs/integrations/<section>.log is its output.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from omoe import OMoEConfig, OMoEModel, get_omoe_model
from omoe.data.loader import load_task
from omoe.data.prompts import build_prompt
from omoe.data.tokenize import tokenize_dataset
from omoe.models import load_model

MODEL = "smollm2-135m-instruct"


def _records(n: int) -> list[dict]:
    return load_task("boolq", split="train", limit=n)


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text).input_ids])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _args(out: Path, steps: int, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-4,
                save_steps=steps // 2, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def trainer(out: Path, steps: int) -> None:
    import datasets
    from transformers import DataCollatorForSeq2Seq

    from omoe.integrations.hf import OMoETrainer

    base, tok = load_model(MODEL)
    examples = tokenize_dataset(tok, _records(64), cutoff_len=128).examples
    rows = {k: [e[k].tolist() for e in examples] for k in ("input_ids", "attention_mask", "labels")}
    ds = datasets.Dataset.from_dict(rows)
    torch.manual_seed(0)
    model = get_omoe_model(base, OMoEConfig())  # the paper's OMoE
    model.print_trainable_parameters()
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    t0 = time.perf_counter()
    OMoETrainer(model=model, args=_args(out, steps), train_dataset=ds, data_collator=collator).train()
    print(f"trained {steps} steps in {time.perf_counter() - t0:.0f} s")
    for ckpt in sorted(out.glob("checkpoint-*")):
        sizes = ", ".join(
            f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(ckpt.iterdir()) if p.is_file()
        )
        print(f"{ckpt.name}: {sizes}")
    prompt = build_prompt({"instruction": _records(65)[-1]["instruction"], "input": ""}, with_output=False)
    loaded = OMoEModel.from_pretrained(load_model(MODEL)[0], out / f"checkpoint-{steps}")
    print("reloaded checkpoint logits equal the trained model's:",
          torch.equal(_logits(loaded, tok, prompt), _logits(model, tok, prompt)))  # fmt: skip
    resumed_model = get_omoe_model(load_model(MODEL)[0], OMoEConfig())
    resumed = OMoETrainer(model=resumed_model, args=_args(out.with_name(out.name + "-resumed"), steps),
                          train_dataset=ds, data_collator=collator)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{steps // 2}"))
    diff = max((a - b).abs().max().item() for a, b in
               zip(model.adapter_state_dict().values(), resumed_model.adapter_state_dict().values()))  # fmt: skip
    print(f"resumed from checkpoint-{steps // 2} to step {resumed.state.global_step}; "
          f"largest adapter difference to the uninterrupted run: {diff:.3g}")  # fmt: skip


def sft(out: Path, steps: int) -> None:
    import datasets
    from trl import SFTConfig

    from omoe.integrations.hf import OMoESFTTrainer

    base, tok = load_model(MODEL)
    records = _records(64)
    texts = [build_prompt(r, with_output=True) for r in records]
    torch.manual_seed(0)
    model = get_omoe_model(base, OMoEConfig(method="moe", num_experts=8, top_k=2, router_aux_loss_coef=0.01))
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-4,
                     save_steps=steps, logging_steps=1, report_to=[], use_cpu=True, seed=0, max_length=128,
                     disable_tqdm=True)  # fmt: skip
    trainer = OMoESFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"text": texts}))  # fmt: skip
    print(f"SFTConfig defaults kept: gradient_checkpointing={args.gradient_checkpointing}, bf16={args.bf16}")
    t0 = time.perf_counter()
    trainer.train()
    print(
        f"trained {steps} steps in {time.perf_counter() - t0:.0f} s (MixLoRA-style top-2 of 8, aux coef 0.01)"
    )
    for row in trainer.state.log_history:
        if "loss" in row:
            print(
                f"step {row['step']}: loss {row['loss']:.4f}, mean_token_accuracy {row['mean_token_accuracy']:.3f}"
            )
    print(f"checkpoint-{steps}:", sorted(p.name for p in (out / f"checkpoint-{steps}").iterdir()))


def peft(out: Path, steps: int) -> None:
    import peft as hf_peft

    tok = load_model(MODEL)[1]
    prompt = build_prompt(_records(1)[0], with_output=False)
    for method in ("lora", "dora"):
        torch.manual_seed(0)
        ours = get_omoe_model(load_model(MODEL)[0], OMoEConfig(method=method, r=8, alpha=16))
        with torch.no_grad():  # a trained-looking adapter: B off zero
            g = torch.Generator().manual_seed(1)
            for name, p in ours.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ours.save_pretrained(out / method, format="peft")
        theirs = hf_peft.PeftModel.from_pretrained(load_model(MODEL)[0], out / method)
        a, b = _logits(ours, tok, prompt), _logits(theirs, tok, prompt)
        print(f"{method}: omoe -> PEFT files {sorted(p.name for p in (out / method).iterdir())}; "
              f"PeftModel.from_pretrained logits max |diff| {(a - b).abs().max().item():.2e} (logits up to {a.abs().max().item():.1f})")  # fmt: skip
        back = OMoEModel.from_pretrained(load_model(MODEL)[0], out / method)
        print(f"{method}: PEFT dir -> OMoEModel.from_pretrained: method {back.omoe_config.method}, r {back.omoe_config.r}, "
              f"logits max |diff| to PEFT {(_logits(back, tok, prompt) - b).abs().max().item():.2e}")  # fmt: skip
    try:
        get_omoe_model(load_model(MODEL)[0], OMoEConfig()).save_pretrained(out / "omoe", format="peft")
    except Exception as err:  # the documented refusal
        print(f"omoe -> format='peft': {type(err).__name__}: {err}")


def quantized(out: Path, steps: int) -> None:
    from omoe.layers.quantized import quantization_of

    reference, tok = load_model(MODEL)
    records = _records(8)
    prompt = build_prompt(records[0], with_output=False)
    ref_logits = _logits(reference, tok, prompt)
    batch = tokenize_dataset(tok, records[:4], cutoff_len=96, train_on_inputs=True).examples
    from omoe.data.tokenize import collate

    inputs = collate(batch, tok.pad_token_id)
    for bits in ("8bit", "4bit"):
        base, _ = load_model(MODEL, quantization=bits)
        kinds = {quantization_of(m) for m in base.modules() if isinstance(m, torch.nn.Linear)}
        q_logits = _logits(base, tok, prompt)
        rel = ((q_logits - ref_logits).norm() / ref_logits.norm()).item()
        print(f"{bits}: linears {sorted(str(k) for k in kinds)}; base logits vs fp32: relative error {rel:.3f}, "
              f"same top-1 next token: {bool(q_logits[0, -1].argmax() == ref_logits[0, -1].argmax())}")  # fmt: skip
        torch.manual_seed(0)
        model = get_omoe_model(base, OMoEConfig())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        t0 = time.perf_counter()
        losses = []
        for _ in range(steps):
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(f"{bits}: OMoE, {steps} AdamW steps on 4 BoolQ records (lr 1e-3): loss "
              f"{' '.join(f'{x:.3f}' for x in losses)} ({(time.perf_counter() - t0) / steps:.1f} s/step)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("section", choices=("trainer", "sft", "peft", "quantized"))
    parser.add_argument("--out", help="working directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / args.section
        print(f"$ python scripts/demo_integrations.py {' '.join(sys.argv[1:])}")
        print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, model {MODEL}")
        globals()[args.section](out, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
