"""Recipes and comparisons on the tiny model: chains that hand artefacts on, experts merged,
arms that share stages and sweep a setting, and stage identities derived from settings."""

import json
from importlib import resources

import pytest

from forgetless.config import load_raw, validate_config
from forgetless.errors import ForgetlessError
from forgetless.recipes.adapt import adapt_plan, run_adapt
from forgetless.recipes.compare import compare, expand_arms

TINY = {
    "model": {"name": "tiny-llama"},
    "train": {"max_steps": 2, "batch_size": 2, "max_length": 32, "save_steps": 2},
    "evaluate": {"domain_tasks": ["ppl:pubmedqa@test"], "general_tasks": ["c4"], "limit": 4},
    "data": {"source": "pubmedqa", "kind": "text", "split": "train", "limit": 24},
}


def _config(tmp_path, **sections):
    raw = {**TINY, **sections, "run_dir": str(tmp_path / "run")}
    return validate_config(raw)


def _events(log):
    return lambda event, info: log.append((event, getattr(info, "name", info)))


def test_mix_select_osft_chain_hands_each_artefact_on(tmp_path, shared_data_dir):
    config = _config(
        tmp_path,
        mix={
            "method": "uniform",
            "sources": ["c4", "pubmedqa@train"],
            "limit_per_source": 15,
            "tokens": 40_000,  # bytes of the tiny model's tokenizer: a few dozen documents
            "cluster": {"clusters": 4, "merge_distance": 0.6},
        },
        select={
            "method": "less",
            "budget": 0.5,
            "anchor": {"samples": 4},
            "validation": {"samples": 4},
            "gradient": {"projection_dim": 16, "warmup_steps": 1, "max_length": 400},
        },
        train={**TINY["train"], "method": "osft", "osft": {"calibration_samples": 2}},
        recipe={"steps": ["mix", "select", "train"]},
    )
    plan = adapt_plan(config, progress=False)
    names = [stage.name for stage in plan.stages]
    assert names[0] == "eval_base" and names[-2:] == ["eval_adapted", "report"]
    assert names.index("mixture_uniform") < names.index("warmup") < names.index("train")
    log = []
    results = run_adapt(config, _events(log), progress=False)
    sample = results["mixture_uniform"].summary
    selection = results["selection_less"].summary
    # The selection's pool is the mixture's sample, less the held-out validation records.
    assert selection["pool"] == sample["documents"] - 4
    assert results["train"].summary["records"] == selection["selected"]
    assert results["train"].summary["method"] == "osft"
    assert (results["train"].directory / "osft_ranks.json").is_file()
    report = json.loads((results["report"].directory / "report.json").read_text())
    assert report["meta"]["method"] == "mix uniform, select less 0.5, train osft"
    assert {row["task"] for row in report["rows"]} == {"ppl:pubmedqa@test", "c4"}

    again = []
    rerun = run_adapt(config, _events(again), progress=False)
    assert all(result.cached for result in rerun.values())
    assert {event for event, _ in again} == {"cached"}


def test_experts_are_trained_from_the_base_and_merged(tmp_path, shared_data_dir):
    config = _config(
        tmp_path,
        recipe={
            "steps": ["merge"],
            "experts": {
                "medical": {"source": "pubmedqa", "kind": "text", "limit": 10},
                "legal": {"source": "eurlex", "kind": "text", "limit": 5},
            },
        },
        merge={"method": "sotu", "keep": 0.5},
    )
    results = run_adapt(config, progress=False)
    merged = results["merge"]
    assert merged.summary["experts"] == ["train_medical", "train_legal"]
    assert (merged.directory / "model" / "merge_report.json").is_file()
    assert results["train_legal"].summary["records"] == 5
    assert results["report"].directory.is_dir()


def _arms_raw(tmp_path):
    return {
        **TINY,
        "run_dir": str(tmp_path / "run"),
        "compare": {
            "arms": {
                "full": {"train": {"method": "full"}},
                "osft": {
                    "train": {"method": "osft", "osft": {"calibration_samples": 2}},
                    "sweep": {"train.learning_rate": [1.0e-3, 1.0e-2]},
                },
            }
        },
    }


