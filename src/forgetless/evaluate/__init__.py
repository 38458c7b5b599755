"""Evaluation: multiple-choice accuracy, perplexity and GSM8K exact match.

All three take a model and tokenizer in memory (plain or peft-wrapped, on CPU or CUDA), so the
same code scores a checkpoint on disk and a model in the middle of training. Every result is a
dataclass with uncertainty attached and a ``to_dict()`` for JSON reports.
"""

from forgetless.evaluate.generation import (
    GenerationItem,
    GenerationResult,
    extract_gold_answer,
    extract_predicted_answer,
    gsm8k_exact_match,
    normalise_number,
)
from forgetless.evaluate.multiple_choice import (
    MultipleChoiceItem,
    MultipleChoiceResult,
    score_multiple_choice,
)
from forgetless.evaluate.perplexity import PerplexityResult, perplexity

__all__ = [
    "GenerationItem",
    "GenerationResult",
    "MultipleChoiceItem",
    "MultipleChoiceResult",
    "PerplexityResult",
    "extract_gold_answer",
    "extract_predicted_answer",
    "gsm8k_exact_match",
    "normalise_number",
    "perplexity",
    "score_multiple_choice",
]
