"""The frozen blocks below the lowest adapter, run once per sequence and remembered.

When adapters sit only in the top blocks (``OMoEConfig(layers="22-29")``), blocks ``0..depth-1`` are
the frozen base model: their output for a token sequence never changes, whichever adapter, seed or
training step is asking. A study that trains several methods and seeds on the same records, and
scores the same test records before and after fine-tuning, recomputes those blocks every time. On
SmolLM2-135M with adapters on the top 8 of 30 blocks they are ~70% of a label-evaluation forward and
~45% of a training step.

:func:`frozen_prefix` makes :func:`omoe.models.logits.selected_logits` (the trainer's loss and the
``label`` / ``loglik`` protocols) take the hidden state entering block ``depth`` from a cache and run
only the blocks above it. The sequences a batch asks for and the cache lacks are computed together,
in one right-padded batch (one at a time was ~3x slower per sequence on CPU); a cached value then
never changes, but it carries the rounding of the batch that first asked for it, so a run resumed
in a new process (empty cache) matches an uninterrupted one up to float rounding, not bit for bit.
The cache is keyed by the decoder module, the depth, the autocast dtype and the tokens, checks the
frozen blocks' parameters (storage and version counter) before every use, and is bounded (least
recently used entries go first).

Supported: decoders that run ``embed_tokens -> layers -> norm`` with rotary position embeddings and a
plain causal mask (the LLaMA family as transformers implements ``LlamaModel``). Elsewhere
:func:`frozen_prefix` is a no-op.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict

import torch
from torch import nn

SUPPORTED_DECODERS = ("LlamaModel",)
DEFAULT_MAX_BYTES = 4 << 30

_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> {depth: PrefixCache}
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> PrefixCache in use


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The decoder stack (``LlamaModel``) inside a causal LM or a wrapper of one, if supported."""
    inner = getattr(model, "base_model", model)  # OMoEModel -> the causal LM
    get = getattr(inner, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or type(decoder).__name__ not in SUPPORTED_DECODERS:
        return None
    if float(getattr(decoder.config, "attention_dropout", 0.0) or 0.0) != 0.0:
        return None  # a stochastic prefix cannot be remembered
    return decoder


class PrefixCache:
    """Hidden states entering block ``depth``, one ``(T, H)`` tensor per token sequence."""

    def __init__(self, decoder: nn.Module, depth: int, max_bytes: int = DEFAULT_MAX_BYTES):
        self.decoder, self.depth, self.max_bytes = decoder, depth, max_bytes
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self._fingerprint = self._weights_fingerprint()

    def _weights_fingerprint(self) -> tuple:
        params = [*self.decoder.embed_tokens.parameters()]
        for block in self.decoder.layers[: self.depth]:
            params += block.parameters()
        return tuple((p.data_ptr(), p._version) for p in params)

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    @torch.no_grad()
    def _compute(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Blocks ``0..depth-1`` on a right-padded batch ``(M, T)`` -> ``(M, T, H)``."""
        from transformers.masking_utils import create_causal_mask

        d = self.decoder
        hidden = d.embed_tokens(ids)  # (M, T, H)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, T)
        causal = create_causal_mask(
            config=d.config, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=positions
        )
        rotary = d.rotary_emb(hidden, position_ids=positions)
        for block in d.layers[: self.depth]:
            hidden = block(hidden, attention_mask=causal, position_embeddings=rotary, position_ids=positions)
        return hidden

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` hidden states entering block ``depth`` for a right-padded batch (zeros at
        the pads, which no real token attends to). The sequences not yet cached are computed
        together, in one right-padded batch."""
        fingerprint = self._weights_fingerprint()
        if fingerprint != self._fingerprint:  # the frozen blocks changed (e.g. merged into): start over
            self.clear()
            self._fingerprint = fingerprint
        kind = input_ids.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        lengths = attention_mask.sum(1).tolist()
        keys = [(str(dtype), kind, *ids[:n].tolist()) for ids, n in zip(input_ids, lengths)]
        values = [self._store.get(key) for key in keys]
        missing = [b for b, v in enumerate(values) if v is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            width = max(lengths[b] for b in missing)
            with torch.inference_mode(False):  # normal tensors, usable by a later training step
                batch = self._compute(input_ids[missing, :width].clone(), attention_mask[missing, :width].clone())
                for row, b in enumerate(missing):
                    values[b] = batch[row, : lengths[b]].clone()  # (n, H), not a view of the batch
        for key, value, b in zip(keys, values, range(len(keys))):
            if b in missing and key not in self._store:
                self._store[key] = value
                self.bytes += value.numel() * value.element_size()
            else:
                self._store.move_to_end(key)
        while self.bytes > self.max_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        out = values[0].new_zeros(len(values), input_ids.shape[1], values[0].shape[-1])  # (B, T, H)
        for b, value in enumerate(values):
            out[b, : value.shape[0]] = value
        return out

    @contextlib.contextmanager
    def top_blocks(self):
        """Within the block, the decoder runs blocks ``depth..`` only (on ``inputs_embeds``)."""
        layers = self.decoder.layers
        self.decoder.layers = nn.ModuleList(list(layers)[self.depth :])
        try:
            yield
        finally:
            self.decoder.layers = layers


def active_cache(model: nn.Module) -> PrefixCache | None:
    """The prefix cache :func:`frozen_prefix` has switched on for ``model``, if any."""
    decoder = decoder_of(model)
    return None if decoder is None else _ACTIVE.get(decoder)


@contextlib.contextmanager
def frozen_prefix(model: nn.Module, depth: int, max_bytes: int = DEFAULT_MAX_BYTES):
    """Within the block, logits of ``model`` computed by ``selected_logits`` take blocks
    ``0..depth-1`` from a cache (kept after the block, for the next user of the same base model and
    depth). A no-op when ``depth`` is 0 or the model is not supported. Yields the cache or None."""
    decoder = decoder_of(model)
    if decoder is None or depth <= 0 or decoder in _ACTIVE:
        yield None if decoder is None else _ACTIVE.get(decoder)
        return
    depth = min(depth, len(decoder.layers))
    caches = _CACHES.setdefault(decoder, {})
    cache = caches.get(depth)
    if cache is None:
        cache = caches[depth] = PrefixCache(decoder, depth, max_bytes)
    _ACTIVE[decoder] = cache
    try:
        yield cache
    finally:
        del _ACTIVE[decoder]
