"""The method registry: the built-in methods, config validation, the CLI listing, the docs
tables, and a merge method added by one module of its own."""

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from forgetless import registry
from forgetless.config import load_config
from forgetless.errors import ForgetlessError

REPO = Path(__file__).resolve().parents[1]

BUILT_IN = {
    "mix": ["climb", "uniform", "natural"],
    "select": ["all", "random", "less", "orthogonal", "ogs"],
    "train": ["full", "lora", "osft"],
    "merge": ["sotu", "task_arithmetic", "ties", "dare"],
    "continual": ["seqft", "lora", "osft", "sotu", "multitask", "replay", "ewc", "olora"],
}


def test_every_family_has_its_built_in_methods():
    import forgetless.catalog  # noqa: F401

    assert {family: list(registry.names(family)) for family in registry.FAMILIES} == BUILT_IN
    for method in registry.methods():
        assert method.summary and method.consumes and method.produces
        if method.settings:  # the settings a method names exist in the config
            section = load_config(None)
            for part in method.settings.split("."):
                section = getattr(section, part)


@pytest.mark.parametrize("family", list(BUILT_IN))
def test_an_unknown_method_is_refused_with_the_choices(family):
    with pytest.raises(ForgetlessError, match=f"{family}.method 'nope' is not one of: "):
        load_config(None, {f"{family}.method": "nope"})


def test_methods_command_lists_every_method(run_cli):
    code, out, _ = run_cli(["methods"])
    assert code == 0
    for family, names in BUILT_IN.items():
        for name in names:
            assert re.search(rf"│ {family}\s+│ {name}\s+│", out), (family, name)
    code, out, err = run_cli(["methods", "nonsense"])
    assert code == 2 and "unknown method family 'nonsense'" in err


def test_the_docs_tables_are_the_registry(run_cli):
    """docs/methods.md embeds `forgetless methods --markdown` verbatim."""
    code, out, _ = run_cli(["methods", "--markdown"])
    assert code == 0
    assert out.strip() in (REPO / "docs" / "methods.md").read_text()


@pytest.fixture
def toy_merge():
    # The tests folder is on sys.path (pytest's rootdir-less layout): a plugin is a module.
    sys.modules.pop("plugins.toy_merge", None)
    module = importlib.import_module("plugins.toy_merge")
    yield module
    registry.unregister("merge", "masked_mean")
    from forgetless.merge.methods import CONSENSUS

    CONSENSUS.pop("mean", None)


def test_a_merge_method_is_one_module_and_its_registration(toy_merge, tmp_path, run_cli):
    from forgetless.merge import merge_checkpoints
    from forgetless.merge.config import MergeConfig
    from forgetless.models import load_model

    assert "masked_mean" in registry.names("merge")
    config = load_config(None, {"merge.method": "masked_mean", "merge.keep": 0.5})
    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(tmp_path / "base")
    loaded.tokenizer.save_pretrained(tmp_path / "base")
    experts = []
    for index in range(2):
        expert = load_model("tiny-llama")
        with torch.no_grad():
            for parameter in expert.model.parameters():
                parameter.add_(0.01 * (index + 1))
        expert.model.save_pretrained(tmp_path / f"e{index}")
        expert.tokenizer.save_pretrained(tmp_path / f"e{index}")
        experts.append(str(tmp_path / f"e{index}"))
    merge_checkpoints(str(tmp_path / "base"), experts, tmp_path / "mean", config.merge)
    sotu = MergeConfig(method="sotu", keep=0.5)
    merge_checkpoints(str(tmp_path / "base"), experts, tmp_path / "sum", sotu)

    def weights(name):
        return AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict()

    base, mean, summed = weights("base"), weights("mean"), weights("sum")
    key = "model.layers.0.mlp.up_proj.weight"
    # The same masks: the averaged delta is half of SoTU's summed one.
    torch.testing.assert_close(mean[key] - base[key], (summed[key] - base[key]) / 2)
    # The CLI offers it like any built-in.
    code, out, _ = run_cli(["methods", "merge"])
    assert code == 0 and "masked_mean" in out
