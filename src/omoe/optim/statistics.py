"""What each expert's inputs look like: routing-weighted input means, collected by forward hooks.

Every micro-batch forward gives, for each MoE layer and each expert j, the routing-weighted mean of
the inputs of the tokens j processes (padding excluded): OWM's batch mean ``x̄`` of the layer input,
one direction per micro-batch. A layer has up to two *sources*: ``input``, what the router and the
experts' A of a ``linear`` layer (or of an FFN's gate and up) read, and ``hidden``, what an FFN's
``down`` experts read (each expert's own hidden ``act(gate_j x) * up_j x``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from omoe.optim import projectors


def routed_means(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor | None, mask: torch.Tensor | None, E: int
) -> torch.Tensor:
    """Routing-weighted mean input of each expert, float32, no graph.

    Args:
        x: ``(N, d)`` shared by every slot, or ``(S, N, d)`` one input per slot.
        weights: ``(S, N)`` routing weights; indices: ``(S, N)`` expert of each slot, or ``None`` when
            slot s is expert s (soft routing).
        mask: ``(N,)`` True for real tokens, or None.
        E: number of experts.

    Returns:
        ``(E, d)``; an expert that got no weight has a zero row.
    """
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        w = weights.detach().float()  # (S, N)
        if mask is not None:
            w = w * mask.to(w.dtype)
        S, N = w.shape
        x = x.detach().float()
        if indices is None:
            total = w.sum(1)  # (E,)
            sums = w @ x if x.dim() == 2 else torch.einsum("sn,snd->sd", w, x)  # (E, d)
        else:
            assign = torch.zeros(E, S * N, dtype=w.dtype, device=w.device)  # (E, S*N)
            assign.scatter_(0, indices.reshape(1, -1), w.reshape(1, -1))  # slot (s, n) -> its expert
            total = assign.sum(1)
            if x.dim() == 2:
                sums = assign.view(E, S, N).sum(1) @ x  # (E, N) @ (N, d)
            else:
                sums = assign @ x.reshape(S * N, -1)  # (E, S*N) @ (S*N, d)
        return torch.where(total[:, None] > 0, sums / total.clamp_min(1e-30)[:, None], 0.0)


@dataclass
class Source:
    """The statistics of one source of one MoE layer: every expert's input means.

    X: ``(E, cap, d)`` ring buffer of the newest ``cap`` means per expert (zero rows = unused);
    count: ``(E,)`` means seen per expert (int64) since the last reset.
    P: ``(E, d, d)`` dense RLS projectors (placement 'full'): expert j's (``mean``), or the other
    experts' together (``union``), as :func:`~omoe.optim.projectors.dense_project` expects.
    """

    num_experts: int
    dim: int
    X: torch.Tensor | None = None
    P: torch.Tensor | None = None
    count: torch.Tensor | None = None
    pending: list[torch.Tensor] = field(default_factory=list)  # (E, d) per micro-batch forward

    @classmethod
    def empty(cls, E: int, d: int, cap: int, dense: bool, device) -> Source:
        """No statistics yet: ``cap`` zero means per expert (0 = keep none), identity projectors if ``dense``."""
        f32 = torch.float32
        return cls(
            E,
            d,
            X=torch.zeros(E, cap, d, dtype=f32, device=device) if cap else None,
            P=torch.eye(d, dtype=f32, device=device).repeat(E, 1, 1) if dense else None,
            count=torch.zeros(E, dtype=torch.long, device=device),
        )

    def reset(self) -> None:
        self.pending.clear()
        self.count.zero_()
        if self.X is not None:
            self.X.zero_()
        if self.P is not None:
            self.P.copy_(torch.eye(self.dim, device=self.P.device).expand_as(self.P))

    def directions(self) -> torch.Tensor | None:
        """``(E, n, d)``: the stored means (n = rows in use), or None before any (or if none are kept)."""
        if self.X is None:
            return None
        n = min(int(self.count.max()), self.X.shape[1])
        return self.X[:, :n] if n else None

    def append(self, means: torch.Tensor, alpha: float, combine: str) -> None:
        """Add ``(M, E, d)`` means in order; zero rows (no tokens for that expert) are skipped."""
        E, cap = self.num_experts, (self.X.shape[1] if self.X is not None else 0)
        experts = torch.arange(E, device=means.device)
        for row in means:  # a loop over micro-batches (a few per step), never over tokens
            valid = row.abs().sum(-1) > 0  # (E,)
            if self.X is not None:
                slot = self.count % cap  # (E,) ring position of each expert's next mean
                self.X[experts[valid], slot[valid]] = row[valid]
            if self.P is not None:
                if combine == "mean":
                    projectors.rls_update(self.P, row, alpha)  # P_j absorbs x_j
                else:
                    for j in range(E):  # every other expert's projector absorbs x_j
                        others = experts != j
                        sub = self.P[others]
                        projectors.rls_update(sub, row[j].expand(E - 1, -1), alpha)
                        self.P[others] = sub
            self.count += valid.long()


def gather_in_order(local: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every process's pending means, in global micro-batch order, on every process.

    Args:
        local: per source, ``(M_s, E, d_s)`` this process's means. Under the trainer's convention,
            process r of W ran micro-batches r, r + W, ...; m-th of process r = global m W + r.

    Returns:
        per source, ``(sum_r M_s(r), E, d_s)``, the same on every process. Two collectives.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    W, device = dist.get_world_size(), local[0].device
    counts = torch.tensor([t.shape[0] for t in local], device=device)
    all_counts = [torch.empty_like(counts) for _ in range(W)]
    dist.all_gather(all_counts, counts)
    all_counts = torch.stack(all_counts).tolist()  # (W, sources)
    most = [max(c[s] for c in all_counts) for s in range(len(local))]
    flat = torch.cat(
        [torch.cat([t, t.new_zeros(m - t.shape[0], *t.shape[1:])]).reshape(-1) for t, m in zip(local, most)]
    )  # this process's means, each source padded to the most any process has
    gathered = [torch.empty_like(flat) for _ in range(W)]
    dist.all_gather(gathered, flat)
    out, offset = [], 0
    for s, t in enumerate(local):
        size = most[s] * t.shape[1:].numel()
        blocks = [g[offset : offset + size].view(most[s], *t.shape[1:]) for g in gathered]  # per rank
        offset += size
        ordered = [blocks[r][m] for m in range(most[s]) for r in range(W) if m < all_counts[r][s]]
        out.append(torch.stack(ordered) if ordered else t.new_zeros(0, *t.shape[1:]))
    return out
