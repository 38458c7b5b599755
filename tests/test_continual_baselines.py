"""The continual baselines replay, ewc and olora: their pieces on hand-built examples, the
penalties' effect on a tiny model, and each strategy end to end on a two-task sequence."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from forgetless.config import load_config
from forgetless.data.features import sample_example
from forgetless.data.records import InstructionRecord
from forgetless.errors import ForgetlessError
from forgetless.io import load_tensors
from forgetless.models import load_model
from forgetless.recipes import continual
from forgetless.train.config import TrainConfig
from forgetless.train.penalties import (
    FISHER_FILE,
    SUBSPACES_FILE,
    EwcCallback,
    OloraCallback,
    adapter_subspaces,
    empirical_fisher,
    orthogonality_gradient,
    orthogonality_penalty,
    overlap,
)
from forgetless.train.sft import train_model

# What the Trainer hands a callback, as far as the penalties read it.
ARGS = SimpleNamespace(deepspeed=None, fsdp=[])

# A two-task order of the few-shot benchmark (the tasks with the fewest labels), registered
# for this module only: every strategy then runs end to end in seconds.
TWO_TASKS = 9
TINY = {
    "model.name": "tiny-llama",
    "model.device": "cpu",
    "train.max_steps": 1,
    "train.batch_size": 2,
    # Byte-level tokens: max_length must hold a whole prompt (~600 bytes).
    "train.max_length": 1024,
    "continual.order": TWO_TASKS,
    "continual.train_limit": 4,
    "continual.eval_limit": 1,
    "continual.retention_tasks": [],
}
FIRST, SECOND = "fewshot_agnews", "fewshot_amazon"


@pytest.fixture(scope="module", autouse=True)
def two_task_order():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(continual.ORDERS["fewshot"], TWO_TASKS, ("agnews", "amazon"))
        yield


def _records(topic: str, count: int) -> list[InstructionRecord]:
    return [
        InstructionRecord(prompt=f"{topic} question {i}?", response=f"{topic} answer {i}.")
        for i in range(count)
    ]


def _train(model, tokenizer, records, output, callbacks=(), **settings):
    config = TrainConfig(
        **{"learning_rate": 1e-2, "max_steps": 8, "batch_size": 4, "max_length": 64, **settings}
    )
    trained, _ = train_model(
        model, tokenizer, records, config, output, callbacks=callbacks, progress=False
    )
    return trained


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("train.ewc.lam", float("nan")),
        ("train.ewc.lam", -1.0),
        ("train.ewc.fisher_samples", 0),
        ("train.olora.lam", float("inf")),
        ("continual.replay_per_task", 0),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ForgetlessError, match=f"invalid config value for {setting}: "):
        load_config(None, {setting: value})


# --- replay ---------------------------------------------------------------------------------


def test_replay_trains_on_the_same_buffer_of_each_earlier_task(tmp_path, shared_data_dir):
    overrides = {**TINY, "run_dir": str(tmp_path), "continual.method": "replay"}
    overrides.update({"continual.train_limit": 8, "continual.replay_per_task": 3})

    def second_stage_records():
        config = load_config(None, overrides)
        data = continual.TaskData(config)
        tasks = continual.task_sequence("fewshot", TWO_TASKS)
        stages = continual.sequence_stages(config, data, tasks)
        first, second = (stage for stage in stages if stage.name.startswith("train_"))
        assert first.training_records() == data.train_records(FIRST)  # nothing to replay yet
        seqft = continual.sequence_stages(
            load_config(None, {**overrides, "continual.method": "seqft"}), data, tasks
        )
        assert first.fingerprint({}) == seqft[0].fingerprint({})  # one stage for both
        return second.training_records(), data

    records, data = second_stage_records()
    own, earlier = set(data.train_records(SECOND)), set(data.train_records(FIRST))
    replayed = [record for record in records if record in earlier]
    assert len(replayed) == 3 and len(set(replayed)) == 3
    assert len(records) == 8 + 3 and set(records) - set(replayed) == own
    # Shuffled into one stream with the train seed, not appended as a block.
    assert records[-3:] != replayed
    again, _ = second_stage_records()  # a rerun: fresh data, fresh stages
    assert again == records


# --- EWC ------------------------------------------------------------------------------------


def test_ewc_callback_adds_lambda_fisher_times_the_drift_to_the_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    fisher = {"weight": torch.rand(2, 3), "bias": torch.rand(2)}
    anchor = {name: param.detach().clone() for name, param in model.named_parameters()}
    callback = EwcCallback(model, fisher, lam=7.0)
    with torch.no_grad():
        model.weight.add_(torch.randn(2, 3))
        model.bias.add_(torch.randn(2))
    task_gradient = torch.randn(2, 3)
    model.weight.grad = task_gradient.clone()
    model.bias.grad = None  # a weight the task's loss did not reach still feels the penalty
    weights = model.weight.detach().clone()
    callback.on_train_begin(ARGS, None, None)
    callback.on_pre_optimizer_step(ARGS, None, None)
    assert torch.equal(model.weight.detach(), weights)  # the hook changes gradients only
    drift = {name: param.detach() - anchor[name] for name, param in model.named_parameters()}
    torch.testing.assert_close(
        model.weight.grad, task_gradient + 7.0 * fisher["weight"] * drift["weight"]
    )
    torch.testing.assert_close(model.bias.grad, 7.0 * fisher["bias"] * drift["bias"])
    expected = 3.5 * sum(float((fisher[name] * drift[name] ** 2).sum()) for name in fisher)
    assert callback.penalty(model) == pytest.approx(expected)

    with pytest.raises(ForgetlessError, match="lacks"):
        EwcCallback(model, {"other.weight": torch.ones(2, 3)}, lam=1.0)


def test_empirical_fisher_averages_each_records_squared_gradient():
    loaded = load_model("tiny-llama")
    model, tokenizer = loaded.model, loaded.tokenizer
    records = _records("cell", 2)
    fisher = empirical_fisher(model, tokenizer, records, max_length=64)
    gradients = []
    for record in records:
        input_ids, labels = sample_example(tokenizer, record, 64)
        loss = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
        gradients.append(torch.autograd.grad(loss, model.model.norm.weight)[0])
    name = "model.norm.weight"
    mean_square = (gradients[0] ** 2 + gradients[1] ** 2) / 2
    torch.testing.assert_close(fisher[name], mean_square)
    # Not the square of the batch's mean gradient, which averages before squaring.
    assert not torch.allclose(fisher[name], ((gradients[0] + gradients[1]) / 2) ** 2)
    assert all(param.grad is None for param in model.parameters())


def test_a_huge_ewc_lambda_keeps_the_weights_near_the_anchor(tmp_path):
    loaded = load_model("tiny-llama")
    anchor = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    fisher = empirical_fisher(loaded.model, loaded.tokenizer, _records("cell", 8), 64)
    drift = {}
    for lam in (0.0, 1e8):
        model = load_model("tiny-llama").model
        callback = EwcCallback(model, fisher, lam)
        trained = _train(
            model, loaded.tokenizer, _records("law", 8), tmp_path / f"{lam}", [callback]
        )
        moved = [(p.detach() - anchor[name]).flatten() for name, p in trained.named_parameters()]
        drift[lam] = float(torch.cat(moved).norm())
    assert drift[1e8] < 0.2 * drift[0.0], drift


# --- O-LoRA ---------------------------------------------------------------------------------


def test_orthogonality_gradient_is_the_penalty_gradient():
    torch.manual_seed(0)
    previous = torch.randn(8, 12, dtype=torch.float64)  # two earlier tasks of rank 4, stacked
    current = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    (autograd,) = torch.autograd.grad(0.5 * orthogonality_penalty(previous, current), current)
    torch.testing.assert_close(orthogonality_gradient(previous, current.detach(), 0.5), autograd)
    # The stacked form is the sum over the earlier tasks.
    split = sum(orthogonality_penalty(part, current) for part in previous.split(4))
    torch.testing.assert_close(orthogonality_penalty(previous, current), split)


def test_olora_callback_adds_the_gradient_to_every_lora_a():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_model("tiny-llama").model, LoraConfig(r=4, target_modules="all-linear")
    )
    lora_a = {name: p for name, p in model.named_parameters() if ".lora_A." in name}
    modules = {
        name.split(".lora_A.")[0].removeprefix("base_model.model."): p for name, p in lora_a.items()
    }
    torch.manual_seed(0)
    previous = {module: torch.randn(8, p.shape[1]) for module, p in modules.items()}
    callback = OloraCallback(previous, lam=0.5)
    callback.on_train_begin(ARGS, None, None, model=model)
    assert len(callback.pairs) == len(modules) == 14
    for param in lora_a.values():
        param.grad = torch.ones_like(param)
    callback.on_pre_optimizer_step(ARGS, None, None)
    for module, param in modules.items():
        current = param.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad(
            0.5 * orthogonality_penalty(previous[module], current), current
        )
        torch.testing.assert_close(param.grad, 1 + expected)

    missing = {**previous, "model.layers.9.mlp.up_proj": torch.randn(8, 64)}
    with pytest.raises(ForgetlessError, match="train.lora.target_modules"):
        OloraCallback(missing, lam=0.5).on_train_begin(ARGS, None, None, model=model)


def test_a_large_olora_lambda_trains_the_next_lora_orthogonal_to_the_first(tmp_path):
    loaded = load_model("tiny-llama")
    lora = {"method": "lora", "lora": {"r": 4, "dropout": 0.0}}
    _train(loaded.model, loaded.tokenizer, _records("cell", 8), tmp_path / "task1", **lora)
    first = adapter_subspaces(tmp_path / "task1" / "adapter")
    overlaps = {}
    for lam in (0.0, 100.0):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "task1" / "model")
        callback = OloraCallback(first, lam)
        output = tmp_path / f"task2-{lam}"
        _train(merged, loaded.tokenizer, _records("law", 8), output, [callback], **lora)
        overlaps[lam] = overlap(first, adapter_subspaces(output / "adapter"))
    # Same seed, same shapes: without the penalty the second LoRA starts where the first did.
    assert overlaps[100.0] < 0.1 * overlaps[0.0], overlaps


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One run directory for every strategy: the base evaluation runs once."""
    return tmp_path_factory.mktemp("continual")


