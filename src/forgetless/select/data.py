"""A selection's data: the pool split into candidates, validation and the featured part; the
anchor; and the records files stages hand to each other."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forgetless.data.config import DataConfig
from forgetless.data.records import Record, read_records
from forgetless.errors import ForgetlessError
from forgetless.model_config import ModelConfig
from forgetless.runs import StageSettings
from forgetless.select.config import AnchorConfig, HoldoutConfig


class PoolSettings(StageSettings):
    """What fixes the candidates and the held-out validation part."""

    model: ModelConfig
    # The pool: a data section, or None when an upstream stage's records are the pool.
    data: DataConfig | None
    validation: HoldoutConfig
    seed: int


@dataclass(frozen=True)
class SelectionData:
    """The pool split into candidates, validation and (for ogs) the featured part."""

    candidates: list[Record]
    validation: list[Record]
    featured: list[int]  # indices into candidates

    @classmethod
    def load(
        cls,
        pool_settings,
        *,
        pool: Path | None = None,
        featured_samples: int | None = None,
        data_dir: str | None = None,
    ) -> SelectionData:
        """The split of the pool (a data section, or a records file) by ``pool_settings``.

        Every stage of a selection needs it: the split is made once per process.
        """
        stamp = None if pool is None else (str(pool), pool.stat().st_mtime_ns)
        return _load(pool_settings.model_dump_json(), stamp, featured_samples, data_dir)

    def budget_count(self, budget: float) -> int:
        return max(1, min(len(self.candidates), round(budget * len(self.candidates))))


@functools.lru_cache(maxsize=4)
def _load(settings_json: str, pool_file, featured_samples, data_dir) -> SelectionData:
    from forgetless.data import load_records, load_section

    settings = PoolSettings.model_validate_json(settings_json)
    pool = (
        load_section(settings.data, data_dir)
        if pool_file is None
        else read_records(Path(pool_file[0]))
    )
    holdout = settings.validation
    rng = np.random.default_rng(settings.seed)
    if holdout.source is None:
        if len(pool) <= holdout.samples:
            raise ForgetlessError(
                f"the pool has {len(pool)} records, too few to hold out "
                f"select.validation.samples={holdout.samples}; give select.validation.source"
            )
        held = set(rng.permutation(len(pool))[: holdout.samples].tolist())
        validation = [pool[i] for i in sorted(held)]
        candidates = [record for i, record in enumerate(pool) if i not in held]
    else:
        kind = settings.data.kind if settings.data is not None else None
        validation = load_records(
            holdout.source,
            kind=kind,
            split=holdout.split,
            data_dir=data_dir,
            limit=holdout.samples,
        )
        candidates = pool
    if featured_samples is not None and featured_samples < len(candidates):
        featured = sorted(rng.permutation(len(candidates))[:featured_samples].tolist())
    else:
        featured = list(range(len(candidates)))
    return SelectionData(candidates, validation, featured)


def load_anchor(anchor: AnchorConfig, data_dir: str | None) -> list[Record]:
    from forgetless.data import load_records

    return load_records(anchor.source, split=anchor.split, data_dir=data_dir, limit=anchor.samples)
