"""Clustering runs: embeddings -> quality scores -> clusters, cached in a run directory."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.config import ForgetlessConfig
from forgetless.pipeline import (
    RunDirectory,
    Stage,
    StageResult,
    write_json_atomic,
    write_text_atomic,
)

CLUSTERING_FILE = "clustering.npz"
ASSIGNMENTS_FILE = "assignments.csv"


def _pool_settings(config: ForgetlessConfig) -> dict[str, Any]:
    mix = config.mix
    return {"sources": mix.sources, "limit_per_source": mix.limit_per_source}


class EmbedStage(Stage):
    name = "embeddings"

    def __init__(self, config: ForgetlessConfig, progress: bool = True):
        self.config, self.progress = config, progress

    def settings(self) -> dict[str, Any]:
        mix = self.config.mix
        return {**_pool_settings(self.config), "embedder": mix.embedder, "shard": mix.shard_size}

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.mix.corpus import load_corpus
        from forgetless.mix.embed import embed_corpus
        from forgetless.models import resolve_device

        corpus = load_corpus(self.config)
        device = str(resolve_device(self.config.model.device))
        vectors = embed_corpus(
            corpus, self.config.mix, workdir, device=device, progress=self.progress
        )
        return {"documents": len(corpus), "dimension": int(vectors.shape[1])}


class QualityStage(Stage):
    name = "quality"

    def __init__(self, config: ForgetlessConfig, progress: bool = True):
        self.config, self.progress = config, progress

    def settings(self) -> dict[str, Any]:
        mix = self.config.mix
        scorers = sorted(mix.quality_thresholds)
        settings: dict[str, Any] = {**_pool_settings(self.config), "scorers": scorers}
        if "perplexity" in scorers:
            settings["perplexity"] = [mix.reference_model, mix.perplexity_max_length]
        if "fasttext" in scorers:
            settings["fasttext"] = [mix.fasttext_model, mix.fasttext_label]
        return settings

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.mix.corpus import load_corpus
        from forgetless.mix.quality import score_documents

        corpus = load_corpus(self.config)
        scores = score_documents(corpus.texts, self.config, progress=self.progress)
        np.savez(workdir / "scores.npz", **scores)
        return {
            name: {"mean": float(np.nanmean(np.where(np.isfinite(v), v, np.nan)))}
            for name, v in scores.items()
        }


class ClusterStage(Stage):
    name = "clusters"
    depends_on = ("embeddings", "quality")

    def __init__(self, config: ForgetlessConfig):
        self.config = config

    def settings(self) -> dict[str, Any]:
        mix = self.config.mix
        return mix.model_dump(
            mode="json",
            include={
                "clusters",
                "min_cluster_size",
                "kmeans_iterations",
                "quality_thresholds",
                "merge_distance",
                "top_terms",
                "seed",
            },
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.mix.cluster import cluster_corpus
        from forgetless.mix.corpus import load_corpus
        from forgetless.mix.embed import load_embeddings
        from forgetless.mix.report import build_cluster_report, render_cluster_report

        corpus = load_corpus(self.config)
        embeddings = np.asarray(load_embeddings(inputs["embeddings"].directory))
        scores = dict(np.load(inputs["quality"].directory / "scores.npz").items())
        clustering = cluster_corpus(embeddings, scores, self.config.mix)
        np.savez(
            workdir / CLUSTERING_FILE,
            centroids=clustering.centroids,
            assignment=clustering.assignment,
            kept=clustering.kept,
            super_of_cluster=clustering.super_of_cluster,
            **{f"score_{name}": values for name, values in clustering.cluster_scores.items()},
        )
        with open(workdir / ASSIGNMENTS_FILE, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "source", "cluster", "super_cluster"])
            for row, document in enumerate(corpus.ids):
                writer.writerow(
                    [
                        document,
                        corpus.sources[row],
                        int(clustering.assignment[row]),
                        int(clustering.document_super[row]),
                    ]
                )
        report = build_cluster_report(corpus, embeddings, clustering, self.config.mix)
        write_json_atomic(workdir / "report.json", report)
        write_text_atomic(workdir / "report.md", render_cluster_report(report))
        return {
            "documents": len(corpus),
            "clusters": len(clustering.kept),
            "kept_clusters": int(clustering.kept.sum()),
            "super_clusters": clustering.super_count,
            "pruned_documents": report["pruned_documents"],
        }


def clustering_stages(config: ForgetlessConfig, progress: bool = True) -> list[Stage]:
    return [EmbedStage(config, progress), QualityStage(config, progress), ClusterStage(config)]


def run_clustering(
    config: ForgetlessConfig, output_dir: str | Path, *, progress: bool = True, on_event=None
) -> dict[str, StageResult]:
    """Embed, score, cluster, prune and merge ``config.mix.sources`` into ``output_dir``."""
    from forgetless.mix.corpus import load_corpus

    load_corpus(config)  # data mistakes surface before any model is loaded
    runs = RunDirectory(Path(output_dir), on_event=on_event or (lambda event, info: None))
    return runs.run_all(clustering_stages(config, progress))
