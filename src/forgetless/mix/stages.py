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
                "super_clusters",
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


SEARCH_DIR = "search"
MIXTURE_FILE = "mixture.json"
SEARCH_SETTINGS = (
    "targets",
    "target_limit",
    "proxy",
    "proxy_model",
    "proxy_tokens",
    "proxy_batch_size",
    "proxy_max_length",
    "proxy_learning_rate",
    "rounds",
    "candidates",
    "dirichlet_strengths",
    "weight_cap",
    "min_weight",
    "predictor_iterations",
    "predictor_learning_rate",
    "predictor_max_depth",
    "repetition_cap",
    "seed",
)


def load_groups(clusters_dir: Path) -> np.ndarray:
    clustering = np.load(clusters_dir / CLUSTERING_FILE)
    return clustering["super_of_cluster"][clustering["assignment"]]


def run_mixture_search(
    config: ForgetlessConfig,
    output_dir: str | Path,
    *,
    progress: bool = True,
    propose_only: bool = False,
    on_event=None,
) -> dict[str, Any]:
    """Cluster (cached), then run or resume the mixture search in ``<output_dir>/search``.

    ``propose_only`` writes the next round's mixtures to ``search/mixtures.csv`` and stops, for
    proxy runs done elsewhere: add their rows to ``search/metrics.csv`` and run again.
    """
    import json

    from forgetless.errors import ForgetlessError
    from forgetless.mix.corpus import load_corpus
    from forgetless.mix.proxy import LanguageModelProxy, load_target_texts
    from forgetless.mix.search import prior_from_tokens, run_search

    load_target_texts(config)  # target mistakes surface before any clustering work
    results = run_clustering(config, output_dir, progress=progress, on_event=on_event)
    clusters = results["clusters"]
    directory = Path(output_dir) / SEARCH_DIR
    directory.mkdir(parents=True, exist_ok=True)
    identity = {
        "clusters": clusters.fingerprint,
        **config.mix.model_dump(mode="json", include=set(SEARCH_SETTINGS)),
    }
    settings_file = directory / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != identity:
        raise ForgetlessError(
            f"{directory} holds a search with other settings or clusters; "
            "use another output directory or delete it"
        )
    write_json_atomic(settings_file, identity)
    corpus = load_corpus(config)
    groups = load_groups(clusters.directory)
    proxy = LanguageModelProxy(config, corpus, groups, progress=False)
    cluster_tokens = proxy.cluster_tokens()
    outcome = run_search(
        config.mix,
        prior_from_tokens(cluster_tokens),
        directory,
        None if propose_only else proxy,
        progress=progress,
    )
    outcome["cluster_tokens"] = cluster_tokens.tolist()
    if outcome["status"] == "done":
        report = json.loads((clusters.directory / "report.json").read_text())
        mixture = {
            "weights": outcome["final"]["weights"],
            "predicted_objective": outcome["final"]["predicted_objective"],
            "prior": outcome["prior"],
            "targets": config.mix.targets,
            "super_clusters": [
                {key: cluster[key] for key in ("id", "documents", "sources", "top_terms")}
                for cluster in report["super_clusters"]
            ],
        }
        write_json_atomic(directory / MIXTURE_FILE, mixture)
        write_json_atomic(directory / "search.json", outcome)
    return outcome


def materialise_mixture(
    config: ForgetlessConfig,
    output_dir: str | Path,
    tokens: int,
    target: str | Path,
    weights: list[float] | None = None,
) -> dict[str, Any]:
    """Write ``tokens`` tokens (of ``config.model``'s tokenizer) of the pool, sampled by the
    searched (or given) weights, as jsonl rows ``{"text", "id", "super_cluster"}``; returns a
    summary."""
    import json

    from forgetless.errors import ForgetlessError
    from forgetless.mix.corpus import load_corpus
    from forgetless.mix.sampler import sample_mixture
    from forgetless.models import load_tokenizer

    clusters_dir = Path(output_dir) / "clusters"
    mixture_file = Path(output_dir) / SEARCH_DIR / MIXTURE_FILE
    if weights is None:
        if not mixture_file.is_file():
            raise ForgetlessError(f"no {mixture_file}: run `forgetless mix search` first")
        weights = json.loads(mixture_file.read_text())["weights"]
    if not (clusters_dir / CLUSTERING_FILE).is_file():
        raise ForgetlessError(f"no clustering in {clusters_dir}: run `forgetless mix cluster`")
    groups = load_groups(clusters_dir)
    if len(weights) != int(groups.max()) + 1:
        raise ForgetlessError(f"{len(weights)} weights for {int(groups.max()) + 1} super-clusters")
    corpus = load_corpus(config)
    if len(corpus) != len(groups):
        raise ForgetlessError("the pool changed since it was clustered; cluster it again")
    # Tokens of the model that will train on the set, not of the proxy.
    tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
    lengths = tokenizer(corpus.texts, add_special_tokens=False)["input_ids"]
    document_tokens = np.array([len(ids) + 1 for ids in lengths], dtype=np.float64)
    sample = sample_mixture(
        document_tokens,
        groups,
        np.asarray(weights, dtype=np.float64),
        tokens,
        repetition_cap=config.mix.repetition_cap,
        seed=config.mix.seed,
    )
    lines = [
        json.dumps(
            {"text": corpus.texts[i], "id": corpus.ids[i], "super_cluster": int(groups[i])},
            ensure_ascii=False,
        )
        for i in sample.documents
    ]
    write_text_atomic(Path(target), "\n".join(lines) + "\n")
    return {
        "documents": len(lines),
        "unique_documents": len(set(sample.documents.tolist())),
        "tokens": float(sample.tokens_per_cluster.sum()),
        "tokens_per_super_cluster": sample.tokens_per_cluster.tolist(),
        "short_super_clusters": sample.short_clusters,
    }
