"""The cluster report: what each super-cluster holds, and what was pruned."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from forgetless.mix.cluster import Clustering
from forgetless.mix.config import SearchConfig
from forgetless.mix.corpus import Corpus

EXAMPLES = 3
EXAMPLE_CHARS = 160


def _top_terms(texts: list[str], groups: np.ndarray, count: int, terms: int) -> list[list[str]]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(
        stop_words="english", max_features=20000, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b"
    )
    try:
        matrix = vectorizer.fit_transform(texts)
    except ValueError:  # no term survives (e.g. numbers only)
        return [[] for _ in range(count)]
    vocabulary = np.array(vectorizer.get_feature_names_out())
    top = []
    for group in range(count):
        rows = np.flatnonzero(groups == group)
        weights = np.asarray(matrix[rows].mean(axis=0)).ravel()
        top.append(vocabulary[np.argsort(-weights, kind="stable")[:terms]].tolist())
    return top


def build_cluster_report(
    corpus: Corpus,
    embeddings: np.ndarray,
    clustering: Clustering,
    top_terms: int,
    thresholds: dict[str, float],
    document_thresholds: dict[str, float],
    k_rule: str,
) -> dict[str, Any]:
    groups = clustering.document_super
    count = clustering.super_count
    kept_rows = np.flatnonzero(groups >= 0)
    texts = [corpus.texts[i] for i in kept_rows]
    terms = _top_terms(texts, groups[kept_rows], count, top_terms)
    words = np.array([len(text.split()) for text in corpus.texts])
    super_clusters = []
    for group in range(count):
        rows = np.flatnonzero(groups == group)
        direction = embeddings[rows].mean(axis=0)
        closest = rows[np.argsort(-(embeddings[rows] @ direction), kind="stable")[:EXAMPLES]]
        super_clusters.append(
            {
                "id": group,
                "documents": len(rows),
                "words": int(words[rows].sum()),
                "fine_clusters": int((clustering.super_of_cluster == group).sum()),
                "sources": dict(Counter(corpus.sources[i] for i in rows).most_common()),
                "top_terms": terms[group],
                "examples": [corpus.texts[i][:EXAMPLE_CHARS] for i in closest],
            }
        )
    pruned_rows = np.flatnonzero(groups < 0)
    pruned_clusters = []
    for cluster in np.flatnonzero(~clustering.kept & (clustering.sizes > 0)).tolist():
        rows = np.flatnonzero(clustering.assignment == cluster)
        pruned_clusters.append(
            {
                "cluster": cluster,
                "documents": len(rows),
                "scores": {
                    name: float(values[cluster])
                    for name, values in clustering.cluster_scores.items()
                },
                "sources": dict(Counter(corpus.sources[i] for i in rows).most_common()),
                "examples": [corpus.texts[i][:EXAMPLE_CHARS] for i in rows[:EXAMPLES]],
            }
        )
    # Documents dropped on their own score from clusters that were kept.
    dropped_rows = np.flatnonzero(clustering.dropped & clustering.kept[clustering.assignment])
    return {
        "documents": len(corpus),
        "fine_clusters": len(clustering.kept),
        "k_rule": k_rule,
        "kept_clusters": int(clustering.kept.sum()),
        "pruned_documents": len(pruned_rows),
        "pruned_sources": dict(Counter(corpus.sources[i] for i in pruned_rows).most_common()),
        "pruned_clusters": pruned_clusters,
        "dropped_documents": len(dropped_rows),
        "dropped_examples": [corpus.texts[i][:EXAMPLE_CHARS] for i in dropped_rows[:EXAMPLES]],
        "thresholds": thresholds,
        "document_thresholds": document_thresholds,
        "super_clusters": super_clusters,
    }


def render_cluster_report(report: dict[str, Any]) -> str:
    def clean(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = [
        "# Cluster report",
        "",
        f"{report['documents']} documents, {report['fine_clusters']} k-means clusters "
        f"({report['k_rule']}), {report['kept_clusters']} kept by the quality thresholds "
        f"{report['thresholds']}, merged into {len(report['super_clusters'])} super-clusters. "
        f"Pruned: {report['pruned_documents']} documents {report['pruned_sources']}, "
        f"{report['dropped_documents']} of them on their own score "
        f"{report['document_thresholds']} from kept clusters.",
        "",
        "| super-cluster | documents | words | clusters | sources | top terms | example |",
        "|---|---|---|---|---|---|---|",
    ]
    for cluster in report["super_clusters"]:
        sources = ", ".join(f"{name} {n}" for name, n in cluster["sources"].items())
        example = clean(cluster["examples"][0]) if cluster["examples"] else ""
        lines.append(
            f"| {cluster['id']} | {cluster['documents']} | {cluster['words']} | "
            f"{cluster['fine_clusters']} | {sources} | {', '.join(cluster['top_terms'])} | "
            f"{example} |"
        )
    if report["pruned_clusters"]:
        lines += [
            "",
            "## Pruned clusters",
            "",
            "| cluster | documents | mean scores | sources | examples |",
            "|---|---|---|---|---|",
        ]
        for cluster in report["pruned_clusters"]:
            scores = ", ".join(f"{name} {value:.3g}" for name, value in cluster["scores"].items())
            sources = ", ".join(f"{name} {n}" for name, n in cluster["sources"].items())
            examples = " / ".join(clean(text) for text in cluster["examples"])
            lines.append(
                f"| {cluster['cluster']} | {cluster['documents']} | {scores} | {sources} | "
                f"{examples} |"
            )
    if report["dropped_examples"]:
        lines += ["", "Dropped from kept clusters, for example:", ""]
        lines += [f"- {clean(text)}" for text in report["dropped_examples"]]
    return "\n".join(lines) + "\n"


def _number(value: float | None, form: str = ".4f") -> str:
    return "–" if value is None else format(value, form)


def _verification_lines(final: dict[str, Any], noise: float | None) -> list[str]:
    candidates = final["verification"]
    tasks = list(next(iter(candidates.values()))["losses"])
    headers = [*(f"{task} ppl" for task in tasks), *(["keeps constraints"] if tasks else [])]
    lines = [
        "",
        "Verification: each candidate trained under fresh proxy seeds; mean (± std) of its "
        "runs. The final mixture is the candidate that keeps every constraint with the lower "
        "objective" + (f" (seed noise of the reference: {_number(noise)})." if noise else "."),
        "",
        "| " + " | ".join(["candidate", "runs", "objective", *headers, "final"]) + " |",
        "|---" * (4 + len(headers)) + "|",
    ]
    for name, row in candidates.items():
        cells = [
            name.replace("_", " "),
            str(row["runs"]),
            f"{row['objective']:.4f} ± {_number(row['objective_std'])}",
            *(f"{math.exp(row['losses'][task]):.3f}" for task in tasks),
        ]
        if tasks:
            cells.append("yes" if row["keeps_constraints"] else "no")
        cells.append("yes" if name == final["chosen"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_search_report(outcome: dict[str, Any], search: SearchConfig) -> str:
    """The search's rounds next to the proxies' seed noise, the constraints and the final
    mixture."""
    lines = [
        "# Mixture search",
        "",
        f"Objective: {search.targets} (weighted mean token loss of the proxy; lower is better).",
        "",
    ]
    reference = outcome.get("reference")
    noise = reference["objective"]["std"] if reference else None
    if reference:
        lines += [
            f"Seed noise: the reference (natural) mixture trained under {len(reference['runs'])} "
            f"proxy seeds has objective {reference['objective']['mean']:.4f} ± "
            f"{_number(noise)} (standard deviation). A round whose spread is not well above it "
            "cannot be ranked by any predictor, and a cross-validated error near it is at the "
            "noise floor.",
            "",
        ]
    lines += [
        "| round | proxy runs | best | mean | spread (std) | spread / noise "
        "| Spearman on the round | Spearman cross-validated | RMSE cross-validated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in outcome["rounds"]:
        spread = entry.get("std_objective")
        ratio = None if spread is None or not noise else spread / noise
        lines.append(
            f"| {entry['round']} | {entry['runs']} | {entry['best_objective']:.4f} | "
            f"{entry['mean_objective']:.4f} | {_number(spread)} | {_number(ratio, '.1f')} | "
            f"{_number(entry.get('spearman_held_out'), '+.2f')} | "
            f"{_number(entry.get('spearman_cross_validated'), '+.2f')} | "
            f"{_number(entry.get('rmse_cross_validated'))} |"
        )
    constraints = outcome.get("constraints")
    if constraints:
        lines += [
            "",
            "## Retention constraints",
            "",
            "Each constrained task's proxy perplexity may rise at most the given share above "
            "the reference mixture's (geometric mean over its seeds). The search ranks "
            "mixtures predicted to keep every one first.",
            "",
            "| task | max increase | reference ppl | limit ppl | final, predicted ppl |",
            "|---|---|---|---|---|",
        ]
        for task, row in constraints.items():
            lines.append(
                f"| {task} | {row['max_relative_increase']:+.1%} | "
                f"{row['reference_perplexity']:.3f} | {row['limit_perplexity']:.3f} | "
                f"{row['final_predicted_perplexity']:.3f} |"
            )
    final, best = outcome["final"], outcome["best_observed"]
    low, high = final["top_k_predicted_objective"]
    lines += [
        "",
        "## Final mixture",
        "",
        f"The predicted mixture: the mean of the predictor's best {final['top_k']} of "
        f"{search.candidates} fresh draws (their predicted objectives {low:.4f} to "
        f"{high:.4f}); predicted objective {final['predicted_objective']:.4f}. Best proxy run "
        f"observed: {best['id']}, objective {best['objective']:.4f}.",
    ]
    if "feasible" in final:
        lines.append(
            f"Predicted to satisfy every constraint: {'yes' if final['feasible'] else 'no'} "
            f"({final['feasible_candidates']} of the draws were)."
        )
    if "verification" in final:
        lines += _verification_lines(final, noise)
    weights = ", ".join(f"{index}: {w:.3f}" for index, w in enumerate(final["weights"]))
    lines += ["", f"Weights per super-cluster: {weights}."]
    return "\n".join(lines) + "\n"
