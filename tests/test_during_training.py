import json
from types import SimpleNamespace

import pytest

from forgetless.errors import ForgetlessError
from forgetless.evaluate.config import EvalConfig
from forgetless.evaluate.during_training import HeldOutLosses
from forgetless.models import load_model


def _state(step: int) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=True, global_step=step)


def test_held_out_losses_are_kept_across_a_resumed_run(shared_data_dir, tmp_path):
    loaded = load_model("tiny-llama", device="cpu")
    config = EvalConfig(task_limits={"c4": 2, "ppl:gsm8k@test": 3})
    output = tmp_path / "trajectory.json"

    def callback() -> HeldOutLosses:
        return HeldOutLosses(
            loaded.tokenizer,
            ["ppl:gsm8k@test", "c4"],
            [2, 0],
            config,
            output,
            data_dir=str(shared_data_dir),
        )

    callback().on_train_begin(None, _state(0), None, model=loaded.model)
    first = json.loads(output.read_text())
    assert list(first) == ["0"] and set(first["0"]) == {"ppl:gsm8k@test", "c4"}
    c4 = first["0"]["c4"]
    assert len(c4["document_nll"]) == len(c4["document_tokens"]) == 2 and c4["mean_nll"] > 0
    # Resumed: the step measured before the interruption is read back, not scored again
    # (a marked value survives), and only the steps asked for are scored.
    first["0"]["c4"]["mean_nll"] = -1.0
    output.write_text(json.dumps(first))
    resumed = callback()
    resumed.on_train_begin(None, _state(0), None, model=loaded.model)
    resumed.on_step_end(None, _state(1), None, model=loaded.model)
    resumed.on_step_end(None, _state(2), None, model=loaded.model)
    measured = json.loads(output.read_text())
    assert list(measured) == ["0", "2"] and measured["0"]["c4"]["mean_nll"] == -1.0
    # The same weights score the same: step 2 here is the untouched model.
    assert measured["2"]["ppl:gsm8k@test"] == first["0"]["ppl:gsm8k@test"]


def test_held_out_losses_are_perplexity_tasks(shared_data_dir, tmp_path):
    loaded = load_model("tiny-llama", device="cpu")
    with pytest.raises(ForgetlessError, match="perplexity tasks; not arc_easy"):
        HeldOutLosses(
            loaded.tokenizer,
            ["c4", "arc_easy"],
            [0],
            EvalConfig(limit=2),
            tmp_path / "trajectory.json",
            data_dir=str(shared_data_dir),
        )
    with pytest.raises(ForgetlessError, match="zero or positive"):
        HeldOutLosses(loaded.tokenizer, ["c4"], [-1], EvalConfig(limit=2), tmp_path / "t.json")
