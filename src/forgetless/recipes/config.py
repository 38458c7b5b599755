"""Recipe settings: which steps a run chains, the domain experts of a merge, the arms of a
comparison, and the continual-learning harness."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from forgetless.data.config import DataConfig
from forgetless.schema import Section

# The chain a recipe picks from, in data-flow order; base evaluation, the adapted model's
# evaluation and the report always run.
STEPS = ("mix", "select", "train", "merge")


class RecipeConfig(Section):
    steps: list[Literal["mix", "select", "train", "merge"]] = Field(
        default_factory=lambda: ["train"],
        description="Steps between evaluating the base and the adapted model, in chain order: "
        "mix (train on a training set drawn from the mixture of mix.sources), select (train on "
        "the selection from the pool: the data section, or the mixture's set), train (the "
        "model on that data with train.method), merge (train one expert per entry of "
        "`experts` from the base, then merge them with merge.method).",
    )
    experts: dict[str, DataConfig] = Field(
        default_factory=dict,
        description="merge step: expert name -> its training data (a data section each).",
    )

    @field_validator("steps")
    @classmethod
    def _chain_order(cls, steps: list[str]) -> list[str]:
        if len(set(steps)) != len(steps) or steps != sorted(steps, key=STEPS.index):
            raise ValueError(f"steps must be distinct and in the order {', '.join(STEPS)}")
        if not steps:
            raise ValueError("give at least one step")
        if "merge" in steps and steps != ["merge"]:
            raise ValueError("merge trains its own experts: use steps [merge] alone")
        if "train" not in steps and "merge" not in steps:
            raise ValueError("a recipe needs train or merge: something has to produce a model")
        return steps

    @model_validator(mode="after")
    def _experts_for_merge(self) -> RecipeConfig:
        if "merge" in self.steps and len(self.experts) < 2:
            raise ValueError("recipe.experts: a merge needs at least two experts")
        return self


class CompareConfig(Section):
    arms: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Arm name -> the settings it changes, as config sections (e.g. {train: "
        "{method: osft}}), plus optionally `sweep: {dotted.key: [values]}` for one setting "
        "(one point per value) and `description`.",
    )
    x_task: str | None = Field(
        None, description="Domain task on the frontier's x axis (default: the first domain task)."
    )
    y_task: str | None = Field(
        None,
        description="General task on the frontier's y axis (default: the first general task).",
    )
    seeds: list[int] = Field(
        default_factory=list,
        description="Train every arm (every swept value) once per seed (train.seed); each "
        "point of the frontier is then the mean over its seeds, its interval resampling the "
        "items (paired) and the seeds. Empty: once, under train.seed.",
    )

    @field_validator("seeds")
    @classmethod
    def _different_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"must be different seeds, got {value}")
        return value


class ContinualConfig(Section):
    benchmark: Literal["fewshot", "olora"] = Field(
        "fewshot",
        description="fewshot: the 4-task few-shot CL benchmark (AG News, Amazon, DBpedia, "
        "Yahoo); olora: the O-LoRA-format task list as a longer sequence.",
    )
    order: int = Field(1, ge=1, description="Task order: fewshot 1-3 (O-LoRA orders), olora 4-6.")
    subset: str = Field("0_42", description="fewshot seed split: 0_42, 1_142 or 2_242.")
    method: str = Field(
        "seqft",
        description="A registered continual strategy (`forgetless methods continual`). "
        "seqft: full fine-tuning task after task; lora: a LoRA per task, merged "
        "before the next; osft: OSFT with the SVD recomputed per task; sotu: each task "
        "fine-tuned from the base on its own, the experts so far merged with the merge section's "
        "settings (SoTU sparse masks by default) after each task; multitask: one run on "
        "all tasks together (the usual upper bound); replay: seqft plus replay_per_task "
        "records of every earlier task; ewc: seqft with the EWC penalty (train.ewc); olora: "
        "lora with O-LoRA's orthogonality penalty to the earlier tasks' LoRAs (train.olora).",
    )
    variant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.=+-]+$",
        description="Names this run's own settings so that they sit beside the plain "
        "method's, e.g. variant=lr3e-4 with train.learning_rate=3e-4. A merging strategy "
        "(sotu, e.g. variant=disjoint with merge.masks=disjoint): its merges, evaluations and "
        "report get stage folders of their own (<stage>@<variant>) beside the experts, which "
        "every variant shares (they do not depend on the merge). Any other strategy: the "
        "whole sequence gets a folder of its own (order<N>-<method>@<variant>).",
    )
    replay_per_task: int = Field(
        16,
        ge=1,
        description="replay: training records kept of each earlier task (a seeded choice among "
        "the records it trained on, the same for every later task) and added to the current "
        "task's records.",
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
    head_statistics: Literal["accumulate", "recompute"] = Field(
        "accumulate",
        description="closed_form head: accumulate (SoTU's): each task's statistics are taken "
        "from the model at its own stage and kept, no old samples needed; recompute: after "
        "every stage the head is refitted from the training records of every task so far, "
        "all through the current model (what the ridge solution assumes: one backbone), at "
        "the cost of re-reading earlier tasks' data.",
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
