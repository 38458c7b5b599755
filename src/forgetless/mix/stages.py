"""Mixture runs: embeddings -> quality scores -> clusters -> [search] -> a sampled training
set, each a stage cached in a run directory.

Every stage's settings are whole sections of ``mix`` (plus the few shared values it reads,
such as the seed), so a change to a section recomputes exactly the stages that read it.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_file, write_json_atomic, write_text_atomic
from forgetless.mix import methods as _methods  # noqa: F401  (registers the mixtures)
from forgetless.mix.config import (
    ClusterConfig,
    EmbedConfig,
    FasttextScorerConfig,
    MixConfig,
    PerplexityScorerConfig,
    SearchConfig,
)
from forgetless.mix.corpus import Corpus, load_corpus
from forgetless.model_config import ModelConfig
from forgetless.registry import lookup
from forgetless.runs import Stage, StageResult, StageSettings, run_directory
from forgetless.schema import LOCAL_CHECKPOINT

CLUSTERING_FILE = "clustering.npz"
ASSIGNMENTS_FILE = "assignments.csv"
SEARCH_DIR = "search"
MIXTURE_FILE = "mixture.json"
SAMPLE_FILE = "records.jsonl"


class PoolSpec(StageSettings):
    sources: tuple[str, ...]
    limit_per_source: int | None


class Mixture:
    """One mixture's settings and where it runs (shared by its stages)."""

    def __init__(
        self,
        model: ModelConfig,
        mix: MixConfig,
        *,
        data_dir: str | None = None,
        progress: bool = True,
    ):
        self.model, self.mix, self.data_dir, self.progress = model, mix, data_dir, progress
        self.pool = PoolSpec(sources=tuple(mix.sources), limit_per_source=mix.limit_per_source)
        self.method = lookup("mix", mix.method).implementation

    def corpus(self) -> Corpus:
        return load_corpus(self.pool.sources, self.pool.limit_per_source, self.data_dir)

    def device(self) -> str:
        from forgetless.models import resolve_device

        return str(resolve_device(self.model.device))


class EmbedSettings(StageSettings):
    pool: PoolSpec
    embed: EmbedConfig


class EmbedStage(Stage):
    name = "embeddings"

    def __init__(self, mixture: Mixture):
        self.mixture = mixture

    def settings(self) -> EmbedSettings:
        return EmbedSettings(pool=self.mixture.pool, embed=self.mixture.mix.embed)

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.mix.embed import embed_documents

        corpus = self.mixture.corpus()
        vectors = embed_documents(
            corpus.texts,
            corpus.ids,
            self.mixture.mix.embed,
            workdir,
            engine=self.mixture.mix.engine,
            device=self.mixture.device(),
            progress=self.mixture.progress,
        )
        return {"documents": len(corpus), "dimension": int(vectors.shape[1])}


class QualitySettings(StageSettings):
    pool: PoolSpec
    scorers: tuple[str, ...]
    # A model-based scorer's settings, present only when the thresholds use it.
    perplexity: PerplexityScorerConfig | None
    fasttext: FasttextScorerConfig | None
    dtype: str


