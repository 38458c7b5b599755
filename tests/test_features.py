"""Training features: packing of text and response-only masking of chat-template SFT."""

import pytest

from forgetless.data.features import (
    IGNORE_INDEX,
    build_training_features,
    chat_prompt_and_response,
)
from forgetless.data.records import InstructionRecord, MultipleChoiceRecord, TextRecord
from forgetless.errors import ForgetlessError
from forgetless.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_text_is_packed_into_full_blocks(tokenizer):
    records = [TextRecord("abcdefghij" * 3), TextRecord("klmnop" * 5)]
    features = build_training_features(tokenizer, records, max_length=16)
    total = 30 + 1 + 30 + 1  # byte tokens plus one EOS per document
    assert len(features) == total // 16
    for row in features:
        assert len(row["input_ids"]) == 16
        assert row["labels"] == row["input_ids"]
    flat = [token for row in features for token in row["input_ids"]]
    assert flat[30] == tokenizer.eos_token_id


def test_loss_covers_only_the_response(tokenizer):
    record = InstructionRecord(prompt="What is 2+2?", response="4, of course.")
    row = build_training_features(tokenizer, [record], max_length=512)[0]
    prompt, response = chat_prompt_and_response(tokenizer, record)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert response == "4, of course.<|im_end|>\n"
    masked = [label == IGNORE_INDEX for label in row["labels"]]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert masked == [True] * n_prompt + [False] * (len(row["labels"]) - n_prompt)
    learned = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == response
    assert row["input_ids"][n_prompt:] == learned


def test_system_prompt_is_masked_too(tokenizer):
    record = InstructionRecord(prompt="Hi", response="Hello", system="Be brief.")
    row = build_training_features(tokenizer, [record], max_length=512)[0]
    learned = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Hello<|im_end|>\n"
    assert "Be brief." in tokenizer.decode(row["input_ids"])


def test_multiple_choice_trains_on_the_gold_choice(tokenizer):
    record = MultipleChoiceRecord(query="Sky colour?", choices=("green", "blue"), gold=1)
    row = build_training_features(tokenizer, [record], max_length=512)[0]
    learned = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "blue<|im_end|>\n"


def test_prompts_longer_than_max_length_are_dropped(tokenizer):
    records = [
        InstructionRecord(prompt="x" * 100, response="y"),
        InstructionRecord(prompt="short", response="ok"),
    ]
    features = build_training_features(tokenizer, records, max_length=64)
    assert len(features) == 1
    with pytest.raises(ForgetlessError, match="longer than max_length"):
        build_training_features(tokenizer, records[:1], max_length=64)


def test_plain_format_without_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    prompt, response = chat_prompt_and_response(tokenizer, InstructionRecord("Q?", "A."))
    assert prompt == "### Instruction:\nQ?\n\n### Response:\n"
    assert response == "A." + tokenizer.eos_token


def test_empty_and_mixed_inputs_are_rejected(tokenizer):
    with pytest.raises(ForgetlessError, match="empty"):
        build_training_features(tokenizer, [], max_length=16)
    mixed = [TextRecord("a"), InstructionRecord("q", "a")]
    with pytest.raises(ForgetlessError, match="one kind"):
        build_training_features(tokenizer, mixed, max_length=16)
    with pytest.raises(ForgetlessError, match="fewer than one block"):
        build_training_features(tokenizer, [TextRecord("abc")], max_length=64)
