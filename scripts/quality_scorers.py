"""How each quality scorer of `forgetless mix` scores real text and three kinds of junk
(docs/mix.md, "Quality pruning, measured")::

    python scripts/quality_scorers.py --data-dir ../shared/data

Real documents: the first ``--per-source`` of each source; junk: ``--junk`` documents of each
kind, generated as in tests/test_mix_quality.py. Per group it prints each scorer's median and
the share of documents kept at the default threshold (0.5 for rules and heuristic; for
perplexity, the median perplexity of the real documents, since no single threshold is
portable across models).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.test_mix_quality

JUNK_KINDS = ("random characters", "navigation boilerplate", "repeated line")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sources", nargs="+", default=["c4", "pubmedqa@train", "nwgi@test"])
    parser.add_argument("--per-source", type=int, default=40)
    parser.add_argument("--junk", type=int, default=10, help="Junk documents of each kind.")
    args = parser.parse_args()

    from forgetless.mix.config import PerplexityScorerConfig
    from forgetless.mix.corpus import load_corpus
    from forgetless.mix.quality import heuristic_score, perplexity_scores, rules_score
    from tests.test_mix_quality import junk_documents

    corpus = load_corpus(args.sources, args.per_source, args.data_dir)
    groups: dict[str, list[str]] = {}
    for source, text in zip(corpus.sources, corpus.texts, strict=True):
        groups.setdefault(source, []).append(text)
    junk = junk_documents(3 * args.junk)
    for offset, kind in enumerate(JUNK_KINDS):
        groups[f"junk: {kind}"] = junk[offset::3]

    texts = [text for members in groups.values() for text in members]
    perplexities = iter(perplexity_scores(texts, PerplexityScorerConfig(), "float32", "cpu"))
    rows = []
    for name, members in groups.items():
        scores = {
            "rules": [rules_score(text) for text in members],
            "heuristic": [heuristic_score(text) for text in members],
            "perplexity": [float(next(perplexities)) for _ in members],
        }
        rows.append((name, scores))
    real = [p for name, s in rows if not name.startswith("junk") for p in s["perplexity"]]
    real_median = statistics.median(real)
    print(
        f"{len(texts)} documents; kept = rules/heuristic >= 0.5, perplexity (SmolLM2-135M) <= "
        f"{real_median:.1f} (the real documents' median)\n"
    )
    print("| documents | n | rules median | rules kept | heuristic median | heuristic kept | "
          "perplexity median | perplexity kept |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, scores in rows:
        kept = {
            "rules": sum(value >= 0.5 for value in scores["rules"]),
            "heuristic": sum(value >= 0.5 for value in scores["heuristic"]),
            "perplexity": sum(value <= real_median for value in scores["perplexity"]),
        }
        n = len(scores["rules"])
        print(
            f"| {name} | {n} | {statistics.median(scores['rules']):.2f} | "
            f"{kept['rules']}/{n} | {statistics.median(scores['heuristic']):.2f} | "
            f"{kept['heuristic']}/{n} | {statistics.median(scores['perplexity']):.1f} | "
            f"{kept['perplexity']}/{n} |"
        )


if __name__ == "__main__":
    main()
