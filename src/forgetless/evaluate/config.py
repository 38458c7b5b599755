"""Evaluation settings: which tasks, how many items, and how they are scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from forgetless.schema import LOCAL_CONTENT, Section


class ScoringConfig(Section):
    """How items are scored; part of every evaluation's identity."""

    batch_tokens: int = Field(
        4096, ge=64, description="Token budget per multiple-choice scoring batch."
    )
    ppl_max_length: int = Field(512, ge=8, description="Window length for perplexity.")
    ppl_batch_size: int = Field(8, ge=1, description="Windows per perplexity batch.")
    generation_max_new_tokens: int = Field(256, ge=1, description="GSM8K generation budget.")
    generation_batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")


class UserTaskConfig(Section):
    """An evaluation task read from the user's own file."""

    source: str = Field(
        description="A jsonl/json/csv/tsv/parquet file or a saved Hugging Face dataset.",
        json_schema_extra=LOCAL_CONTENT,
    )
    metric: Literal["accuracy", "perplexity"] = Field(
        description="accuracy: multiple-choice items scored by log-likelihood (needs query, "
        "choices, gold); perplexity: the text of every record."
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Record field -> column, e.g. {query: question, choices: options, "
        "gold: answer}; gold may be an index, a letter or the answer's text.",
    )
    split: str | None = Field(None, description="Split of a saved DatasetDict (default train).")


class EvalConfig(Section):
    general_tasks: list[str] = Field(
        default_factory=lambda: ["arc_easy", "piqa", "c4", "gsm8k"],
        description="General-ability tasks for the retention report.",
        json_schema_extra=LOCAL_CONTENT,
    )
    domain_tasks: list[str] = Field(
        default_factory=lambda: ["ppl:pubmedqa@test"],
        description="Domain tasks. A task is a data set name (its native metric), "
        "'ppl:<data set or file>' (perplexity of its text), optionally '@<split>', or the "
        "name of a user task defined under `tasks`.",
        json_schema_extra=LOCAL_CONTENT,
    )
    tasks: dict[str, UserTaskConfig] = Field(
        default_factory=dict,
        description="Your own benchmarks by name, e.g. {exams: {source: exams.csv, metric: "
        "accuracy, columns: {query: question, choices: options, gold: answer}}}.",
    )
    limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N items of every task (None = all)."
    )
    task_limits: dict[str, int] = Field(
        default_factory=dict, description="Per-task item limits, overriding `limit`."
    )
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig, description="Batching and window lengths of scoring."
    )

    @field_validator("general_tasks", "domain_tasks")
    @classmethod
    def _no_empty_names(cls, tasks: list[str]) -> list[str]:
        if any(not task.strip() for task in tasks):
            raise ValueError("task names must not be empty")
        return tasks

    def limit_for(self, task: str) -> int | None:
        return self.task_limits.get(task, self.limit)