def test_compare_runs_arms_and_sweeps_sharing_what_they_share(tmp_path, shared_data_dir):
    arms = expand_arms(_arms_raw(tmp_path))
    assert [arm.label for arm in arms] == [
        "full",
        "osft learning_rate=0.001",
        "osft learning_rate=0.01",
    ]
    log = []
    run = compare(arms, tmp_path / "run", on_event=_events(log), progress=False)
    started = [name for event, name in log if event == "start"]
    assert started.count("eval_base") == 1  # one base evaluation for every arm
    assert sorted(name for name in started if name.endswith("/train")) == [
        "full/train",
        "osft@learning_rate=0.001/train",
        "osft@learning_rate=0.01/train",
    ]
    frontier = run.frontier
    assert [point["label"] for point in frontier["arms"]] == [arm.label for arm in arms]
    for point in frontier["arms"]:
        assert set(point["changes"]) == {"ppl:pubmedqa@test", "c4"}
        compute = point["compute"]
        assert compute["steps"] == 2 and compute["tokens"] == 2 * 2 * 32
        assert compute["seconds"] > 0 and compute["peak_memory_mb"] > 0
    assert frontier["arms"][1]["sweep"] == {"train.learning_rate": 0.001}
    files = {path.name for path in run.directory.iterdir()}
    assert files == {"frontier.json", "frontier.md", "frontier.html"}
    first = (run.directory / "frontier.json").read_bytes()

    again = []
    rerun = compare(expand_arms(_arms_raw(tmp_path)), tmp_path / "run", on_event=_events(again))
    assert {event for event, _ in again} == {"cached"}
    assert (rerun.directory / "frontier.json").read_bytes() == first


def test_a_comparison_finished_elsewhere_is_rebuilt_from_its_archive(tmp_path, shared_data_dir):
    raw = _arms_raw(tmp_path)
    del raw["compare"]["arms"]["osft"]
    # Evaluations and reports are kept whole; the models (larger) by their record only.
    raw.update(archive_dir=str(tmp_path / "archive"), archive_max_mb=0.25)
    first = compare(expand_arms(raw), tmp_path / "machine1", progress=False).frontier
    log = []
    again = compare(
        expand_arms(raw), tmp_path / "machine2", on_event=_events(log), progress=False
    ).frontier
    assert not [name for event, name in log if event == "start"]
    assert ("archived", "train") in log
    assert again["arms"][0]["model_dir"] is None and first["arms"][0]["model_dir"]
    for point in (first, again):
        point["arms"][0].pop("model_dir")
    assert again == first


def test_the_comparisons_axes_reach_the_frontier(tmp_path, shared_data_dir):
    raw = _arms_raw(tmp_path)
    raw["evaluate"] = {**TINY["evaluate"], "general_tasks": ["c4", "ppl:boolq"]}
    raw["compare"]["y_task"] = "ppl:boolq"
    del raw["compare"]["arms"]["osft"]
    arms = expand_arms(raw)
    assert arms[0].config.compare.y_task == "ppl:boolq" and not arms[0].config.compare.arms
    run = compare(arms, tmp_path / "run", progress=False)
    assert (run.frontier["x_task"], run.frontier["y_task"]) == ("ppl:pubmedqa@test", "ppl:boolq")


def test_seeds_train_each_arm_once_per_seed_and_pool_its_point(tmp_path, shared_data_dir):
    raw = _arms_raw(tmp_path)
    raw["compare"]["arms"] = {"full": {}, "lora": {"train": {"method": "lora"}}}
    raw["compare"]["seeds"] = [0, 1]
    arms = expand_arms(raw)
    assert [(arm.label, arm.folder, arm.point) for arm in arms] == [
        ("full seed=0", "full@seed=0", "full"),
        ("full seed=1", "full@seed=1", "full"),
        ("lora seed=0", "lora@seed=0", "lora"),
        ("lora seed=1", "lora@seed=1", "lora"),
    ]
    assert [arm.config.train.seed for arm in arms] == [0, 1, 0, 1]
    run = compare(arms, tmp_path / "run", progress=False)
    frontier = run.frontier
    assert frontier["seeds"] == [0, 1]
    assert [point["label"] for point in frontier["arms"]] == ["full", "lora"]
    models = {model["label"]: model for model in frontier["models"]}
    assert set(models) == {arm.label for arm in arms}
    for point in frontier["arms"]:
        assert point["models"] == [f"{point['label']} seed=0", f"{point['label']} seed=1"]
        for task, change in point["changes"].items():
            own = [models[label]["changes"][task]["change"] for label in point["models"]]
            # Each seed's value is that model's own paired change; the point is their mean
            # (of the token loss, so between the two), inside its interval.
            assert change["per_seed"] == pytest.approx(own)
            assert min(own) - 1e-9 <= change["change"] <= max(own) + 1e-9
            assert change["ci95"][0] <= change["change"] <= change["ci95"][1]
            assert change["unit"] == "% perplexity"
        assert point["compute"]["steps"] == 2
    full = frontier["arms"][0]["changes"]["c4"]["per_seed"]
    assert full[0] != full[1]  # another seed, another data order: another model
    assert "the seeds [0, 1]" in (run.directory / "frontier.md").read_text()
    with pytest.raises(ForgetlessError, match="must be different seeds"):
        expand_arms({**raw, "compare": {**raw["compare"], "seeds": [1, 1]}})
    raw["compare"]["arms"]["lora"]["train"]["seed"] = 3
    with pytest.raises(ForgetlessError, match="compare.arms.lora: sets train.seed"):
        expand_arms(raw)


