"""OSFT's preserved-rank tables under each importance and rank mapping, from calibration
forward passes only (no training)::

    python benchmarks/osft_ranks.py                          # SmolLM2-135M, 16 C4 sequences
    python benchmarks/osft_ranks.py --trr 0.5 0.9 --json ranks.json

For every (importance, rank mapping, trr) it prints the table ``forgetless train --method osft``
prints, the spread of the preserved ratio over the matrices, how many ranks hit the clamp
``min(m, n) − 1``, and the trainable fraction under each projection. The SVDs and the two
importances are computed once and shared by all the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

IMPORTANCES = ("block", "matrix")
MAPPINGS = ("mean", "quantile")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="c4", help="Calibration data set (osft default).")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--samples", type=int, default=16, help="osft.calibration_samples")
    parser.add_argument("--max-length", type=int, default=128, help="train.max_length")
    parser.add_argument("--trr", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--json", help="Also write every table's ranks and importances here.")
    args = parser.parse_args()

    import torch

    from forgetless.data import load_records
    from forgetless.models import load_model
    from forgetless.train.config import OsftConfig
    from forgetless.train.osft import (
        calibration_batches,
        choose_ranks,
        format_rank_table,
        layer_importance,
        target_modules,
        thin_svd,
        trainable_directions,
    )

    started = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_model(args.model, dtype="float32")
    records = load_records(args.data, data_dir=args.data_dir, limit=args.samples)
    calibration = calibration_batches(loaded.tokenizer, records, args.max_length, args.samples)
    modules = target_modules(loaded.model, OsftConfig().target_modules)
    svds = {name: thin_svd(module.weight) for name, module in modules.items()}
    scores = {
        kind: layer_importance(loaded.model, modules, calibration, kind, svds)
        for kind in IMPORTANCES
    }
    print(f"calibration: {len(calibration)} x {args.max_length} tokens of {args.data}")
    for kind, importance in scores.items():
        values = list(importance.values())
        print(
            f"importance {kind}: min {min(values):.3f} mean {statistics.fmean(values):.3f} "
            f"max {max(values):.3f} sd {statistics.pstdev(values):.3f}"
        )
    results = []
    for trr in args.trr:
        for kind in IMPORTANCES:
            for mapping in MAPPINGS:
                config = OsftConfig(importance=kind, rank_mapping=mapping, trr=trr)
                choices = choose_ranks(modules, config, scores[kind])
                clamped = sum(c.rank == min(c.shape) - 1 for c in choices)
                weights = sum(c.shape[0] * c.shape[1] for c in choices)
                trainable = {
                    projection: sum(
                        trainable_directions(c.shape, c.rank, projection) for c in choices
                    )
                    / weights
                    for projection in ("two_sided", "top_block")
                }
                print(f"\n## importance={kind} rank_mapping={mapping} trr={trr:g}")
                print(format_rank_table(choices, "two_sided"))
                print(
                    f"clamped to min(m, n) - 1: {clamped} of {len(choices)}; trainable "
                    f"two_sided {trainable['two_sided']:.1%}, top_block "
                    f"{trainable['top_block']:.1%}"
                )
                results.append(
                    {
                        "importance": kind,
                        "rank_mapping": mapping,
                        "trr": trr,
                        "clamped": clamped,
                        "trainable": trainable,
                        "ranks": [c.__dict__ for c in choices],
                    }
                )
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
