"""Training settings: the optimiser and schedule, and the settings of each training method."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from forgetless.errors import ForgetlessError
from forgetless.schema import NOT_IDENTITY, Section


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
    projection: Literal["two_sided", "top_block"] = Field(
        "two_sided",
        description="What is frozen: two_sided keeps updates out of both the top-k left and "
        "right singular subspaces, (I - UUᵀ) ΔW (I - VVᵀ), leaving (m-k)(n-k) of m*n "
        "directions trainable; top_block only keeps UᵀΔW V = 0 (the paper's equation), "
        "leaving m*n - k².",
    )
    reproject_every: int = Field(
        1,
        ge=1,
        description="Optimizer steps between projections of the weights' drift onto the "
        "allowed subspace; the drift is also projected before every checkpoint, evaluation "
        "and the end of training. 1 (default): the weights satisfy the constraint after every "
        "step. More (with project_gradients: true) saves projection time but lets AdamW's "
        "leak accumulate between projections, which on SmolLM2-135M more than doubled the "
        "forgetting at 8 (docs/osft.md).",
    )
    project_gradients: bool = Field(
        False,
        description="Also project the gradient before every optimizer step, so AdamW's moments "
        "live in the allowed subspace (two projections per step). false (default): only the "
        "step is projected, one projection per step, and the moments also see the frozen "
        "directions' gradients; on SmolLM2-135M this gained more on the domain and forgot "
        "less (docs/osft.md). false needs reproject_every: 1.",
    )
    rank_policy: Literal["adaptive", "fixed"] = Field(
        "adaptive",
        description="adaptive: per-matrix preserved rank from input/output cosine importance "
        "on calibration data (Sculpting Subspaces); fixed: preserve_ratio for every matrix.",
    )
    importance: Literal["block", "matrix"] = Field(
        "block",
        description="Adaptive importance: mean cos(input, output) over calibration tokens of "
        "the transformer block holding the matrix (residual stream), or of the matrix itself "
        "(its output rotated back to the input's coordinates by W's polar factor).",
    )
    rank_mapping: Literal["quantile", "mean"] = Field(
        "quantile",
        description="Adaptive: importance -> preserved ratio. quantile: matrices ordered by "
        "importance, ratios spaced evenly over trr ± min(trr - mrr, rank_spread * (1 - trr)); "
        "mean: the paper's mrr + I/mean(I) * (trr - mrr), clamped to [1, min(m, n) - 1].",
    )
    rank_spread: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Adaptive, quantile: the most important matrix keeps (1 - rank_spread) of "
        "the average trainable fraction (1 - trr), the least important (1 + rank_spread) of it.",
    )
    mrr: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Adaptive: smallest preserved ratio (quantile: a floor; mean: the ratio of "
        "a layer of zero importance).",
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

    @model_validator(mode="after")
    def _consistent(self) -> OsftConfig:
        if self.rank_policy == "adaptive" and self.trr < self.mrr:
            raise ValueError(f"trr ({self.trr:g}) must be at least mrr ({self.mrr:g})")
        if not self.project_gradients and self.reproject_every != 1:
            # Unprojected moments leave the subspace at every step; only projecting each
            # step keeps the weights in it.
            raise ValueError("project_gradients: false needs reproject_every: 1")
        return self

    def for_task(self, index: int, count: int) -> OsftConfig:
        """Settings for task ``index`` (0-based) of ``count``: the preserved ratio grows linearly
        from ``trr`` to ``final_trr`` so each task leaves room for the next ones."""
        if count <= 1:
            return self
        grown = self.trr + (self.final_trr - self.trr) * index / (count - 1)
        return self.model_copy(update={"trr": grown})


class EwcConfig(Section):
    lam: float = Field(
        1e4,
        ge=0.0,
        description="λ of the EWC penalty (λ/2) Σ F (θ - θ*)², F the earlier tasks' summed "
        "per-example Fishers, θ* the weights the task starts from. 1e4: on SmolLM2-135M the "
        "penalty then rivals the task's gradient on the ~0.1 % most important weights after "
        "one epoch of the packaged continual config (README). 0 turns it off.",
    )
    fisher_samples: int = Field(
        32,
        ge=1,
        description="Training records of each task (a seeded choice) whose squared gradients, one "
        "record per backward pass, are averaged into its diagonal empirical Fisher.",
    )


class OloraConfig(Section):
    lam: float = Field(
        0.5,
        ge=0.0,
        description="λ₁ of O-LoRA's orthogonality penalty λ₁ Σ ‖A_i A_tᵀ‖²_F between the new "
        "LoRA's A matrices and every earlier task's (0.5: O-LoRA's scripts).",
    )


class TrainConfig(Section):
    method: str = Field(
        "full",
        description="A registered training method (`forgetless methods train`): full "
        "fine-tuning, LoRA, or OSFT (full fine-tuning constrained to the orthogonal complement "
        "of each matrix's top singular subspace).",
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
    lr_scheduler: str = Field(
        "constant", description="transformers scheduler name (linear, cosine, constant, ...)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed for weights init of adapters, data order, dropout.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (for resuming).")
    save_total_limit: int = Field(2, ge=1, description="Keep at most N checkpoints.")
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers, as transformers' `report_to` (tensorboard, wandb, "
        "trackio, mlflow, ...): training logs go there, and so do the retention and frontier "
        "reports (tensorboard, wandb, trackio). A name or a list; empty or 'none': no tracker. "
        "TensorBoard writes under <output>/checkpoints/runs.",
        json_schema_extra=NOT_IDENTITY,
    )
    run_name: str | None = Field(
        None,
        description="Run name shown by the trackers; default: the output directory.",
        json_schema_extra=NOT_IDENTITY,
    )
    project: str = Field(
        "forgetless",
        description="Tracker project (Trackio and W&B) the runs are grouped in.",
        json_schema_extra=NOT_IDENTITY,
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    osft: OsftConfig = Field(default_factory=OsftConfig, description="OSFT settings.")
    ewc: EwcConfig = Field(
        default_factory=EwcConfig, description="EWC settings (continual method ewc)."
    )
    olora: OloraConfig = Field(
        default_factory=OloraConfig, description="O-LoRA settings (continual method olora)."
    )

    def check_trackers_installed(self) -> None:
        """Fail before any work when a tracker's package is missing (transformers would raise
        only once the Trainer is built, after the model and data are loaded)."""
        from transformers.integrations import get_available_reporting_integrations

        available = get_available_reporting_integrations()
        for name in self.report_to:
            if name not in available:
                raise ForgetlessError(
                    f"train.report_to: {name} is not installed; install its package "
                    f"(e.g. pip install {name.replace('_', '-')}) or drop it"
                )

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: object) -> object:
        # `--set train.report_to=tensorboard` gives one name; transformers accepts both too.
        if isinstance(value, str):
            value = [] if value == "none" else [value]
        return value

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        for name in names:
            if name not in INTEGRATION_TO_CALLBACK:
                raise ValueError(
                    f"unknown tracker {name!r}; choose from: {', '.join(INTEGRATION_TO_CALLBACK)}"
                )
        return sorted(set(names), key=names.index)

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        # Checked here, not by TrainingArguments halfway into a run: a typo is a one-line error.
        from transformers import SchedulerType

        known = [kind.value for kind in SchedulerType]
        if name not in known:
            raise ValueError(
                f"{name!r} is not a transformers scheduler; choose one of: {', '.join(known)}"
            )
        return name
