"""The continual-learning strategies: how a task sequence is trained, as registry entries."""

from __future__ import annotations

from dataclasses import dataclass

from forgetless.registry import Method, register


@dataclass(frozen=True)
class ContinualStrategy:
    train_method: str  # the train method each task (or the joint run) uses
    from_base: bool = False  # every task starts from the base model, not the previous task's
    merge: bool = False  # the experts so far are merged after each task (merge section)
    joint: bool = False  # one run on all the tasks at once
    per_task_osft: bool = False  # the preserved ratio grows task by task (osft.final_trr)


def _register(name: str, summary: str, strategy: ContinualStrategy, settings: str | None):
    register(
        Method(
            "continual",
            name,
            summary,
            consumes="task sequence",
            produces="a model per task + accuracy matrix",
            settings=settings,
            implementation=strategy,
        )
    )


_register("seqft", "full fine-tuning task after task", ContinualStrategy("full"), None)
_register(
    "lora", "a LoRA per task, merged before the next", ContinualStrategy("lora"), "train.lora"
)
_register(
    "osft",
    "OSFT with the SVD recomputed on the current weights for every task",
    ContinualStrategy("osft", per_task_osft=True),
    "train.osft",
)
_register(
    "sotu",
    "each task fine-tuned from the base on its own; the experts so far merged (merge section, "
    "SoTU masks by default) after each task",
    ContinualStrategy("full", from_base=True, merge=True),
    "merge",
)
_register(
    "multitask",
    "one run on all tasks together (the usual upper bound)",
    ContinualStrategy("full", joint=True),
    None,
)