def test_seeds_multiply_a_sweep_and_each_model_counts_towards_its_swept_point(tmp_path):
    raw = _arms_raw(tmp_path)
    raw["compare"]["seeds"] = [3, 4]
    arms = [arm for arm in expand_arms(raw) if arm.name == "osft"]
    assert [(arm.label, arm.folder, arm.point, arm.seed) for arm in arms] == [
        ("osft learning_rate=0.001 seed=3", "osft@learning_rate=0.001@seed=3",
         "osft learning_rate=0.001", 3),
        ("osft learning_rate=0.001 seed=4", "osft@learning_rate=0.001@seed=4",
         "osft learning_rate=0.001", 4),
        ("osft learning_rate=0.01 seed=3", "osft@learning_rate=0.01@seed=3",
         "osft learning_rate=0.01", 3),
        ("osft learning_rate=0.01 seed=4", "osft@learning_rate=0.01@seed=4",
         "osft learning_rate=0.01", 4),
    ]  # fmt: skip
    assert [(arm.config.train.seed, arm.config.train.learning_rate) for arm in arms] == [
        (3, 1e-3), (4, 1e-3), (3, 1e-2), (4, 1e-2)
    ]  # fmt: skip


def test_an_arm_may_not_change_what_is_measured(tmp_path):
    raw = _arms_raw(tmp_path)
    raw["compare"]["arms"]["full"]["evaluate"] = {"limit": 2}
    with pytest.raises(ForgetlessError, match="compare.arms.full: an arm may not change"):
        expand_arms(raw)


def test_run_refuses_a_comparison_config(tmp_path, run_cli):
    import yaml

    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump(_arms_raw(tmp_path)))
    code, _, err = run_cli(["run", "--config", str(path)])
    assert code == 2 and "forgetless compare --config" in err


def test_packaged_recipes_and_demo_are_valid():
    folder = resources.files("forgetless") / "configs"
    with resources.as_file(folder) as path:
        demo = expand_arms(load_raw(path / "demo.yaml"), "demo.yaml")
        assert [arm.name for arm in demo] == ["full", "forgetless"]
        assert demo[1].config.train.method != "full"
        # The same data and token budget for both arms.
        assert demo[0].config.data == demo[1].config.data
        tokens = {arm.config.train.max_steps * arm.config.train.batch_size for arm in demo}
        assert len(tokens) == 1
        for name in ("mix_select_osft.yaml", "sotu_experts.yaml"):
            validate_config(load_raw(path / "recipes" / name), name)


# --- identities derived from settings ---------------------------------------------------------


