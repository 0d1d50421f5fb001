"""Dynamic matching distillation: which teacher layer each student layer learns from, and the matched loss.

Pure functions over lists of per-layer features. Features are `(B, L, D)` (decoder: L tokens; encoder: L frames)
with a `(B, L)` bool mask of the positions that count. Distances between a student layer s and a teacher layer t
are means over masked positions of a per-position distance:
  softmax_mse: sum_d (softmax(s/T) - softmax(t/T))^2   (the paper; softmax over the feature axis)
  mse:         mean_d (s - t)^2
  cosine:      1 - cos(s, t)
Modes (method.md):
  static:          student i <-> teacher 2i+1 (clipped to the last teacher layer)
  dynamic_nolimit: each student layer takes its nearest teacher layer
  dynamic_limit:   greedy and monotonic: student i searches teacher layers pre..last (pre = previous choice,
                   inclusive), takes the argmin and sets pre to it
The choice is made on a gradient-free distance matrix; the loss is recomputed with gradient for the chosen pairs
only and averaged over student layers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("static", "dynamic_nolimit", "dynamic_limit")
DISTANCES = ("softmax_mse", "mse", "cosine")


def position_distance(s: Tensor, t: Tensor, kind: str = "softmax_mse", temperature: float = 1.0) -> Tensor:
    """s, t (..., D) -> (...) distance per position, in float32."""
    s, t = s.float(), t.float()
    if kind == "softmax_mse":
        return (F.softmax(s / temperature, dim=-1) - F.softmax(t / temperature, dim=-1)).pow(2).sum(-1)
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    raise ValueError(f"unknown distance '{kind}', expected one of {DISTANCES}")


def masked_sum(values: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of (B, L) values over the positions where mask is True."""
    return values.sum() if mask is None else (values * mask.to(values.dtype)).sum()


def distance_matrix(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Tensor | None = None,
    kind: str = "softmax_mse",
    temperature: float = 1.0,
    adapt: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """(S, T) matrix of summed per-position distances over masked positions, without gradient.

    `adapt(i, t)` maps a teacher feature into student layer i's space (None: identity). Divide by the number of
    positions for the mean; sums are returned so that DDP ranks can all-reduce them before choosing.
    """
    with torch.no_grad():
        rows = []
        for i, s in enumerate(student):
            row = []
            for t in teacher:
                tt = t if adapt is None else adapt(i, t)
                row.append(masked_sum(position_distance(s, tt, kind, temperature), mask))
            rows.append(torch.stack(row))
        return torch.stack(rows)


def static_choice(n_student: int, n_teacher: int) -> list[int]:
    """student i <-> teacher 2i+1, clipped to the last teacher layer."""
    return [min(2 * i + 1, n_teacher - 1) for i in range(n_student)]


def choose(dist: Tensor | None, mode: str, n_student: int | None = None, n_teacher: int | None = None) -> list[int]:
    """Teacher layer per student layer from an (S, T) distance matrix (ties go to the lower teacher layer)."""
    if mode == "static":
        if dist is not None:
            n_student, n_teacher = dist.shape
        return static_choice(n_student, n_teacher)
    if dist is None:
        raise ValueError(f"mode '{mode}' needs a distance matrix")
    if mode == "dynamic_nolimit":
        return [int(row.argmin()) for row in dist]
    if mode == "dynamic_limit":
        chosen, pre = [], 0
        for row in dist:
            pre = pre + int(row[pre:].argmin())
            chosen.append(pre)
        return chosen
    raise ValueError(f"unknown matching mode '{mode}', expected one of {MODES}")


class FeatureAdapter(nn.Module):
    """Trainable linear maps teacher width -> student width, one per student layer (identity when equal)."""

    def __init__(self, n_student_layers: int, teacher_dim: int, student_dim: int):
        super().__init__()
        self.identity = teacher_dim == student_dim
        self.maps = (
            nn.ModuleList()
            if self.identity
            else nn.ModuleList(nn.Linear(teacher_dim, student_dim, bias=False) for _ in range(n_student_layers))
        )
        for m in self.maps:
            nn.init.normal_(m.weight, std=teacher_dim**-0.5)

    def forward(self, i: int, t: Tensor) -> Tensor:
        return t if self.identity else self.maps[i](t.to(self.maps[i].weight.dtype))


def match_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Tensor | None = None,
    mode: str = "dynamic_limit",
    kind: str = "softmax_mse",
    temperature: float = 1.0,
    adapter: FeatureAdapter | None = None,
    normalizer: float | Tensor | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, list[int], Tensor | None]:
    """Matched-layer loss: mean over student layers of the chosen pair's distance (mean over positions).

    normalizer: divide the summed distances by this instead of the local position count (DDP: the global count
    over the world size). all_reduce: sums the distance matrix across ranks before the choice so that every rank
    chooses the same layers as one process would on the whole batch.
    Returns (loss, chosen teacher layer per student layer, (S, T) mean distance matrix or None for static).
    """
    if len(student) == 0 or len(teacher) == 0:
        raise ValueError("match_loss needs at least one student and one teacher layer")
    adapt = None if adapter is None or adapter.identity else adapter
    count = mask.sum().float() if mask is not None else torch.tensor(float(student[0].shape[:-1].numel()))
    dist = None
    if mode != "static":
        sums = distance_matrix(student, teacher, mask, kind, temperature, adapt)
        total = count.to(sums.device).clone()
        if all_reduce is not None:
            sums, total = all_reduce(sums), all_reduce(total.reshape(1))[0]
        dist = sums / total.clamp(min=1)
    chosen = choose(dist, mode, len(student), len(teacher))
    denom = normalizer if normalizer is not None else count.clamp(min=1)
    terms = []
    for i, j in enumerate(chosen):
        t = teacher[j].detach()
        if adapt is not None:
            t = adapt(i, t)
        terms.append(masked_sum(position_distance(student[i], t, kind, temperature), mask) / denom)
    return torch.stack(terms).mean(), chosen, dist
