"""The cluster report: what each super-cluster holds, and what was pruned."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from forgetless.mix.cluster import Clustering
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
    return {
        "documents": len(corpus),
        "fine_clusters": len(clustering.kept),
        "kept_clusters": int(clustering.kept.sum()),
        "pruned_documents": len(pruned_rows),
        "pruned_sources": dict(Counter(corpus.sources[i] for i in pruned_rows).most_common()),
        "pruned_examples": [corpus.texts[i][:EXAMPLE_CHARS] for i in pruned_rows[:EXAMPLES]],
        "thresholds": thresholds,
        "super_clusters": super_clusters,
    }


def render_cluster_report(report: dict[str, Any]) -> str:
    def clean(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = [
        "# Cluster report",
        "",
        f"{report['documents']} documents, {report['fine_clusters']} k-means clusters, "
        f"{report['kept_clusters']} kept by the quality thresholds {report['thresholds']}, "
        f"merged into {len(report['super_clusters'])} super-clusters. Pruned: "
        f"{report['pruned_documents']} documents {report['pruned_sources']}.",
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
    if report["pruned_examples"]:
        lines += ["", "Pruned, for example:", ""]
        lines += [f"- {clean(text)}" for text in report["pruned_examples"]]
    return "\n".join(lines) + "\n"
