"""``omoe generate``: a fine-tuned model's answers to your own prompts, streamed as they are decoded.

Examples::

    omoe generate --adapter runs/omoe --prompt "Is the sky blue on a clear day?"
    omoe generate --adapter runs/omoe --file questions.txt --batch-size 8 --output answers.jsonl

One prompt streams its answer token by token. A file (one prompt per line, or a ``.jsonl`` of
records with ``instruction`` and optional ``input``) is answered in left-padded batches, each answer
printed as soon as its batch is done. The base model is ``--model``, else the ``model`` of the
``train_config.yaml`` that ``omoe train`` wrote beside the adapter. Prompts are wrapped in the
template the adapter was trained with (``--template``; the default Alpaca one of ``omoe train``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from omoe.data.prompts import build_prompt
from omoe.errors import ConfigError
from omoe.eval.batching import length_sorted_batches, model_device, pad
from omoe.models import load_model
from omoe.options import check_int
from omoe.tuners.model import OMoEModel
from omoe.utils import atomic_write_text, json_text

TEMPLATES = ("alpaca", "raw", "chat")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer prompts with a fine-tuned adapter, streaming the text",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--adapter", help="adapter directory (omoe train's output_dir, or a PEFT LoRA/DoRA one)"
    )
    parser.add_argument("--model", help="base model (default: the model of DIR/train_config.yaml)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--file", help="prompts: one per line (.txt), or records with 'instruction' (.jsonl)")
    parser.add_argument(
        "--template",
        choices=TEMPLATES,
        default="alpaca",
        help="alpaca = omoe train's default prompt template; raw = the text as is; chat = the tokenizer's "
        "chat template (default alpaca)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch for --file (default 8)")
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument(
        "--quantization",
        default="none",
        choices=("none", "8bit", "4bit"),
        help="load the base quantized (bitsandbytes)",
    )
    parser.add_argument("--output", help="also write {prompt, answer} records to this .jsonl file")
    parser.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[dict]:
    """Records with ``instruction`` (and ``input``) from ``--prompt`` and ``--file``."""
    records = [{"instruction": p, "input": ""} for p in args.prompt]
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"--file {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"--file {path} line {number} is not JSON: {err}") from None
                if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
                    raise ConfigError(f"--file {path} line {number} has no 'instruction' string")
                records.append(
                    {"instruction": record["instruction"], "input": str(record.get("input") or "")}
                )
        else:
            records += [{"instruction": line, "input": ""} for line in lines if line.strip()]
    if not records:
        raise ConfigError(
            "no prompt: give --prompt TEXT (repeatable) or --file FILE with at least one prompt"
        )
    return records


def base_model_of(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    config = Path(args.adapter) / "train_config.yaml"
    if config.is_file():
        model = (yaml.safe_load(config.read_text()) or {}).get("model")
        if isinstance(model, str) and model:
            return model
    raise ConfigError(
        f"cannot tell the base model of {args.adapter} (no train_config.yaml there); pass --model"
    )


def render(records: list[dict], template: str, tokenizer) -> list[str]:
    if template == "alpaca":
        return [build_prompt(r, with_output=False) for r in records]
    text = [r["instruction"] + (f"\n{r['input']}" if r["input"] else "") for r in records]
    if template == "raw":
        return text
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("--template chat: this tokenizer has no chat template; use alpaca or raw")
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        for t in text
    ]


def run(args: argparse.Namespace) -> int:
    if not args.adapter:
        raise ConfigError("--adapter DIR is required (an adapter directory written by omoe train)")
    if not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"adapter directory {args.adapter} does not exist")
    for key in ("max_new_tokens", "batch_size"):
        check_int(f"--{key.replace('_', '-')}", getattr(args, key), 1)
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    records = read_prompts(args)  # bad input fails before the model loads
    model_name = base_model_of(args)

    base, tokenizer = load_model(
        model_name, dtype=args.dtype, device=args.device, quantization=args.quantization
    )
    model = OMoEModel.from_pretrained(base, args.adapter)
    model.to(args.device)
    prompts = render(records, args.template, tokenizer)
    titles = [r["instruction"].strip().splitlines()[0][:200] for r in records]
    answers = generate(model, tokenizer, prompts, titles, args, out=sys.stdout)
    if args.output:
        rows = [
            {"prompt": r["instruction"], "input": r["input"], "answer": a} for r, a in zip(records, answers)
        ]
        atomic_write_text(args.output, "".join(json_text(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} answers to {args.output}", file=sys.stderr)
    return 0


def generate(
    model, tokenizer, prompts: list[str], titles: list[str], args: argparse.Namespace, out
) -> list[str]:
    """Answer each prompt; one prompt streams its tokens to ``out``, several are printed per batch
    (under ``[n] title``, n = the prompt's number)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = model_device(model)
    ids = tokenizer(prompts, add_special_tokens=args.template != "chat")["input_ids"]
    torch.manual_seed(args.seed)
    answers: list[str] = [""] * len(prompts)
    single = len(prompts) == 1
    for batch in length_sorted_batches([len(p) for p in ids], args.batch_size):
        input_ids, attention_mask = pad(
            [ids[i] for i in batch], tokenizer.pad_token_id, side="left"
        )  # (B, T)
        with torch.no_grad():
            sequences = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                streamer=_streamer(tokenizer, out) if single else None,
            )  # (B, T + new)
        for row, i in enumerate(batch):
            new = sequences[row, input_ids.shape[1] :].tolist()
            if tokenizer.eos_token_id in new:  # rows that stopped early are padded after their EOS
                new = new[: new.index(tokenizer.eos_token_id)]
            answers[i] = tokenizer.decode(new, skip_special_tokens=True)
        if not single:
            for i in sorted(batch):
                print(f"[{i + 1}] {titles[i]}\n{answers[i].strip()}\n", file=out, flush=True)
    return answers


def _streamer(tokenizer, out):
    """A ``transformers.TextStreamer`` writing to ``out``, the prompt and special tokens left out."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(text, end="\n" if stream_end else "", file=out, flush=True)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
