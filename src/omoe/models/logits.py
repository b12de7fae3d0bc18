"""Logits at chosen positions only: the LM head applied to just the hidden states a loss or score reads.

A causal LM's head turns each position's hidden state into ``vocab`` logits. A fine-tuning loss reads
only the response tokens, the ``label`` protocol only the last prompt position, yet a plain forward
returns all ``(B, T, vocab)`` logits: on SmolLM2 (vocab 49,152, hidden 576) the head is a fifth of
the forward's multiply-adds, and its fp32 output and backward are among a step's largest tensors.

:func:`selected_logits` runs the model's own forward unchanged and gathers the hidden states
``(B, T, H) -> (M, H)`` in a forward pre-hook on ``get_output_embeddings()``, so it works for any
Hugging Face causal LM that applies its head once to ``(B, T, H)``, through wrappers that call it
(``OMoEModel``, PEFT) and under FSDP (the hook changes an input, not a parameter). Transformers'
``logits_to_keep`` does the same only in recent 5.x releases (per-row positions as a 2-D mask). A
model without ``get_output_embeddings`` (e.g. a test stub) gets the full forward, then the gather.
Inside :func:`omoe.models.prefix.frozen_prefix` the frozen blocks below the lowest adapter come from
a cache.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from omoe.errors import OMoEError
from omoe.layers.kernels import frozen_linear
from omoe.models.prefix import active_cache


def last_block_mlp(model) -> torch.nn.Module | None:
    """The MLP of ``model``'s last decoder block (Hugging Face's ``get_decoder().layers[-1].mlp``
    layout: LLaMA, Mistral, Qwen, Gemma...), or None where the model is laid out otherwise."""
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    mlp = (
        getattr(layers[-1], "mlp", None) if isinstance(layers, torch.nn.ModuleList) and len(layers) else None
    )
    return mlp if isinstance(mlp, torch.nn.Module) else None


def _rows_only(forward, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An MLP's ``forward`` on the rows of ``x`` (``(B, T, H)``) where ``keep`` is True; zeros on the
    others, which only the LM head (seeing ``keep``'s rows alone) reads after the last block."""
    if x.shape[:2] != keep.shape:
        return forward(x)
    out = forward(x[keep])  # (M, H): the MLP is token-wise
    return out.new_zeros(*keep.shape, out.shape[-1]).index_put((keep,), out)  # (B, T, H)


@contextlib.contextmanager
def logits_only_at(model, keep: torch.Tensor):
    """Within the block, ``model``'s LM head sees only the positions where ``keep`` (``(B, T)`` bool)
    is True: the forward's ``logits`` are ``(M, vocab)``, in row-major order of ``keep``. Without
    gradients (evaluation), the last decoder block's MLP, whose output only the head reads, runs on
    those positions only too."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Module):
        raise OMoEError(f"{type(model).__name__} has no output embeddings (LM head) to compute logits with")

    def gather(module, args):
        hidden = args[0]  # (B, T, H)
        if hidden.shape[:2] != keep.shape:
            raise OMoEError(
                f"the LM head received hidden states of shape {tuple(hidden.shape)}, expected (B, T) = "
                f"{tuple(keep.shape)} before the hidden size; cannot select positions for this model"
            )
        return (hidden[keep], *args[1:])  # (M, H)

    handle = head.register_forward_pre_hook(gather)
    cast_once = type(head) is torch.nn.Linear and "forward" not in vars(head)
    if cast_once:  # a frozen head's bf16 weight made once, not at every call (layers/kernels.py)
        head.forward = partial(frozen_linear, head, plain=partial(torch.nn.Linear.forward, head))
    # Only without gradients: in training an MoE block's router statistics (its load-balancing loss)
    # would then cover the read positions alone.
    mlp = None if torch.is_grad_enabled() else last_block_mlp(model)
    mlp = mlp if mlp is not None and "forward" not in vars(mlp) else None
    if mlp is not None:
        mlp.forward = partial(_rows_only, mlp.forward, keep)
    try:
        yield
    finally:
        handle.remove()
        if cast_once:
            del head.forward
        if mlp is not None:
            del mlp.forward


def selected_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Logits at the True positions of ``keep``.

    Args:
        input_ids, attention_mask: ``(B, T)`` model inputs.
        keep: ``(B, T)`` bool, on the model's device: the positions whose logits are wanted.

    Returns:
        ``(M, vocab)`` with ``M = keep.sum()``, rows in the order of ``keep.nonzero()``.
    """
    if getattr(model, "get_output_embeddings", None) is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]  # (M, V)
    cache = active_cache(model)
    if cache is not None:  # blocks 0..depth-1 from the cache (omoe.models.prefix), the rest run here
        hidden = cache.hidden(input_ids, attention_mask)  # (B, T, H) entering block `depth`
        with cache.top_blocks(), logits_only_at(model, keep):
            return model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).logits
    with logits_only_at(model, keep):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
