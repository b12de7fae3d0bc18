"""omoe generate on the tiny random LLaMA: streamed and batched answers equal the model's own generate."""

import json

import pytest
import torch

from omoe import OMoEConfig, OMoEModel, get_omoe_model
from omoe.cli.main import main
from omoe.data.prompts import build_prompt
from omoe.models.testing import tiny_llama

PROMPTS = [
    "What is the capital of France?",
    "Name a colour.",
    "Is ice cold? Answer in one word, please, now.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A non-trivial OMoE adapter (B moved off zero) for tiny_llama(0), with the train_config.yaml
    that names its base model as omoe train writes it."""
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_omoe_model(tiny_llama(0), OMoEConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path)
    return path


def _reference(tiny_model_dir, adapter, prompt, tokenizer, max_new_tokens=6):
    model = OMoEModel.from_pretrained(tiny_llama(0), adapter)
    ids = torch.tensor(
        [tokenizer(build_prompt({"instruction": prompt, "input": ""}, with_output=False)).input_ids]
    )
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_one_prompt_streams_the_greedy_answer(tiny_model_dir, adapter, smollm2_tokenizer, capsys):
    args = ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", PROMPTS[0],
            "--max-new-tokens", "6"]  # fmt: skip
    assert main(args) == 0
    want = _reference(tiny_model_dir, adapter, PROMPTS[0], smollm2_tokenizer)
    assert want.strip()  # the random model does produce text
    assert capsys.readouterr().out == want + "\n"


def test_a_file_is_answered_in_batches_as_one_at_a_time(
    tiny_model_dir, adapter, smollm2_tokenizer, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    output = tmp_path / "answers.jsonl"
    args = ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--file", str(prompts),
            "--batch-size", "2", "--max-new-tokens", "6", "--output", str(output)]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    want = [_reference(tiny_model_dir, adapter, p, smollm2_tokenizer) for p in PROMPTS]
    assert [r["answer"] for r in rows] == want
    printed = capsys.readouterr().out
    for number, (prompt, answer) in enumerate(zip(PROMPTS, want), 1):
        assert f"[{number}] {prompt}\n{answer.strip()}\n" in printed


def test_base_model_comes_from_train_config_yaml(tiny_model_dir, adapter, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(adapter, copy)
    (copy / "train_config.yaml").write_text(f"model: {tiny_model_dir}\n")
    assert main(["generate", "--adapter", str(copy), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "no prompt: give --prompt"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
        (["--file", "missing.txt"], "--file missing.txt does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, adapter, capsys, extra, message):
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_without_model_or_train_config_the_error_says_pass_model(adapter, capsys):
    assert main(["generate", "--adapter", str(adapter), "--prompt", "x"]) == 2
    assert "pass --model" in capsys.readouterr().err
