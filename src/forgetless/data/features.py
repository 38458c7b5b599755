"""Turn records into token features for causal-LM training.

* Text is tokenised, joined with EOS and cut into blocks of ``max_length`` tokens (the usual
  packing of language-model pre-training; every token is a target).
* Conversations go through the tokenizer's chat template. An instruction pair is a
  conversation of one user turn (after its system prompt, if any) and one assistant turn; a
  chat record may hold many. Only the assistant turns - each reply with the end-of-turn marker
  the template puts after it - carry the loss; system and user turns and the assistant headers
  get label -100.
* Multiple-choice items are trained as instructions whose response is the gold choice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from forgetless.data.records import (
    ChatRecord,
    InstructionRecord,
    MultipleChoiceRecord,
    Record,
    TextRecord,
)
from forgetless.errors import ForgetlessError

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)

# Used only for tokenizers without a chat template (base models): a system prompt, then per
# exchange the user turn, the response header, the reply and EOS, exchanges separated by a
# blank line.
PLAIN_SYSTEM_FORMAT = "{system}\n\n"
PLAIN_PROMPT_FORMAT = "### Instruction:\n{prompt}\n\n### Response:\n"
PLAIN_TURN_SEPARATOR = "\n\n"

Piece = tuple[str, bool]  # (rendered text, whether it is learned)


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
    return conversation_features(tokenizer, records, max_length)


def as_instruction(record: Record) -> InstructionRecord:
    if isinstance(record, InstructionRecord):
        return record
    if isinstance(record, MultipleChoiceRecord):
        return InstructionRecord(
            prompt=record.query, response=record.choices[record.gold], id=record.id
        )
    raise ForgetlessError(f"cannot train on a {type(record).__name__} as an instruction")


def conversation(record: Record) -> list[dict[str, str]]:
    """The chat-template messages a trainable record stands for."""
    if isinstance(record, ChatRecord):
        return [{"role": message.role, "content": message.content} for message in record.messages]
    pair = as_instruction(record)
    system = [] if pair.system is None else [{"role": "system", "content": pair.system}]
    return [
        *system,
        {"role": "user", "content": pair.prompt},
        {"role": "assistant", "content": pair.response},
    ]


def pack_text(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> Dataset:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise _too_little_text(len(stream), max_length)
    blocks = [stream[i * max_length : (i + 1) * max_length] for i in range(n_blocks)]
    return Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * max_length] * n_blocks, "labels": blocks}
    )


def check_one_block(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> None:
    """Refuse text that cannot fill one training block (as ``pack_text`` packs it) before any
    model time is spent; reads only as many texts as one block takes."""
    tokens = 0
    for text in texts:
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # and eos
        if tokens >= max_length:
            return
    raise _too_little_text(tokens, max_length)


def _too_little_text(tokens: int, max_length: int) -> ForgetlessError:
    return ForgetlessError(
        f"the training text has {tokens} tokens, fewer than one block of "
        f"train.max_length={max_length}: give more text or a smaller train.max_length"
    )


def conversation_pieces(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> list[Piece]:
    """The rendered conversation up to its last assistant turn, as consecutive pieces.

    With a chat template, assistant turn ``i`` is the text that ``messages[: i + 1]`` adds to
    ``messages[:i]`` rendered with the generation prompt, so the learned pieces are exactly
    what the model should produce; everything before it is context.
    """
    if not tokenizer.chat_template:
        return _plain_pieces(tokenizer, messages)
    pieces: list[Piece] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            # Some templates rewrite earlier turns once an answer follows; masking by prefix
            # would then be wrong, so refuse rather than train on the wrong tokens.
            raise ForgetlessError(
                "the tokenizer's chat template does not render the prompt as a prefix of the "
                "conversation, so response-only masking is impossible"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool,
) -> str:
    from jinja2 import TemplateError  # templates are jinja; only needed where there is one

    try:
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as err:
        # Templates may refuse conversations (roles that do not alternate, a system prompt
        # they do not support) with raise_exception.
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ForgetlessError(
            f"the tokenizer's chat template refuses a conversation: {detail}"
        ) from None


def _plain_pieces(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> list[Piece]:
    pieces: list[Piece] = []
    context = ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            context += PLAIN_SYSTEM_FORMAT.format(system=content)
        elif role == "user":
            context += (PLAIN_TURN_SEPARATOR if pieces else "") + PLAIN_PROMPT_FORMAT.format(
                prompt=content
            )
        else:
            pieces += [(context, False), (content + (tokenizer.eos_token or ""), True)]
            context = ""
    return pieces


def chat_prompt_and_response(
    tokenizer: PreTrainedTokenizerBase, record: InstructionRecord
) -> tuple[str, str]:
    """Split one rendered instruction pair into the part to ignore and the part to learn."""
    (prompt, _), (response, _) = conversation_pieces(tokenizer, conversation(record))
    return prompt, response


def training_example(
    tokenizer: PreTrainedTokenizerBase, record: Record, max_length: int
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation, or None when nothing learned fits max_length."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, learned in conversation_pieces(tokenizer, conversation(record)):
        # Tokenising the pieces separately keeps the boundaries exact; the special tokens are
        # already in the rendered text.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
        if len(input_ids) >= max_length:
            break
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return input_ids, labels


def conversation_features(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_length: int
) -> Dataset:
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped = 0
    for record in records:
        example = training_example(tokenizer, record, max_length)
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
    return training_example(tokenizer, record, max_length)


def training_tokens(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_length: int
) -> np.ndarray:
    """Tokens each record adds to training, as ``build_training_features`` builds it: a text
    its tokens and the EOS after it in the packed stream; any other kind its conversation,
    cut at ``max_length`` (0 when nothing learned fits)."""
    if records and isinstance(records[0], TextRecord):
        ids = tokenizer([record.text for record in records], add_special_tokens=False)
        return np.asarray([len(row) + 1 for row in ids["input_ids"]], dtype=np.int64)
    examples = (training_example(tokenizer, record, max_length) for record in records)
    return np.asarray([0 if ex is None else len(ex[0]) for ex in examples], dtype=np.int64)
