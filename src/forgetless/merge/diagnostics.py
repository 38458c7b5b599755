"""How much the (masked) expert deltas overlap: collision rate and pairwise cosine.

SoTU's premise is that sparse random masks make the experts' deltas nearly orthogonal: few
positions are kept by two experts (collisions) and the masked deltas have cosine ≈ 0. Both are
measured while merging, one tensor at a time. Collisions are counted exactly. Pairwise cosines
need two experts' tensors at once, which the streaming merge never holds, so dot products are
estimated on a seeded sample of positions per tensor (every position of small tensors),
weighted by tensor size: an unbiased estimate of the full Gram matrix.
"""

from __future__ import annotations

import hashlib
import math

import torch

SAMPLE_PER_TENSOR = 16_384
CHUNK = 1 << 20


class OverlapMeter:
    def __init__(self, experts: int):
        self.experts = experts
        self.gram_raw = torch.zeros(experts, experts, dtype=torch.float64)
        self.gram_masked = torch.zeros(experts, experts, dtype=torch.float64)
        self.delta_sq = torch.zeros(experts, dtype=torch.float64)
        self.kept = torch.zeros(experts, dtype=torch.float64)
        self.positions = 0
        self.covered = 0
        self.collided = 0

    def start(self, key: str, numel: int) -> None:
        self._numel = numel
        if numel <= SAMPLE_PER_TENSOR:
            self._index = None
            samples = numel
        else:
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
            generator = torch.Generator().manual_seed(seed)
            self._index = torch.randint(numel, (SAMPLE_PER_TENSOR,), generator=generator)
            samples = SAMPLE_PER_TENSOR
        self._weight = numel / samples
        self._raw = torch.zeros(self.experts, samples, dtype=torch.float64)
        self._masked = torch.zeros(self.experts, samples, dtype=torch.float64)
        self._count = torch.zeros(numel, dtype=torch.int16)

    def observe_raw(self, expert: int, delta: torch.Tensor) -> None:
        flat = delta.reshape(-1)
        # Summed in chunks: a float64 copy of a whole embedding matrix would set the merge's
        # peak memory.
        self.delta_sq[expert] += sum(chunk.double().square().sum() for chunk in flat.split(CHUNK))
        self._raw[expert] = flat if self._index is None else flat[self._index]

    def observe_masked(self, expert: int, masked: torch.Tensor) -> None:
        flat = masked.reshape(-1)
        kept = flat != 0
        self.kept[expert] += kept.sum()
        self._count += kept
        self._masked[expert] = flat if self._index is None else flat[self._index]

    def finish(self) -> None:
        self.gram_raw += self._weight * (self._raw @ self._raw.T)
        self.gram_masked += self._weight * (self._masked @ self._masked.T)
        self.positions += self._numel
        self.covered += int((self._count >= 1).sum())
        self.collided += int((self._count >= 2).sum())
        del self._raw, self._masked, self._count

    def summary(self) -> dict:
        return {
            "delta_norm": [round(float(value), 6) for value in self.delta_sq.sqrt()],
            "kept_fraction": [
                round(float(value) / max(self.positions, 1), 6) for value in self.kept
            ],
            "collision_rate": round(self.collided / max(self.covered, 1), 6),
            "cosine_raw": _cosines(self.gram_raw),
            "cosine_masked": _cosines(self.gram_masked),
            "mean_abs_cosine_raw": _mean_off_diagonal(self.gram_raw),
            "mean_abs_cosine_masked": _mean_off_diagonal(self.gram_masked),
        }


def expected_collision_rate(keeps: list[float]) -> float:
    """Share of kept positions kept by two or more experts under independent Bernoulli masks
    with these keeps (one per expert)."""
    any_kept = 1 - math.prod(1 - keep for keep in keeps)
    one_kept = sum(
        keep * math.prod(1 - other for j, other in enumerate(keeps) if j != expert)
        for expert, keep in enumerate(keeps)
    )
    return 0.0 if any_kept == 0 else 1 - one_kept / any_kept


def _normalised(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    return gram / norms[:, None] / norms[None, :]


def _cosines(gram: torch.Tensor) -> list[list[float]]:
    return [[round(float(value), 4) for value in row] for row in _normalised(gram)]


def _mean_off_diagonal(gram: torch.Tensor) -> float | None:
    experts = gram.shape[0]
    if experts < 2:
        return None
    cosines = _normalised(gram).abs()
    off_diagonal = cosines.sum() - cosines.diagonal().sum()
    return round(float(off_diagonal) / (experts * (experts - 1)), 4)
