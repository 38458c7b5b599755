"""GSM8K-style exact match: greedy generation, then compare the final number with the gold one.

Instruct models get the question through their chat template with a request to end on
"#### <number>", the GSM8K answer format; base models get "Question: ...\\nAnswer:". The
predicted answer is the number after "####" when the model wrote one, else the last number
it wrote. Both sides are normalised ("$1,234.50" -> "1234.5") before the string comparison.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from forgetless.data.records import InstructionRecord
from forgetless.errors import ForgetlessError
from forgetless.evaluate.multiple_choice import adds_bos_token, evaluation_mode, model_device
from forgetless.evaluate.stats import proportion_stderr, wilson_interval

ANSWER_MARKER = "####"
ANSWER_INSTRUCTION = (
    "Solve the problem step by step, then give the final answer on its own line "
    'in the form "#### <number>".'
)
# A minus sign unless it joins two words or numbers ("5-6" is a range, not -6), an optional
# dollar sign, then digits with well-formed thousands commas and optional decimals, or a bare
# decimal such as ".5". "1,2,3" is three numbers, "1,234" is one.
NUMBER_PATTERN = re.compile(r"(?:(?<![\w.])-)?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
# A base model continues with a made-up next question; what follows is not its answer.
CONTINUATION_MARKERS = ("\nQuestion:", "\n\nQuestion")


@dataclass(frozen=True)
class GenerationItem:
    id: str
    prompt: str
    output: str
    predicted: str | None
    gold: str | None
    correct: bool


@dataclass(frozen=True)
class GenerationResult:
    accuracy: float
    n: int
    accuracy_stderr: float | None  # None with fewer than two items
    accuracy_ci95: tuple[float, float]
    items: tuple[GenerationItem, ...]

    def to_dict(self, *, include_items: bool = True) -> dict:
        result = asdict(self)
        if not include_items:
            del result["items"]
        return result


# --------------------------------------------------------------------------------------------
# Answer extraction (pure functions).


def normalise_number(text: str) -> str:
    """Canonical string for a number: no $, commas, spaces, "+" or redundant zeros/point."""
    value = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    value = value.rstrip(".")
    negative = value.startswith("-")
    value = value.lstrip("+-")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    integer, dot, fraction = value.partition(".")
    integer = integer.lstrip("0") or "0"
    value = integer + dot + fraction
    if negative and value != "0":
        value = "-" + value
    return value


def _numbers(text: str) -> list[str]:
    return [match.group(0) for match in NUMBER_PATTERN.finditer(text)]


def extract_gold_answer(response: str) -> str | None:
    """The normalised number after the last "####" of a GSM8K reference solution."""
    if ANSWER_MARKER not in response:
        return None
    numbers = _numbers(response.rsplit(ANSWER_MARKER, 1)[1])
    return normalise_number(numbers[0]) if numbers else None


def extract_predicted_answer(output: str) -> str | None:
    """The normalised number after the first "####" of the output, else its last number."""
    for marker in CONTINUATION_MARKERS:
        output = output.split(marker, 1)[0]
    if ANSWER_MARKER in output:
        numbers = _numbers(output.split(ANSWER_MARKER, 1)[1])
        if numbers:
            return normalise_number(numbers[0])
    numbers = _numbers(output)
    return normalise_number(numbers[-1]) if numbers else None


# --------------------------------------------------------------------------------------------
# Prompting and generation.


def build_prompt(tokenizer, record: InstructionRecord) -> str:
    """The prompt text: the chat template when the tokenizer has one, else a plain Q/A frame."""
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if record.system:
            messages.append({"role": "system", "content": record.system})
        messages.append({"role": "user", "content": f"{record.prompt}\n\n{ANSWER_INSTRUCTION}"})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {record.prompt}\nAnswer:"


def _encode_prompt(tokenizer, prompt: str, templated: bool, add_bos: bool) -> list[int]:
    # A chat template writes its own special tokens; a plain prompt gets BOS if usual.
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not templated and add_bos:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """EOS ids of the generation config (e.g. <|im_end|> for chat models) and the tokenizer."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


def gsm8k_exact_match(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[InstructionRecord],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> GenerationResult:
    """Greedy-decode an answer for every record and score exact match of the final number."""
    if not records:
        raise ForgetlessError("no instruction records to evaluate")
    if batch_size < 1 or max_new_tokens < 1:
        raise ForgetlessError("batch_size and max_new_tokens must be positive")
    templated = bool(getattr(tokenizer, "chat_template", None))
    add_bos = adds_bos_token(tokenizer)
    prompts = [build_prompt(tokenizer, record) for record in records]
    encoded = [_encode_prompt(tokenizer, prompt, templated, add_bos) for prompt in prompts]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stop_ids = _stop_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=stop_ids or None,
    )
    device = model_device(model)
    # Longest prompts first: similar lengths share a batch, so little padding is generated on.
    order = sorted(range(len(records)), key=lambda index: len(encoded[index]), reverse=True)
    outputs = [""] * len(records)
    with (
        evaluation_mode(model),
        tqdm(total=len(records), desc="gsm8k", disable=not progress) as bar,
    ):
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            width = max(len(encoded[index]) for index in indices)
            # Left padding, built by hand so the caller's tokenizer is never modified: every
            # row's last prompt token sits at the same place, right where generation starts.
            input_ids = torch.tensor(
                [[pad_id] * (width - len(encoded[i])) + encoded[i] for i in indices], device=device
            )
            attention = torch.tensor(
                [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in indices],
                device=device,
            )
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention, generation_config=config
            )
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for index, text in zip(indices, texts, strict=True):
                outputs[index] = text
            bar.update(len(indices))

    items = []
    for record, prompt, output in zip(records, prompts, outputs, strict=True):
        gold = extract_gold_answer(record.response)
        predicted = extract_predicted_answer(output)
        items.append(
            GenerationItem(
                id=record.id,
                prompt=prompt,
                output=output,
                predicted=predicted,
                gold=gold,
                correct=gold is not None and predicted == gold,
            )
        )
    n = len(items)
    hits = sum(item.correct for item in items)
    return GenerationResult(
        accuracy=hits / n,
        n=n,
        accuracy_stderr=proportion_stderr(hits, n),
        accuracy_ci95=wilson_interval(hits, n),
        items=tuple(items),
    )
