"""The projection of one matrix away from its top singular subspace (:class:`SubspaceBasis`),
its cost, and the projector that applies it to every targeted matrix after each step."""

from __future__ import annotations

import torch

from forgetless.errors import ForgetlessError
from forgetless.train.osft.sharding import (
    all_reduce_,
    is_dtensor,
)

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def thin_svd(weight: torch.Tensor) -> Svd:
    """``U, S, Vh`` of ``weight`` in fp32, ``U`` m×r, ``Vh`` r×n with r = min(m, n)."""
    return torch.linalg.svd(weight.detach().float(), full_matrices=False)


def trainable_directions(shape: tuple[int, int], rank: int, projection: str) -> int:
    """Dimension of the subspace of m×n updates that ``projection`` leaves trainable."""
    m, n = shape
    return (m - rank) * (n - rank) if projection == "two_sided" else m * n - rank * rank


def projection_cost(
    shape: tuple[int, int], rank: int, projection: str, left_low: bool, right_low: bool
) -> int:
    """Multiply-adds of one :meth:`SubspaceBasis.project_` with the given stored factors.

    Mirrors the branches of ``project_``: a side stored by its complement (``*_low``, possible
    only where the factor is square) is applied first, so the other side works on the smaller
    m×c or c×n product instead of the whole matrix.
    """
    m, n = shape
    k = rank
    c = min(m, n) - k
    if projection == "two_sided":
        if right_low:
            return 2 * m * n * c + 2 * m * (c if left_low else k) * c
        if left_low:
            return 2 * m * n * c + 2 * n * k * c
        return 4 * m * n * k
    if left_low and right_low:
        return 4 * m * n * c + c * c * (m + n)
    if left_low:
        return 2 * m * n * k + 2 * m * k * c
    if right_low:
        return 2 * m * n * k + 2 * n * k * c
    return 2 * m * n * k + 2 * m * k * k


def projection_communication(
    shape: tuple[int, int], rank: int, projection: str, left_low: bool, right_low: bool
) -> int:
    """Elements all-reduced by one :meth:`SubspaceBasis.project_` of a row-sharded matrix.

    Each branch of ``project_`` has exactly one product over the rows of the matrix,
    ``leftᵀ Y`` with ``Y`` the row-sharded ``X`` or ``X R`` (``R`` the stored right factor), and
    that is the only thing communicated: each process computes its rows' share and the shares
    are summed. Everything else acts row by row. The size is (columns of the stored left
    factor) × (columns of ``Y``):

    * two_sided: ``(k or c) × c`` with the right complement stored (``leftᵀ (X V_low)``),
      else ``(k or c) × n``;
    * top_block: ``k × k`` (``U_highᵀ (X V_high)``), ``c × k`` (left complement), ``k × n``
      (right complement), ``c × n`` (both complements).

    With ``c = min(m, n) − k``. Why not the simpler alternative, all-gathering the m×n gradient
    (or weight drift) on every process and projecting it whole: that moves m·n elements per
    process (times (W − 1)/W), and a ring all-reduce of s elements moves 2·s (times the same),
    so the row-sharded projection sends less whenever ``2·s < m·n``. Since k, c < min(m, n),
    ``k × k`` and ``c × k`` always are; a width-by-n product is when that width is under m/2.
    For the storage :class:`SubspaceBasis` picks (fewest multiply-adds) on SmolLM2-135M, 2·s
    is 0.06 to 0.5 of the all-gather over the whole model at preserved ratios 0.25–0.9, and at
    most 1.27× for one matrix at some ranks (docs/osft.md tabulates it). The all-gather would
    also hold an m×n buffer and repeat the m·n-sized multiply-adds on every process, which
    the row-sharded projection splits between them.
    """
    m, n = shape
    k = rank
    c = min(m, n) - k
    left = c if left_low else k
    if projection == "two_sided":
        return left * (c if right_low else n)
    if left_low and right_low:
        return c * n
    if left_low:
        return c * k
    if right_low:
        return k * n
    return k * k


