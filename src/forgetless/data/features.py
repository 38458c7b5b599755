"""Turn records into token features for causal-LM training.

* Text is tokenised, joined with EOS and cut into blocks of ``max_length`` tokens (the usual
  packing of language-model pre-training; every token is a target).
* Instruction pairs go through the tokenizer's chat template; the prompt part (system, user
  turn and the assistant header) gets label -100, so the loss covers the response only.
* Multiple-choice items are trained as instructions whose response is the gold choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from forgetless.data.records import InstructionRecord, MultipleChoiceRecord, Record, TextRecord
from forgetless.errors import ForgetlessError

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)

# Used only for tokenizers without a chat template (base models).
PLAIN_PROMPT_FORMAT = "### Instruction:\n{prompt}\n\n### Response:\n"


def build_training_features(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_length: int
) -> Dataset:
    """Features (input_ids, attention_mask, labels) for a list of records of one kind."""
    if not records:
        raise ForgetlessError("no training records: the data source is empty")
    kinds = {type(record) for record in records}
    if len(kinds) > 1:
        raise ForgetlessError("training records must all be of one kind")
    if isinstance(records[0], TextRecord):
        return pack_text(tokenizer, [record.text for record in records], max_length)
    pairs = [as_instruction(record) for record in records]
    return instruction_features(tokenizer, pairs, max_length)


def as_instruction(record: Record) -> InstructionRecord:
    if isinstance(record, InstructionRecord):
        return record
    if isinstance(record, MultipleChoiceRecord):
        return InstructionRecord(
            prompt=record.query, response=record.choices[record.gold], id=record.id
        )
    raise ForgetlessError(f"cannot train on a {type(record).__name__} as an instruction")


def pack_text(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> Dataset:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise ForgetlessError(
            f"the text has {len(stream)} tokens, fewer than one block of max_length={max_length}"
        )
    blocks = [stream[i * max_length : (i + 1) * max_length] for i in range(n_blocks)]
    return Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * max_length] * n_blocks, "labels": blocks}
    )


def chat_prompt_and_response(
    tokenizer: PreTrainedTokenizerBase, record: InstructionRecord
) -> tuple[str, str]:
    """Split one rendered conversation into the part to ignore and the part to learn."""
    if not tokenizer.chat_template:
        return PLAIN_PROMPT_FORMAT.format(prompt=record.prompt), record.response + (
            tokenizer.eos_token or ""
        )
    messages = [{"role": "user", "content": record.prompt}]
    if record.system is not None:
        messages.insert(0, {"role": "system", "content": record.system})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": record.response}], tokenize=False
    )
    if not full.startswith(prompt):
        # Some templates rewrite earlier turns once an answer follows; masking by prefix
        # would then be wrong, so refuse rather than train on the wrong tokens.
        raise ForgetlessError(
            "the tokenizer's chat template does not render the prompt as a prefix of the "
            "conversation, so response-only masking is impossible"
        )
    return prompt, full[len(prompt) :]


def instruction_example(
    tokenizer: PreTrainedTokenizerBase, record: InstructionRecord, max_length: int
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation, or None when the prompt fills max_length."""
    prompt, response = chat_prompt_and_response(tokenizer, record)
    # Tokenising the two parts separately keeps the boundary exact; the special tokens are
    # already in the rendered text.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels


def instruction_features(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[InstructionRecord], max_length: int
) -> Dataset:
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped = 0
    for record in records:
        example = instruction_example(tokenizer, record, max_length)
        if example is None:
            dropped += 1
            continue
        input_ids, labels = example
        rows["input_ids"].append(input_ids)
        rows["attention_mask"].append([1] * len(input_ids))
        rows["labels"].append(labels)
    if dropped:
        logger.warning(
            "dropped %d of %d examples whose prompt fills max_length=%d",
            dropped,
            len(records),
            max_length,
        )
    if not rows["input_ids"]:
        raise ForgetlessError(f"every prompt is longer than max_length={max_length}")
    return Dataset.from_dict(rows)


def sample_example(
    tokenizer: PreTrainedTokenizerBase, record: Record, max_length: int
) -> tuple[list[int], list[int]] | None:
    """One record as its own training sequence (no packing), for per-sample quantities such
    as gradients and losses: text is truncated to max_length, every token a target; other
    kinds go through the chat template. None when nothing is left to learn."""
    if isinstance(record, TextRecord):
        ids = tokenizer(record.text, add_special_tokens=False)["input_ids"]
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        return (ids, list(ids)) if len(ids) >= 2 else None
    return instruction_example(tokenizer, as_instruction(record), max_length)