def _sequence(run_dir, method):
    return run_dir / "fewshot-0_42" / f"order{TWO_TASKS}-{method}"


@pytest.mark.parametrize("method", ["replay", "ewc", "olora"])
def test_each_baseline_runs_end_to_end_and_a_rerun_changes_nothing(
    method, run_dir, shared_data_dir, run_cli
):
    argv = ["continual", "--method", method, "--output-dir", str(run_dir)]
    for key, value in {**TINY, "continual.replay_per_task": 2}.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert f"# Continual learning: fewshot order {TWO_TASKS}, {method}" in out
    sequence = _sequence(run_dir, method)
    report_file = sequence / "report" / "continual.json"
    report_bytes = report_file.read_bytes()
    report = json.loads(report_bytes)
    assert report["method"] == method and len(report["matrix"]) == 2
    first, second = report["training"]
    assert [first["method"], second["method"]] == ["lora" if method == "olora" else "full"] * 2

    if method == "replay":
        # The first task trains as seqft's (nothing to replay yet), in a stage both share.
        assert "replayed" not in first and second["replayed"] == 2
        assert [first["records"], second["records"]] == [4, 6]
    elif method == "ewc":
        earlier = load_tensors(sequence / "train_01_agnews" / FISHER_FILE)
        summed = load_tensors(sequence / "train_02_amazon" / FISHER_FILE)
        # The second file holds the first task's Fisher plus the second's, of the trained model.
        model = AutoModelForCausalLM.from_pretrained(sequence / "train_02_amazon" / "model")
        records = continual.TaskData(load_config(None, TINY)).train_records(SECOND)
        own = empirical_fisher(model, load_model("tiny-llama").tokenizer, records, 1024)
        assert set(summed) == set(earlier) == set(own)
        for name in summed:
            torch.testing.assert_close(summed[name], earlier[name] + own[name])
        assert first["ewc_penalty"] is None and second["ewc_penalty"] > 0
        assert second["fisher_samples"] == 4
    else:
        earlier = load_tensors(sequence / "train_01_agnews" / SUBSPACES_FILE)
        stacked = load_tensors(sequence / "train_02_amazon" / SUBSPACES_FILE)
        own = adapter_subspaces(sequence / "train_02_amazon" / "adapter")
        assert set(stacked) == set(earlier) == set(own) and len(own) == 14
        for module in stacked:
            torch.testing.assert_close(stacked[module], torch.cat([earlier[module], own[module]]))
        assert first["olora_overlap"] is None
        assert second["olora_overlap"] == pytest.approx(overlap(earlier, own))

    code, _, err = run_cli(argv)
    assert code == 0 and "▶" not in err, err  # every stage cached
    assert report_file.read_bytes() == report_bytes

    if method != "replay":
        # A sequence resumed after its second task was lost retrains it from what the first
        # task stored, to the same result.
        carried = FISHER_FILE if method == "ewc" else SUBSPACES_FILE
        before = (sequence / "train_02_amazon" / carried).read_bytes()
        shutil.rmtree(sequence / "train_02_amazon")
        code, _, err = run_cli(argv)
        assert code == 0 and "▶ train_02_amazon" in err and "▶ train_01" not in err, err
        assert (sequence / "train_02_amazon" / carried).read_bytes() == before
        assert report_file.read_bytes() == report_bytes
