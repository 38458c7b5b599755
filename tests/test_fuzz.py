"""Fuzzing the loaders and the config parser: whatever the bytes or the values, the outcome
is records (or a config) or a ForgetlessError, never another exception."""

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgetless.config import load_config, parse_assignment
from forgetless.data import load_user_data
from forgetless.errors import ForgetlessError

# No example database: it would leave a .hypothesis folder in the checkout.
FUZZ = settings(
    max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# None: the loader picks the kind from the columns (chat for messages, else text).
KINDS = ("text", "instruction", "multiple_choice", "chat", None)

# Bytes that look like the formats, mutated: valid rows, broken rows, other encodings.
JSONISH = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b'{"text": "a document"}',
                b'{"prompt": "p", "response": "r"}',
                b'{"query": "q", "choices": ["a", "b"], "gold": 1}',
                b'{"query": "q", "choices": "[\\"a\\"]", "gold": "Z"}',
                b'{"text": null}',
                b'{"messages": [{"role": "user", "content": "q"}, '
                b'{"role": "assistant", "content": "a"}]}',
                b'{"messages": [{"role": "assistant", "content": ["a"]}, {"role": 1}, null]}',
                b'{"messages": "[{\\"role\\": \\"user\\"}]", "id": [1]}',
                b'{"conversations": [{"from": "human", "value": "q"}, {"from": ["gpt"]}]}',
                b"[1, 2]",
                b"{",
                b"\xef\xbb\xbf{}",
                b"\xff\xfe",
                b"",
            ]
        ),
        st.binary(max_size=40),
    ),
    max_size=6,
)


def _load(suffix: str, content: bytes, kind: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(content)
        try:
            return load_user_data(path, kind)
        except ForgetlessError as error:
            assert "\n" not in str(error)
            return None


@FUZZ
@given(JSONISH, st.sampled_from(KINDS), st.sampled_from([".jsonl", ".json", ".txt"]))
def test_line_formats_load_or_fail_cleanly(lines, kind, suffix):
    content = b"\n".join(lines)
    if suffix == ".json":
        content = b"[" + b",".join(lines) + b"]"
    _load(suffix, content, kind)


@FUZZ
@given(
    st.lists(st.lists(st.text(max_size=12), min_size=0, max_size=4), min_size=0, max_size=5),
    st.sampled_from(KINDS),
    st.sampled_from([",", "\t"]),
)
def test_delimited_files_load_or_fail_cleanly(rows, kind, delimiter):
    text = "\n".join(delimiter.join(row) for row in rows)
    _load(".csv" if delimiter == "," else ".tsv", text.encode("utf-8", "surrogatepass"), kind)


VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(
    [
        "train.learning_rate",
        "train.max_steps",
        "train.method",
        "train.lora.target_modules",
        "train.osft.rank_overrides",
        "data.source",
        "data.limit",
        "evaluate.task_limits",
        "evaluate.tasks",
        "merge.keep",
        "merge.scale",
        "mix.search.targets",
        "mix.search.rounds",
        "select.budget",
        "recipe.steps",
        "recipe.experts",
        "compare.arms",
        "nosuchsection.key",
        "train",
    ]
)


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_any_override_gives_a_config_or_one_line(overrides):
    try:
        config = load_config(None, overrides)
    except ForgetlessError as error:
        assert "\n" not in str(error)
    else:
        # Whatever got through is finite and re-validates as it is.
        assert load_config(None, {"train.learning_rate": config.train.learning_rate})


@FUZZ
@given(st.text(max_size=40))
def test_any_yaml_file_gives_a_config_or_one_line(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text)
        try:
            load_config(path)
        except ForgetlessError as error:
            assert "\n" not in str(error)


@FUZZ
@given(st.text(max_size=30))
def test_any_set_flag_parses_or_fails_cleanly(text):
    try:
        key, value = parse_assignment(text)
    except ForgetlessError:
        return
    assert isinstance(key, str)
    yaml.safe_dump(value)