class SubspaceBasis:
    """The projection ``P`` of one matrix (see the module docstring) from its thin SVD.

    On a side where the SVD factor is square (that side's dimension equals r = min(m, n)),
    ``U_high U_highᵀ = I − U_low U_lowᵀ``, so either ``U_high`` or its complement ``U_low`` can
    be stored; each side stores whichever makes the projection cheapest (fewest multiply-adds,
    :func:`projection_cost`). At high preserved ratios (late tasks of a sequence) that makes
    both memory and flops scale with the trainable rank instead of the frozen one.
    """

    def __init__(
        self, weight: torch.Tensor, rank: int, projection: str = "two_sided", svd: Svd | None = None
    ):
        m, n = weight.shape
        r = min(m, n)
        if not 0 < rank < r:
            raise ValueError(f"preserved rank must be in [1, {r - 1}], got {rank}")
        u, _, vh = svd if svd is not None else thin_svd(weight)
        self.shape = (m, n)
        self.rank = rank
        self.projection = projection
        # Set by shard_rows_: this process's rows of the left factor, and the group summing
        # ``leftᵀ Y`` over the processes holding the other rows.
        self.rows: tuple[int, int] | None = None
        self.group = None
        options = [(left, right) for left in {False, m == r} for right in {False, n == r}]
        self.left_low, self.right_low = min(
            options, key=lambda sides: projection_cost((m, n), rank, projection, *sides)
        )
        self.left = (u[:, rank:] if self.left_low else u[:, :rank]).contiguous()
        self.right = (vh[rank:].mT if self.right_low else vh[:rank].mT).contiguous()

    def shard_rows_(self, start: int, length: int, group) -> SubspaceBasis:
        """Keep only rows ``start:start + length`` of the left factor, for a matrix whose rows
        are sharded across the processes of ``group`` (FSDP2): :meth:`project_` then takes
        this process's rows of ``x`` and sums the one product over all rows in ``group``."""
        self.left = self.left[start : start + length].contiguous()
        self.rows = (start, length)
        self.group = group
        return self

    def project_(self, x: torch.Tensor) -> None:
        """Overwrite the fp32 matrix ``x`` with ``P(x)`` (its rows ``self.rows`` if sharded).

        Every branch has exactly one product over the rows, :meth:`_coefficients`; everything
        else acts row by row, so a row-sharded ``x`` needs one all-reduce
        (:func:`projection_communication`)."""
        left, right = self.left, self.right
        if self.projection == "two_sided":
            if self.right_low:  # x (I − V_high V_highᵀ) = (x V_low) V_lowᵀ
                torch.matmul(self._left_out(x @ right), right.mT, out=x)
            elif self.left_low:
                torch.matmul(left, self._right_out(self._coefficients(x)), out=x)
            else:
                self._right_out(self._left_out(x))
            return
        # top_block: x − Π_L x Π_R with Π the projection onto the frozen (high) directions.
        if self.left_low and self.right_low:
            # Π = I − low lowᵀ on both sides: P(x) = L Lᵀx + (x R − L Lᵀ x R) Rᵀ
            coefficients = self._coefficients(x)
            side = x @ right
            side.addmm_(left, coefficients @ right, alpha=-1.0)
            torch.matmul(left, coefficients, out=x)
            x.addmm_(side, right.mT)
        elif self.left_low:
            side = x @ right
            side.addmm_(left, self._coefficients(side), alpha=-1.0)
            x.addmm_(side, right.mT, alpha=-1.0)
        elif self.right_low:
            side = self._coefficients(x)
            side.addmm_(side @ right, right.mT, alpha=-1.0)
            x.addmm_(left, side, alpha=-1.0)
        else:
            x.addmm_(left @ self._coefficients(x @ right), right.mT, alpha=-1.0)

    def _coefficients(self, y: torch.Tensor) -> torch.Tensor:
        """``leftᵀ y``: the only product over the rows, summed over ``group`` if sharded."""
        product = self.left.mT @ y
        if self.group is not None:
            all_reduce_(product, self.group)
        return product

    def _left_out(self, y: torch.Tensor) -> torch.Tensor:
        """``(I − U_high U_highᵀ) y``, in place unless the complement is stored."""
        if self.left_low:
            return self.left @ self._coefficients(y)
        return y.addmm_(self.left, self._coefficients(y), alpha=-1.0)

    def _right_out(self, y: torch.Tensor) -> torch.Tensor:
        """``y (I − V_high V_highᵀ)``, in place unless the complement is stored."""
        if self.right_low:
            return (y @ self.right) @ self.right.mT
        return y.addmm_(y @ self.right, self.right.mT, alpha=-1.0)

    def high_energy(self, x: torch.Tensor) -> tuple[float, ...]:
        """Norms of the parts of ``x`` that ``P`` removes: ``(‖U_highᵀ x‖, ‖x V_high‖)`` for
        two_sided, ``(‖U_highᵀ x V_high‖,)`` for top_block (of this process's rows if
        sharded)."""
        x = x.detach().float()
        left = x - self._left_out(x.clone())
        if self.projection == "two_sided":
            return float(left.norm()), float((x - self._right_out(x.clone())).norm())
        return (float((left - self._right_out(left.clone())).norm()),)

    def to(self, device: torch.device) -> SubspaceBasis:
        self.left = self.left.to(device)
        self.right = self.right.to(device)
        return self


def full_svd(weight: torch.Tensor) -> Svd:
    """:func:`thin_svd` of the whole matrix, gathered once if it is sharded (a collective: every
    process calls this for the same matrices in the same order)."""
    if weight.is_meta:
        raise ForgetlessError(
            "OSFT needs the starting weights on every process when its callback is built, and "
            "this one has placeholders (meta tensors); with accelerate's FSDP, set "
            "cpu_ram_efficient_loading to false"
        )
    return thin_svd(weight.full_tensor() if is_dtensor(weight) else weight)