class QualityStage(Stage):
    name = "quality"

    def __init__(self, mixture: Mixture):
        from forgetless.mix.quality import check_scorers

        self.mixture = mixture
        self.scorers = tuple(check_scorers(mixture.mix.quality))

    def settings(self) -> QualitySettings:
        quality = self.mixture.mix.quality
        return QualitySettings(
            pool=self.mixture.pool,
            scorers=self.scorers,
            perplexity=quality.perplexity if "perplexity" in self.scorers else None,
            fasttext=quality.fasttext if "fasttext" in self.scorers else None,
            dtype=self.mixture.model.dtype,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.mix.quality import score_documents

        settings = self.settings()
        scores = score_documents(
            self.mixture.corpus().texts,
            settings.scorers,
            settings.perplexity,
            settings.fasttext,
            dtype=settings.dtype,
            device=self.mixture.model.device,
            progress=self.mixture.progress,
        )
        with atomic_file(workdir / "scores.npz", "wb") as out:
            np.savez(out, **scores)
        return {
            name: {"mean": float(np.nanmean(np.where(np.isfinite(v), v, np.nan)))}
            for name, v in scores.items()
        }


class ClusterSettings(StageSettings):
    cluster: ClusterConfig
    thresholds: dict[str, float]
    document_thresholds: dict[str, float]
    seed: int


class ClusterStage(Stage):
    name = "clusters"
    depends_on = ("embeddings", "quality")

    def __init__(self, mixture: Mixture):
        self.mixture = mixture

    def settings(self) -> ClusterSettings:
        mix = self.mixture.mix
        return ClusterSettings(
            cluster=mix.cluster,
            thresholds=mix.quality.thresholds,
            document_thresholds=mix.quality.document_thresholds,
            seed=mix.seed,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        from forgetless.mix.cluster import cluster_corpus, describe_k
        from forgetless.mix.embed import load_embeddings
        from forgetless.mix.report import build_cluster_report, render_cluster_report

        settings = self.settings()
        corpus = self.mixture.corpus()
        # Memory-mapped: clustering reads it a block at a time, Ray workers from its file.
        embeddings = load_embeddings(inputs["embeddings"].directory)
        scores = dict(np.load(inputs["quality"].directory / "scores.npz").items())
        clustering = cluster_corpus(
            embeddings,
            scores,
            settings.cluster,
            settings.thresholds,
            settings.seed,
            engine=self.mixture.mix.engine,
            document_thresholds=settings.document_thresholds,
        )
        with atomic_file(workdir / CLUSTERING_FILE, "wb") as out:
            np.savez(
                out,
                centroids=clustering.centroids,
                assignment=clustering.assignment,
                kept=clustering.kept,
                super_of_cluster=clustering.super_of_cluster,
                dropped=clustering.dropped,
                **{f"score_{name}": values for name, values in clustering.cluster_scores.items()},
            )
        with atomic_file(workdir / ASSIGNMENTS_FILE) as handle:
            writer = csv.writer(handle, lineterminator="\n")
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
        report = build_cluster_report(
            corpus,
            embeddings,
            clustering,
            settings.cluster.top_terms,
            settings.thresholds,
            settings.document_thresholds,
            describe_k(len(corpus), settings.cluster, len(clustering.kept)),
        )
        write_json_atomic(workdir / "report.json", report)
        write_text_atomic(workdir / "report.md", render_cluster_report(report))
        return {
            "documents": len(corpus),
            "clusters": len(clustering.kept),
            "k_rule": report["k_rule"],
            "kept_clusters": int(clustering.kept.sum()),
            "super_clusters": clustering.super_count,
            "pruned_documents": report["pruned_documents"],
        }


def load_groups(clusters_dir: Path) -> np.ndarray:
    """The super-cluster of every document of the pool (-1 where pruned)."""
    clustering = np.load(clusters_dir / CLUSTERING_FILE)
    return np.where(
        clustering["dropped"], -1, clustering["super_of_cluster"][clustering["assignment"]]
    )


class SearchSettings(StageSettings):
    search: SearchConfig
    seed: int
    repetition_cap: float  # the proxies' training text is sampled like the final set


def search_mixture(
    mixture: Mixture, clusters: StageResult, directory: Path, *, propose_only: bool = False
) -> dict[str, Any]:
    """Run or resume the weight search over ``clusters`` in ``directory``; once done, write
    ``mixture.json`` there. ``propose_only`` stops at the first round that needs proxy runs."""
    from forgetless.mix.proxy import LanguageModelProxy
    from forgetless.mix.search import prior_from_tokens, run_search

    mix = mixture.mix
    groups = load_groups(clusters.directory)
    proxy = LanguageModelProxy(
        mix.search,
        mix.seed,
        mix.repetition_cap,
        mixture.corpus(),
        groups,
        device=mixture.model.device,
        data_dir=mixture.data_dir,
    )
    cluster_tokens = proxy.cluster_tokens()
    outcome = run_search(
        mix.search,
        mix.seed,
        prior_from_tokens(cluster_tokens),
        directory,
        None if propose_only else proxy,
        reference=cluster_tokens / cluster_tokens.sum(),  # the natural mixture
        progress=mixture.progress,
    )
    outcome["cluster_tokens"] = cluster_tokens.tolist()
    if outcome["status"] == "done":
        from forgetless.mix.report import render_search_report

        report = json.loads((clusters.directory / "report.json").read_text())
        mixture_file = {
            "weights": outcome["final"]["weights"],
            "predicted_objective": outcome["final"]["predicted_objective"],
            # "predicted", or "best_observed" where the predicted mixture measured worse.
            "chosen": outcome["final"].get("chosen", "predicted"),
            "prior": outcome["prior"],
            "targets": mix.search.targets,
            "constraints": outcome.get("constraints", {}),
            "super_clusters": [
                {key: cluster[key] for key in ("id", "documents", "sources", "top_terms")}
                for cluster in report["super_clusters"]
            ],
        }
        write_json_atomic(directory / MIXTURE_FILE, mixture_file)
        write_json_atomic(directory / "search.json", outcome)
        write_text_atomic(directory / "report.md", render_search_report(outcome, mix.search))
    return outcome


class SearchStage(Stage):
    """The mixture-weight search; proxy runs are cached in the stage's folder by mixture."""

    name = "search"
    depends_on = ("clusters",)

    def __init__(self, mixture: Mixture):
        self.mixture = mixture

    def settings(self) -> SearchSettings:
        mix = self.mixture.mix
        return SearchSettings(search=mix.search, seed=mix.seed, repetition_cap=mix.repetition_cap)

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        outcome = search_mixture(self.mixture, inputs["clusters"], workdir)
        summary = {
            "weights": outcome["final"]["weights"],
            "predicted_objective": outcome["final"]["predicted_objective"],
            "chosen": outcome["final"].get("chosen", "predicted"),
            "rounds": outcome["rounds"],
        }
        if "reference" in outcome:
            summary["noise_std"] = outcome["reference"]["objective"]["std"]
        if "constraints" in outcome:
            summary["constraints"] = outcome["constraints"]
        return summary


def sample_training_set(
    corpus: Corpus,
    groups: np.ndarray,
    weights: np.ndarray,
    tokens: int,
    model: ModelConfig,
    *,
    repetition_cap: float,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``tokens`` tokens (of ``model``'s tokenizer) of the pool drawn by ``weights``: rows
    ``{"text", "id", "super_cluster"}`` and a summary."""
    from forgetless.mix.sampler import sample_mixture

    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ForgetlessError(f"mixture weights must be finite, non-negative, not all 0: {weights}")
    document_tokens = _document_tokens(corpus, model)
    sample = sample_mixture(
        document_tokens, groups, weights, tokens, repetition_cap=repetition_cap, seed=seed
    )
    if not len(sample.documents):
        shortest = int(document_tokens[groups >= 0].min()) if (groups >= 0).any() else 0
        raise ForgetlessError(
            f"a budget of {tokens} tokens draws no document (the shortest kept one has "
            f"{shortest} tokens); raise the token budget (mix.tokens, or --tokens)"
        )
    rows, drawn = [], Counter()
    for i in sample.documents.tolist():
        # A document repeated by the sampler gets an id per copy: stages downstream (a
        # selection's gradient features) key samples by id.
        repeat = drawn[i]
        drawn[i] += 1
        identifier = corpus.ids[i] if repeat == 0 else f"{corpus.ids[i]}#copy{repeat}"
        rows.append({"text": corpus.texts[i], "id": identifier, "super_cluster": int(groups[i])})
    summary = {
        "documents": len(rows),
        "unique_documents": len(set(sample.documents.tolist())),
        "tokens": float(sample.tokens_per_cluster.sum()),
        "tokens_per_super_cluster": sample.tokens_per_cluster.tolist(),
        "short_super_clusters": sample.short_clusters,
    }
    return rows, summary


def _document_tokens(corpus: Corpus, model: ModelConfig) -> np.ndarray:
    # Tokens of the model that will train on the set, not of the proxy.
    from forgetless.models import load_tokenizer

    tokenizer = load_tokenizer(model.name, model.trust_remote_code, model.revision)
    lengths = tokenizer(corpus.texts, add_special_tokens=False)["input_ids"]
    return np.array([len(ids) + 1 for ids in lengths], dtype=np.float64)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


class SampleSettings(StageSettings):
    method: str
    tokens: int
    repetition_cap: float
    seed: int
    # Of the model the set is drawn for: its tokens are counted.
    tokenizer: str = Field(json_schema_extra=LOCAL_CHECKPOINT)
    trust_remote_code: bool


class SampleStage(Stage):
    """The training set a recipe trains on: ``mix.tokens`` tokens drawn by the mixture."""

    def __init__(self, mixture: Mixture):
        self.mixture = mixture
        self.name = f"mixture_{mixture.mix.method}"
        self.depends_on = ("clusters", "search") if mixture.method.needs_search else ("clusters",)

    def settings(self) -> SampleSettings:
        mix, model = self.mixture.mix, self.mixture.model
        return SampleSettings(
            method=mix.method,
            tokens=mix.tokens,
            repetition_cap=mix.repetition_cap,
            seed=mix.seed,
            tokenizer=model.name,
            trust_remote_code=model.trust_remote_code,
        )

    def run(self, workdir: Path, inputs: dict[str, StageResult]) -> dict[str, Any]:
        corpus = self.mixture.corpus()
        groups = load_groups(inputs["clusters"].directory)
        count = int(groups.max()) + 1
        kept = groups >= 0
        document_tokens = _document_tokens(corpus, self.mixture.model)
        cluster_tokens = np.bincount(groups[kept], weights=document_tokens[kept], minlength=count)
        search = inputs["search"].summary if "search" in self.depends_on else None
        outcome = None if search is None else {"final": {"weights": search["weights"]}}
        weights = self.mixture.method.weights(outcome, cluster_tokens)
        settings = self.settings()
        rows, summary = sample_training_set(
            corpus,
            groups,
            np.asarray(weights, dtype=np.float64),
            settings.tokens,
            self.mixture.model,
            repetition_cap=settings.repetition_cap,
            seed=settings.seed,
        )
        _write_rows(workdir / SAMPLE_FILE, rows)
        return {"records_file": SAMPLE_FILE, "weights": list(map(float, weights)), **summary}


def clustering_stages(mixture: Mixture) -> list[Stage]:
    return [EmbedStage(mixture), QualityStage(mixture), ClusterStage(mixture)]


def mixture_stages(mixture: Mixture) -> list[Stage]:
    """Every stage up to the sampled training set; the last writes it."""
    search = [SearchStage(mixture)] if mixture.method.needs_search else []
    return [*clustering_stages(mixture), *search, SampleStage(mixture)]


def _mixture(config, progress: bool) -> Mixture:
    return Mixture(config.model, config.mix, data_dir=config.data_dir, progress=progress)


def run_clustering(
    config, output_dir: str | Path, *, progress: bool = True, on_event=None
) -> dict[str, StageResult]:
    """Embed, score, cluster, prune and merge ``config.mix.sources`` into ``output_dir``."""
    mixture = _mixture(config, progress)
    mixture.corpus()  # data mistakes surface before any model is loaded
    return run_directory(output_dir, config, on_event).run_all(clustering_stages(mixture))


def run_mixture_search(
    config,
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
    from forgetless.mix.proxy import load_target_texts

    mixture = _mixture(config, progress)
    load_target_texts(config.mix.search, config.data_dir)  # target mistakes surface first
    clusters = run_clustering(config, output_dir, progress=progress, on_event=on_event)["clusters"]
    directory = Path(output_dir) / SEARCH_DIR
    search = SearchStage(mixture)
    identity = {"fingerprint": search.fingerprint({"clusters": clusters.fingerprint})}
    settings_file = directory / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != identity:
        raise ForgetlessError(
            f"{directory} holds a search with other settings or clusters; "
            "use another output directory or delete it"
        )
    write_json_atomic(settings_file, identity)
    return search_mixture(mixture, clusters, directory, propose_only=propose_only)


def materialise_mixture(
    config,
    output_dir: str | Path,
    tokens: int,
    target: str | Path,
    weights: list[float] | None = None,
) -> dict[str, Any]:
    """Write ``tokens`` tokens (of ``config.model``'s tokenizer) of the pool, sampled by the
    searched (or given) weights, as jsonl rows ``{"text", "id", "super_cluster"}``; returns a
    summary."""
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
    corpus = _mixture(config, progress=False).corpus()
    if len(corpus) != len(groups):
        raise ForgetlessError("the pool changed since it was clustered; cluster it again")
    rows, summary = sample_training_set(
        corpus,
        groups,
        np.asarray(weights, dtype=np.float64),
        tokens,
        config.model,
        repetition_cap=config.mix.repetition_cap,
        seed=config.mix.seed,
    )
    _write_rows(Path(target), rows)
    return summary
