"""The continual-learning strategies: how a task sequence is trained, as registry entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from forgetless.registry import Method, register


@dataclass(frozen=True)
class ContinualStrategy:
    train_method: str  # the train method each task (or the joint run) uses
    from_base: bool = False  # every task starts from the base model, not the previous task's
    merge: bool = False  # the experts so far are merged after each task (merge section)
    joint: bool = False  # one run on all the tasks at once
    per_task_osft: bool = False  # the preserved ratio grows task by task (osft.final_trr)
    # Each task after the first also trains on continual.replay_per_task records of every
    # earlier task.
    replay: bool = False
    # A penalty toward the earlier tasks, carried from task to task in the run directory:
    # ewc (train.ewc) or olora (train.olora).
    penalty: Literal["ewc", "olora"] | None = None


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
_register(
    "replay",
    "experience replay: full fine-tuning on each task plus a seeded buffer of "
    "continual.replay_per_task training records of every earlier task",
    ContinualStrategy("full", replay=True),
    "continual.replay_per_task",
)
_register(
    "ewc",
    "full fine-tuning with online Elastic Weight Consolidation: a quadratic penalty, weighted by "
    "the earlier tasks' summed diagonal Fisher, toward the previous task's weights (Kirkpatrick "
    "et al. 2017)",
    ContinualStrategy("full", penalty="ewc"),
    "train.ewc",
)
_register(
    "olora",
    "a LoRA per task, merged before the next, with its A matrices pushed orthogonal to the "
    "earlier tasks' (O-LoRA, Wang et al. 2023)",
    ContinualStrategy("lora", penalty="olora"),
    "train.olora",
)