def _another(value):
    """A different valid-looking value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return [*value, value[-1]] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "extra": 1.0}
    return "x"


def _changed_fingerprints(make_stage, config, section, identity=True):
    """For each field of the section at dotted path ``section``: does the stage's fingerprint
    follow a change of it? Only the fields that define results, or with ``identity=False``
    only those that say where logs go (NOT_IDENTITY)."""
    from pydantic import BaseModel, ValidationError

    from forgetless.schema import NOT_IDENTITY

    def at(cfg, path):
        for part in path.split("."):
            cfg = getattr(cfg, part)
        return cfg

    def fingerprint(stage):
        return stage.fingerprint({name: "upstream" for name in stage.depends_on})

    reference = fingerprint(make_stage(config))
    follows = {}
    for name, value in at(config, section).model_dump().items():
        if isinstance(getattr(at(config, section), name), BaseModel):
            continue
        field = type(at(config, section)).model_fields[name]
        if (field.json_schema_extra != NOT_IDENTITY) != identity:
            continue
        raw = config.model_dump(mode="json")
        node = raw
        for part in section.split("."):
            node = node[part]
        node[name] = _another(value)
        try:
            changed = validate_config(raw)
        except (ForgetlessError, ValidationError):
            continue
        follows[name] = fingerprint(make_stage(changed)) != reference
    return follows


def test_stage_identities_follow_every_field_they_read(tmp_path):
    from forgetless.mix.stages import ClusterStage, EmbedStage, Mixture, SearchStage
    from forgetless.train.stages import TrainStage

    config = _config(tmp_path)

    def mixture(cfg):
        return Mixture(cfg.model, cfg.mix)

    for stage, section in (
        (lambda c: ClusterStage(mixture(c)), "mix.cluster"),
        (lambda c: SearchStage(mixture(c)), "mix.search"),
        (lambda c: EmbedStage(mixture(c)), "mix.embed"),
        (lambda c: TrainStage("train", c.model, c.train, data=c.data), "train"),
    ):
        follows = _changed_fingerprints(stage, config, section)
        assert follows and all(follows.values()), (section, follows)
    # Where training logs go and what the run is called are not what it computes.
    train = _changed_fingerprints(
        lambda c: TrainStage("train", c.model, c.train, data=c.data), config, "train", False
    )
    assert set(train) == {"run_name", "project"} and not any(train.values())
    logged = config.model_copy(
        update={"train": config.train.model_copy(update={"report_to": ["tensorboard"]})}
    )
    assert TrainStage("train", logged.model, logged.train, data=logged.data).fingerprint(
        {}
    ) == TrainStage("train", config.model, config.train, data=config.data).fingerprint({})
    # ... and not the fields they do not read: searching does not re-cluster.
    assert not any(
        _changed_fingerprints(lambda c: ClusterStage(mixture(c)), config, "mix.search").values()
    )
    assert not any(
        _changed_fingerprints(lambda c: EmbedStage(mixture(c)), config, "mix.cluster").values()
    )


@pytest.mark.slow
@pytest.mark.heavy
def test_packaged_recipe_runs_end_to_end_on_smollm2(tmp_path, shared_data_dir):
    """configs/recipes/mix_select_osft.yaml as shipped, on SmolLM2-135M, with every size
    shrunk to fit a test: mix (CLIMB search) -> select (OGS) -> train (OSFT) -> report."""
    shrink = {
        "run_dir": str(tmp_path / "run"),
        "mix.limit_per_source": 20,
        "mix.tokens": 6000,
        "mix.cluster.clusters": 4,
        "mix.cluster.super_clusters": 3,
        "mix.search.rounds": [4, 2],
        "mix.search.candidates": 200,
        "mix.search.predictor_iterations": 20,
        "mix.search.proxy_tokens": 1024,
        "mix.search.proxy_max_length": 32,
        "mix.search.target_limit": 4,
        "select.featured_samples": 8,
        "select.anchor.samples": 4,
        "select.validation.samples": 4,
        "select.gradient": {"projection_dim": 16, "warmup_steps": 1, "max_length": 128},
        "select.navigator": {"iterations": 5, "candidates": 4},
        "train.max_steps": 2,
        "train.batch_size": 1,
        "train.max_length": 64,
        "train.osft.calibration_samples": 2,
        "evaluate.task_limits": {},
        "evaluate.limit": 4,
    }
    folder = resources.files("forgetless") / "configs" / "recipes"
    with resources.as_file(folder) as path:
        config = validate_config(load_raw(path / "mix_select_osft.yaml", shrink))
    results = run_adapt(config, progress=False)
    assert results["mixture_climb"].summary["records_file"] == "records.jsonl"
    assert results["selection_ogs"].summary["selected"] > 0
    assert results["train"].summary["method"] == "osft"
    report = json.loads((results["report"].directory / "report.json").read_text())
    assert [row["task"] for row in report["rows"]] == ["ppl:medical_pool@test", "c4", "arc_easy"]
    rerun = run_adapt(config, progress=False)
    assert all(result.cached for result in rerun.values())


def test_per_expert_merge_settings_must_fit_the_recipe_before_training(tmp_path):
    experts = {
        "medical": {"source": "pubmedqa", "split": "train", "kind": "text", "limit": 4},
        "legal": {"source": "eurlex", "split": "train", "kind": "text", "limit": 4},
    }
    config = _config(
        tmp_path, recipe={"steps": ["merge"], "experts": experts}, merge={"weights": [1.0]}
    )
    with pytest.raises(ForgetlessError, match="merge.weights has 1 values for 2 experts"):
        run_adapt(config, progress=False)
    assert not (tmp_path / "run").exists()
