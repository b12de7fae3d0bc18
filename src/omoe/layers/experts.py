"""Stacked LoRA / DoRA experts of one frozen linear map (OMoE Eq. (1); DoRA, Liu et al. 2024).

``k`` experts of the same linear share one parameter tensor each for A and B, so that every expert
is computed by one batched matmul. Tensors are *slot-major*: ``(S, N, d)``, where slot ``s`` of
token ``n`` uses expert ``s`` (dense, ``S = k``) or expert ``indices[s, n]`` (top-k).

The module returns *deltas*: what each expert adds to the frozen output ``W0 x``. For LoRA that is
``(alpha/r) B A x``; for DoRA it is ``m/||W0 + (alpha/r)BA|| * (W0 x + (alpha/r)BA x) - W0 x``, formed
without subtracting two rounded products (see :class:`DoRAExperts`): with B = 0 and an untrained
magnitude every delta is exactly zero (docs/method.md, "Numerics").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omoe.layers.kernels import Dropout, frozen_linear
from omoe.layers.quantized import compute_dtype, frozen_weight, quantization_of


def autocast_float16(device_type: str) -> bool:
    """Whether float16 autocast is on: float16's range (max 65504) then bounds the gradients."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16


def _cast_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Under autocast the matmul picks the dtype; otherwise compute in the adapter's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """Apply a different linear map per slot.

    Args:
        x: ``(S, N, d_in)`` per-slot inputs.
        weight: ``(E, d_out, d_in)`` one matrix per expert.
        indices: ``(S, N)`` expert of each slot, or ``None`` when slot ``s`` is expert ``s``.

    Returns:
        ``(S, N, d_out)``.
    """
    if indices is None:
        if weight.shape[0] == 1:
            return F.linear(x, weight.squeeze(0))  # squeeze, not [0]: a view in backward too
        return torch.bmm(x, weight.transpose(1, 2))  # (S, N, d_in) @ (S, d_in, d_out)
    # Grouped matmul: sort the (slot, token) pairs by expert, one matmul per expert (loop over
    # experts, never over tokens), then undo the sort.
    S, N, d_in = x.shape
    flat_idx = indices.reshape(-1)  # (S*N,)
    order = flat_idx.argsort(stable=True)
    counts = torch.bincount(flat_idx, minlength=weight.shape[0]).tolist()
    chunks = x.reshape(S * N, d_in).index_select(0, order).split(counts)
    out = torch.cat([F.linear(chunk, weight[e]) for e, chunk in enumerate(chunks)])  # sorted (S*N, d_out)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out.index_select(0, inverse).view(S, N, -1)


class LoRAExperts(nn.Module):
    """``k`` LoRA adapters of one ``(out, in)`` linear map, with A and B stacked over experts.

    lora_A: ``(k, r, in)``, Kaiming-uniform like ``nn.Linear`` (and PEFT).
    lora_B: ``(k, out, r)``, zeros, so every expert starts as the identity change.
    Dropout is applied to the input once, shared by the experts of this linear (as PEFT does for
    each adapted linear).

    Variants (LoRA here, DoRA in :class:`DoRAExperts`, as PEFT's ``LoraVariant``) share one
    interface, so the layers that hold them never ask which one they hold: ``init_magnitude``,
    ``forward`` (given the frozen output as a callable, which only a variant that rescales the
    frozen map calls), ``merged_weight``, and ``low_rank_delta``, which says what a layer may keep
    for backward.
    """

    is_dora = False  # which variant, for references and reports; layers read the interface instead
    # The delta is (alpha/r) B A x alone, so a layer may keep only the codes z = A x for backward and
    # recompute B z (DoRA's delta also rescales the frozen output: it needs more).
    low_rank_delta = True
    # Set by an OMoE layer: compute B z in float32 under float16 autocast. Gram-Schmidt's gradient
    # at B = 0 is 1/eps times LoRA's, beyond float16's range; B z is rank r, so this is cheap.
    float32_up = False

    def __init__(self, in_features, out_features, num_experts=1, r=16, alpha=32.0, dropout=0.0, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.r = num_experts, r
        self.scaling = alpha / r
        f32 = torch.float32
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=f32))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, r, device=device, dtype=f32))
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def init_magnitude(self, base_layer: nn.Module) -> None:
        """Nothing to initialise from the frozen layer: LoRA has no magnitude."""

    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        for a in self.lora_A:  # each expert as its own (r, in) nn.Linear weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def down(self, x: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        """``A x`` per slot. x: ``(N, in)`` shared by all slots, or ``(S, N, in)`` per slot.

        Returns ``(S, N, r)``.
        """
        A = self.lora_A
        x = _cast_for(x, A)
        if x.dim() == 2:
            # One matmul over every expert's A: (N, in) @ (in, k*r).
            z = F.linear(x, A.reshape(-1, A.shape[-1])).view(x.shape[0], self.num_experts, self.r)
            z = z.permute(1, 0, 2)  # (k, N, r)
            if indices is not None:
                z = z.gather(0, indices[..., None].expand(-1, -1, self.r))  # (S, N, r)
            return z
        return expert_matmul(x, A, indices)

    def lora(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``(alpha/r) B A x`` per slot, ``(S, N, out)``; x (already dropped out) as in :meth:`down`."""
        return self.up(self.down(x, indices), indices)

    def up(self, z: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``(alpha/r) B z`` per slot: z ``(S, N, r)`` to ``(S, N, out)``."""
        B = self.lora_B
        # The scaling multiplies the r-wide codes, not the out-wide result: r/out of the work (and
        # the same bits when it is a power of two, as alpha = 2r makes it).
        if self.float32_up and autocast_float16(z.device.type):
            with torch.autocast(z.device.type, enabled=False):
                return expert_matmul(z.to(B.dtype) * self.scaling, B, indices)
        return expert_matmul(z * self.scaling, B, indices)

    def forward(self, x, indices=None, frozen_out=None, base_layer=None) -> torch.Tensor:
        """Delta of each slot's expert over the frozen output, ``(S, N, out)``.

        Args:
            x: ``(N, in)`` or ``(S, N, in)`` input of the linear.
            indices: ``(S, N)`` expert per slot, or ``None`` for dense slots (``S = k``).
            frozen_out: a callable returning the frozen ``W0 x`` without bias, ``(N, out)`` or
                ``(S, N, out)``; called only by variants that rescale it (DoRA), so LoRA never pays for it.
            base_layer: the frozen module (DoRA's weight norm).
        """
        return self.lora(self.dropout(x), indices)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r) B A`` of each expert, ``(k, out, in)`` (for merging)."""
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling

    @torch.no_grad()
    def merged_weight(self, base_layer: nn.Module, expert: int = 0) -> torch.Tensor:
        """``W0 + (alpha/r) B A`` of one expert, float32 ``(out, in)``."""
        return base_layer.weight.float() + self.delta_weight()[expert].float()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}"
        )


def without_bias(y: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
    """``W0 x`` from the frozen module's output ``y = W0 x + b``, flattened to ``(N, out)``."""
    y = y.reshape(-1, y.shape[-1])
    bias = getattr(base_layer, "bias", None)
    return y - bias if bias is not None else y


def _frozen_matmul(base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``W0 x`` without the bias: a call of the frozen module (FSDP-friendly) when it has no bias.

    With a bias the weight is applied directly: ``base_layer(x) - b`` would lose a small ``W0 x``
    (an expert's small hidden change) to the rounding of ``W0 x + b``.
    """
    if getattr(base_layer, "bias", None) is None:
        return frozen_linear(base_layer, x)
    if quantization_of(base_layer) is not None:
        return _frozen_matmul_dense(base_layer, x)
    return F.linear(x, base_layer.weight)


def _frozen_matmul_dense(base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``W0 x`` without the bias from the dequantized weight of a quantized frozen linear."""
    return F.linear(x, frozen_weight(base_layer).to(x.dtype))


class DoRAExperts(LoRAExperts):
    """DoRA experts: ``W_i = m_i * (W0 + s B_i A_i) / ||W0 + s B_i A_i||`` (norm per output row).

    As in the DoRA paper (Sec. 4.3) and PEFT, the norm is treated as a constant in the backward
    pass. The row norms are computed without forming ``B A`` (see :meth:`norm_excess`):
    ``||W0_o + s (BA)_o||^2 = ||W0_o||^2 + 2 s B_o . (W0 A^T)_o + s^2 B_o (A A^T) B_o^T``,
    where ``A W0^T`` is a call of the frozen module on the ``r`` rows of ``A``.

    ``m`` is stored as PEFT stores it (the magnitude itself, ``lora_magnitude``), initialised to
    ``n0 = ||W0||``; ``n0`` is kept as a non-persistent buffer (``norm_ref``), so that the factor
    ``m/n - 1`` of the frozen output is formed as ``((m - n0) - (n - n0)) / n`` with
    ``n - n0 = extra / (n + n0)``: both differences are of quantities that are exactly equal for an
    untrained expert, whatever device or dtype the layer has moved to since.
    """

    is_dora = True
    low_rank_delta = False

    def __init__(self, in_features, out_features, num_experts=1, r=16, alpha=32.0, dropout=0.0, device=None):
        super().__init__(in_features, out_features, num_experts, r, alpha, dropout, device)
        self.lora_magnitude = nn.Parameter(torch.ones(num_experts, out_features, device=device))
        self.register_buffer("norm_ref", None, persistent=False)  # (out,) ||W0|| row-wise

    def init_magnitude(self, base_layer: nn.Module) -> None:
        """``m_i = ||W0||`` row-wise (B = 0), so that DoRA starts as the frozen map."""
        if self.lora_magnitude.device.type == "meta" or base_layer.weight.device.type == "meta":
            return
        with torch.no_grad():
            self.norm_ref = self._frozen_sq_norm(base_layer).sqrt()  # (out,)
            self.lora_magnitude.copy_(self.norm_ref.expand_as(self.lora_magnitude))

    def _norm_dtype(self, base_layer: nn.Module) -> torch.dtype:
        dtype = torch.promote_types(self.lora_A.dtype, compute_dtype(base_layer))
        return torch.promote_types(dtype, torch.float32)

    def _frozen_sq_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """``||W0||^2`` row-wise, ``(out,)``."""
        return frozen_weight(base_layer).to(self._norm_dtype(base_layer)).pow(2).sum(-1)

    @torch.no_grad()
    def norm_excess(self, base_layer: nn.Module) -> torch.Tensor:
        """``||W0 + s B A||^2 - ||W0||^2`` row-wise per expert, ``(k, out)``, at least float32, no
        graph; exactly zero where B is."""
        dtype = self._norm_dtype(base_layer)
        A, B, s = self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling
        with torch.autocast(A.device.type, enabled=False):  # small: always at least float32
            rows = A.reshape(-1, A.shape[-1])  # (k*r, in)
            if quantization_of(base_layer) is None:
                w0_at = _frozen_matmul(base_layer, rows.to(base_layer.weight.dtype))
            else:  # the dequantized W0 that ||W0|| is taken of (LLM.int8 would also round A to 8 bits)
                w0_at = _frozen_matmul_dense(base_layer, rows)
            w0_at = w0_at.to(dtype).view(self.num_experts, self.r, -1)  # (k, r, out) = A W0^T
            cross = torch.einsum("kor,kro->ko", B, w0_at)  # B_o . (W0 A^T)_o
            gram = torch.bmm(A, A.transpose(1, 2))  # (k, r, r)
            quad = torch.einsum("kor,krs,kos->ko", B, gram, B)
            return 2 * s * cross + s * s * quad

    @torch.no_grad()
    def weight_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """Row norms of each expert's ``W0 + s B A``, ``(k, out)``, at least float32, no graph."""
        return (self._frozen_sq_norm(base_layer) + self.norm_excess(base_layer)).clamp_min(0).sqrt()

    @torch.no_grad()
    def merged_weight(self, base_layer: nn.Module, expert: int = 0) -> torch.Tensor:
        """``m * (W0 + s B A) / ||W0 + s B A||`` of one expert, float32 ``(out, in)``."""
        w = super().merged_weight(base_layer, expert)  # (out, in)
        norm = self.weight_norm(base_layer)[expert]  # (out,)
        return w * (self.lora_magnitude[expert].float() / norm)[:, None]

    def scale_minus_one(self, base_layer: nn.Module) -> torch.Tensor:
        """``m/n - 1`` per expert and output row, ``(k, out)``; exactly 0 for an untrained expert.

        Formed as ``((m - n0) - (n - n0)) / n`` with ``n - n0 = extra / (n + n0)`` (``extra`` from
        :meth:`norm_excess`), never as the difference of the two rounded ratios ``m/n`` and 1. The
        gradient reaches ``m`` only (``n`` is a constant in backward, as in DoRA and PEFT).
        """
        extra = self.norm_excess(base_layer)  # (k, out)
        with torch.no_grad():
            n0 = self._frozen_sq_norm(base_layer).sqrt() if self.norm_ref is None else self.norm_ref
            n0 = n0.to(extra.dtype)  # (out,)
            n = (n0 * n0 + extra).clamp_min(0).sqrt()  # (k, out)
            n_minus_n0 = extra / (n + n0).clamp_min(torch.finfo(n.dtype).tiny)
        return ((self.lora_magnitude - n0) - n_minus_n0) / n

    def forward(self, x, indices=None, frozen_out=None, base_layer=None) -> torch.Tensor:
        x_dropped = self.dropout(x)
        lora = self.lora(x_dropped, indices)  # (S, N, out)
        rel = self.scale_minus_one(base_layer)  # (k, out) m/n - 1
        rel = rel[:, None, :] if indices is None else rel[indices]  # (S, 1|N, out)
        # PEFT's form: with dropout active the magnitude rescales the frozen map of the dropped input.
        base_dropped = _frozen_matmul(base_layer, x_dropped) if self.dropout_active else frozen_out()
        return rel * base_dropped + (1 + rel) * lora
