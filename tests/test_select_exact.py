"""Exact mean-direction scores (forgetless.select.exact): against per-sample autograd, and
selections with select.gradient.projector=exact end to end."""

import numpy as np
import pytest
import torch

from forgetless.data.features import sample_example
from forgetless.data.records import TextRecord
from forgetless.errors import ForgetlessError
from forgetless.models import load_model
from forgetless.select.config import GradientConfig
from forgetless.select.exact import (
    ReferenceProducts,
    direction_norm,
    exact_directions,
    exact_scores,
    exact_settings,
)
from forgetless.select.gradients import (
    extract_gradient_features,
    gradient_modules,
    per_sample_losses,
)


def _records(prefix: str, count: int):
    return [
        TextRecord(text=f"{prefix} {index} " + "abc def ghi " * (index + 1), id=f"{prefix}{index}")
        for index in range(count)
    ]


def _explicit_gradient(model, tokenizer, record, modules, max_length) -> torch.Tensor:
    """One record's gradient of its mean token loss, layer after layer, by plain autograd."""
    ids, labels = sample_example(tokenizer, record, max_length)
    logits = model(input_ids=torch.tensor([ids])).logits
    loss, _ = per_sample_losses(logits, torch.tensor([labels]))
    parameters = [p for m in modules.values() for p in (m.weight, m.bias) if p is not None]
    grads = torch.autograd.grad(loss.sum(), parameters)
    return torch.cat([grad.reshape(-1) for grad in grads]).double()


@pytest.mark.parametrize("parameters", ["blocks", "last_blocks"])
def test_exact_cosines_equal_those_of_explicit_gradients(tmp_path, parameters):
    loaded = load_model("tiny-llama")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    settings = exact_settings(
        GradientConfig(parameters=parameters, batch_size=3, shard_size=4, max_length=40)
    )
    anchor, validation, pool = _records("a", 5), _records("v", 4), _records("p", 7)
    anchor_mean, target = exact_directions(
        model, tokenizer, anchor, validation, settings, tmp_path / "norms", progress=False
    )
    modules = gradient_modules(model, parameters)
    assert list(anchor_mean) == list(modules)

    def explicit(records):
        return [_explicit_gradient(model, tokenizer, r, modules, 40) for r in records]

    expected_anchor = torch.stack(explicit(anchor)).mean(0)
    expected_target = torch.stack([g / g.norm() for g in explicit(validation)]).mean(0)
    torch.testing.assert_close(
        torch.cat(list(anchor_mean.values())).double(), expected_anchor, rtol=1e-4, atol=1e-7
    )
    torch.testing.assert_close(
        torch.cat(list(target.values())).double(), expected_target, rtol=1e-4, atol=1e-7
    )
    assert direction_norm(anchor_mean) == pytest.approx(expected_anchor.norm().item(), rel=1e-5)

    features = extract_gradient_features(
        model,
        tokenizer,
        pool,
        settings,
        tmp_path / "pool",
        progress=False,
        projector=ReferenceProducts([anchor_mean, target], torch.device("cpu")),
    )
    scores = exact_scores(features, direction_norm(anchor_mean), direction_norm(target))
    alignment, utility = scores.alignment, scores.utility
    assert scores.orthogonality is None
    for row, gradient in enumerate(explicit(pool)):
        cosine = torch.nn.functional.cosine_similarity
        assert features.norm[row] == pytest.approx(gradient.norm().item(), rel=1e-4)
        assert alignment[row] == pytest.approx(
            cosine(gradient, expected_anchor, dim=0).item(), abs=1e-4
        )
        assert utility[row] == pytest.approx(
            cosine(gradient, expected_target, dim=0).item(), abs=1e-4
        )
    # Nothing of the model changed: no gradient left behind, training flags restored.
    assert all(param.grad is None for param in model.parameters())


def test_exact_settings_leave_out_the_projection_and_refuse_a_lora():
    sketched = GradientConfig(parameters="blocks", projector="kronecker", projection_dim=4096)
    dense = GradientConfig(parameters="blocks", projection_dim=64)
    assert exact_settings(sketched) == exact_settings(dense)
    assert exact_settings(sketched) != exact_settings(
        sketched.model_copy(update={"max_length": 64})
    )
    with pytest.raises(ForgetlessError, match="parameters to blocks or last_blocks"):
        exact_settings(GradientConfig(parameters="lora"))


def test_non_finite_products_are_refused():
    class Features:
        vectors = np.array([[np.inf, 1.0]], dtype=np.float32)
        norm = np.array([1.0], dtype=np.float32)

    with pytest.raises(ForgetlessError, match="non-finite"):
        exact_scores(Features(), 1.0, 1.0)


def test_an_exact_selection_needs_a_cost_without_the_anchor_subspace_and_a_models_weights():
    from forgetless.config import load_config

    exact = {"select.gradient.projector": "exact", "select.gradient.parameters": "blocks"}
    with pytest.raises(ForgetlessError, match="set select.cost to conflict"):
        load_config(None, exact)
    with pytest.raises(ForgetlessError, match="set parameters to blocks or last_blocks"):
        load_config(
            None, {**exact, "select.gradient.parameters": "lora", "select.cost": "conflict"}
        )


@pytest.mark.parametrize("method", ["orthogonal", "ogs", "less"])
def test_an_exact_selection_is_reproducible_and_meets_its_bound(
    method, shared_data_dir, select_twice
):
    from forgetless.config import load_config

    settings = {
        "model.name": "tiny-llama",
        "data.source": "pubmedqa",
        "data.limit": 40,
        "select.method": method,
        "select.budget": 0.25,
        "select.cost": "conflict",
        "select.anchor.samples": 8,
        "select.validation.samples": 6,
        "select.featured_samples": 24,
        "select.gradient.parameters": "blocks",
        "select.gradient.projector": "exact",
        "select.gradient.max_length": 400,
        "select.gradient.shard_size": 16,
        "select.navigator.iterations": 20,
        "select.navigator.candidates": 12,
    }
    results, _ = select_twice(load_config(None, settings), method)
    selection = results[f"selection_{method}"]
    assert {"exact_directions", "exact_featured" if method == "ogs" else "exact_pool"} <= set(
        results
    )
    assert not any(name.startswith("gradients_") for name in results)
    summary = selection.summary
    # No anchor subspace: no orthogonality and no captured energy, the rest as usual.
    assert set(summary["gradient_metrics"]) >= {"conflict", "utility"}
    assert "orthogonality" not in summary["gradient_metrics"]
    assert "anchor_energy_captured" not in summary
    assert summary["selected"] == round(0.25 * 34)
    metrics = summary["gradient_metrics"]
    if method == "orthogonal":
        # The exact constrained choice meets its bound on the exact costs.
        assert metrics["conflict"]["selected_mean"] <= summary["cost_limit"] + 1e-9
    if method == "less":
        assert metrics["utility"]["selected_mean"] > metrics["utility"]["pool_mean"]
