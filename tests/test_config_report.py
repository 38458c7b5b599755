"""Config schema (YAML + overrides, one-line errors) and the retention report."""

import json

import pytest
import yaml

from forgetless.config import (
    ForgetlessConfig,
    defaults_as_yaml,
    load_config,
    load_raw,
    parse_assignment,
    validate_config,
)
from forgetless.errors import ForgetlessError
from forgetless.report.retention import build_retention_report, render_markdown, write_report


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.001\n  method: lora\nmodel:\n  name: tiny-llama\n")
    config = load_config(path, {"train.learning_rate": 5e-4, "train.max_steps": None})
    assert config.train.learning_rate == 5e-4
    assert config.train.method == "lora"
    assert config.train.max_steps == ForgetlessConfig().train.max_steps
    assert config.model.name == "tiny-llama"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("train:\n  lerning_rate: 0.1\n", "train.lerning_rate"),
        ("train:\n  method: qlora\n", "train.method"),
        ("train: [1, 2\n", r"c\.yaml:\d+: invalid YAML"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_config_is_one_line(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ForgetlessError, match=match) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ForgetlessError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_extends_replaces_whole_sections_of_the_base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.yaml").write_text(
        "model:\n  name: tiny-llama\n"
        "train:\n  method: lora\n  learning_rate: 0.001\n"
        "compare:\n  arms:\n    plain: {}\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text("extends: base/b.yaml\ntrain:\n  max_steps: 7\n")
    config = load_config(path, {"train.learning_rate": 5e-4})
    assert config.model.name == "tiny-llama"  # inherited section
    assert config.train.max_steps == 7
    # The extending file's train section is the whole section: the base's method is not kept.
    assert config.train.method == ForgetlessConfig().train.method
    assert config.train.learning_rate == 5e-4  # overrides apply last
    assert "plain" in config.compare.arms


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"c.yaml": "extends: nope.yaml\n"}, r"c\.yaml: extends nope\.yaml, which is not a file"),
        ({"c.yaml": "extends: [a.yaml]\n"}, r"c\.yaml: extends must name one config file"),
        ({"c.yaml": "extends: d.yaml\n", "d.yaml": "extends: c.yaml\n"}, "makes a cycle"),
        ({"c.yaml": "extends: d.yaml\n", "d.yaml": "train: [1, 2\n"}, r"d\.yaml:\d+: invalid"),
    ],
)
def test_bad_extends_is_one_line(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ForgetlessError, match=match) as caught:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("files", "where"),
    [
        # The value's own line, nested and in a list.
        ({"c.yaml": "model:\n  name: tiny-llama\ntrain:\n  learning_rate: -1\n"}, "c.yaml:4"),
        ({"c.yaml": "evaluate:\n  general_tasks:\n    - c4\n    - 7\n"}, "c.yaml:4"),
        # A section inherited through `extends` is blamed on the base that writes it.
        ({"c.yaml": "extends: d.yaml\nmodel: {}\n", "d.yaml": "\ntrain: {batch_size: 0}\n"},
         "d.yaml:2"),
        # A comparison arm's value, not the top-level section of the same name.
        ({"c.yaml": "train: {max_steps: 3}\ncompare:\n  arms:\n    a:\n      train:\n"
                    "        max_steps: x\n"}, "c.yaml:6: compare.arms.a: invalid config"),
        # A method no family registers: a check across sections, still blamed on its line.
        ({"c.yaml": "model: {name: tiny-llama}\nmerge:\n  keep: 0.5\n  method: nope\n"},
         "c.yaml:4: invalid config: merge.method 'nope' is not one of"),
    ],
)  # fmt: skip
def test_an_invalid_value_is_blamed_on_the_line_that_sets_it(tmp_path, files, where):
    from forgetless.recipes.compare import expand_arms

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    path = tmp_path / "c.yaml"
    raw = load_raw(path)
    with pytest.raises(ForgetlessError) as caught:
        if "compare" in raw:
            expand_arms(raw, path)
        else:
            validate_config(raw, path)
    assert str(caught.value).startswith(f"{tmp_path / where}")
    assert "\n" not in str(caught.value)


def test_an_unregistered_method_set_by_a_flag_is_blamed_on_the_flag():
    with pytest.raises(ForgetlessError) as caught:
        load_config(None, {"train.method": "qlora"}, {"train.method": "--method"})
    assert str(caught.value).startswith("--method: train.method 'qlora' is not one of: full")


def test_set_assignments_parse_yaml_values():
    assert parse_assignment("train.max_steps=10") == ("train.max_steps", 10)
    assert parse_assignment("evaluate.general_tasks=[arc_easy, c4]") == (
        "evaluate.general_tasks",
        ["arc_easy", "c4"],
    )
    with pytest.raises(ForgetlessError):
        parse_assignment("train.max_steps")


def test_defaults_yaml_round_trips_and_documents_every_field():
    text = defaults_as_yaml()
    assert load_config(None) == ForgetlessConfig.model_validate(yaml.safe_load(text))
    comments = [line for line in text.splitlines() if line.strip().startswith("#")]
    fields = [
        line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    assert len(comments) == len(fields) + 1  # one description per field, plus the header


def _metrics(acc, ppl, domain_ppl):
    def entry(metric, value, higher):
        return {"metric": metric, "value": value, "higher_is_better": higher, "ci95": None, "n": 10}

    return {
        "arc_easy": entry("accuracy", acc, True),
        "c4": entry("perplexity", ppl, False),
        "ppl:pubmedqa@test": entry("perplexity", domain_ppl, False),
    }


def test_retention_report_orients_changes_so_positive_is_better(tmp_path):
    report = build_retention_report(
        _metrics(0.50, 30.0, 20.0),
        _metrics(0.45, 33.0, 15.0),
        domain_tasks=["ppl:pubmedqa@test"],
        general_tasks=["arc_easy", "c4"],
        meta={
            "model": "m",
            "training": {"train_runtime_s": 12.0, "steps": 3, "input_tokens_seen": 99},
        },
    )
    rows = {row["task"]: row for row in report["rows"]}
    assert rows["ppl:pubmedqa@test"]["improvement_pct"] == pytest.approx(25.0)
    assert rows["c4"]["improvement_pct"] == pytest.approx(-10.0)
    assert rows["arc_easy"]["improvement_pct"] == pytest.approx(-10.0)
    assert rows["arc_easy"]["delta"] == pytest.approx(-0.05)
    assert report["summary"]["general_improvement_pct"] == pytest.approx(-10.0)
    markdown = render_markdown(report)
    assert "| general | arc_easy | accuracy | 50.00 % | 45.00 % | -5.00 pt | -10.0 % |" in markdown
    assert "3 optimizer steps" in markdown
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["group"] == "domain"
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_report_requires_every_task():
    with pytest.raises(ForgetlessError, match="missing"):
        build_retention_report(_metrics(0.5, 1, 1), {}, ["c4"], [])
