"""The closed-form class-incremental head and the backbone features it is fitted on."""

from __future__ import annotations

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.merge.closed_form import RandomProjectionRidge, extract_features
from forgetless.models import load_model

FEATURE_DIM = 16
CLASSES = 6
TASKS = ((0, 1), (2, 3), (4, 5))


def blobs(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed, well separated centres; ``seed`` draws only the noise."""
    centres = 4 * torch.randn(CLASSES, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
    noise = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), FEATURE_DIM, generator=noise)
    return features, labels


def task_slice(features, labels, classes):
    keep = torch.isin(labels, torch.tensor(classes))
    return features[keep], labels[keep]


def head(**options) -> RandomProjectionRidge:
    return RandomProjectionRidge(FEATURE_DIM, projection_dim=256, **options)


def accuracy(classifier, features, labels) -> float:
    return float((classifier.predict(features) == labels).double().mean())


@pytest.fixture(scope="module")
def data():
    return blobs(60, seed=1), blobs(30, seed=2)


@pytest.mark.parametrize("ridge_grid", [(1.0,), (1e-2, 1e-1, 1.0, 10.0, 100.0)])
def test_task_by_task_fit_equals_one_fit_on_all_tasks(data, ridge_grid):
    (train, train_labels), (test, test_labels) = data
    sequential = head(ridge_grid=ridge_grid)
    for number, classes in enumerate(TASKS, 1):
        sequential.partial_fit(*task_slice(train, train_labels, classes))
        assert sequential.classes == tuple(range(2 * number))
        assert sequential.scores(test).shape == (len(test), 2 * number)
        assert sequential.ridge in ridge_grid
    joint = head(ridge_grid=ridge_grid)
    joint.partial_fit(train, train_labels)

    torch.testing.assert_close(sequential.gram, joint.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(sequential.cross, joint.cross, rtol=1e-12, atol=1e-9)
    assert accuracy(sequential, test, test_labels) > 0.9
    if len(ridge_grid) == 1:
        assert torch.equal(sequential.predict(test), joint.predict(test))


def test_ridge_selection_rejects_a_ridge_that_shrinks_everything_away(data):
    (train, train_labels), _ = data
    classifier = head(ridge_grid=(1.0, 1e9))
    classifier.partial_fit(*task_slice(train, train_labels, TASKS[0]))
    assert classifier.ridge == 1.0


def test_same_seed_gives_identical_predictions(data):
    (train, train_labels), (test, _) = data

    def fitted_scores(seed: int) -> torch.Tensor:
        classifier = head(seed=seed)
        for classes in TASKS:
            classifier.partial_fit(*task_slice(train, train_labels, classes))
        return classifier.scores(test)

    first = fitted_scores(0)
    assert torch.equal(first, fitted_scores(0))
    assert not torch.equal(first, fitted_scores(1))


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu")


def test_features_pool_the_final_hidden_states_independently_of_the_batch(tiny):
    short, long = "short text", "a much longer text, which pads the short one in its batch"
    decoder = tiny.model.get_decoder()
    for pooling in ("mean", "last"):
        batched = extract_features(
            tiny.model, tiny.tokenizer, [short, long], pooling=pooling, progress=False
        )
        alone = extract_features(
            tiny.model, tiny.tokenizer, [short], pooling=pooling, progress=False
        )
        assert batched.shape == (2, tiny.model.config.hidden_size)
        assert batched.dtype == torch.float32 and batched.device.type == "cpu"
        torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)
        with torch.inference_mode():
            ids = torch.tensor([tiny.tokenizer(long)["input_ids"]])
            hidden = decoder(input_ids=ids).last_hidden_state[0]
        expected = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
        torch.testing.assert_close(batched[1], expected, atol=1e-5, rtol=0)

    mean, last = (
        extract_features(tiny.model, tiny.tokenizer, [long], pooling=pooling, progress=False)
        for pooling in ("mean", "last")
    )
    assert not torch.allclose(mean, last, atol=1e-3)


def test_feature_extraction_misuse_is_a_user_error(tiny):
    with pytest.raises(ForgetlessError, match="pooling"):
        extract_features(tiny.model, tiny.tokenizer, ["text"], pooling="max")
    with pytest.raises(ForgetlessError, match="no texts"):
        extract_features(tiny.model, tiny.tokenizer, [])
    with pytest.raises(ForgetlessError, match="no tokens"):
        extract_features(tiny.model, tiny.tokenizer, ["text", ""], progress=False)


def test_classifier_misuse_is_a_user_error(data):
    (train, train_labels), _ = data
    classifier = head()
    with pytest.raises(ForgetlessError, match="partial_fit first"):
        classifier.predict(train)
    with pytest.raises(ForgetlessError, match="shape"):
        classifier.partial_fit(train[:, :-1], train_labels)
    with pytest.raises(ForgetlessError, match="labels"):
        classifier.partial_fit(train, train_labels[:-1])
    with pytest.raises(ForgetlessError, match="integer"):
        classifier.partial_fit(train, train_labels.float())
    with pytest.raises(ForgetlessError, match="non-negative"):
        classifier.partial_fit(train, train_labels - 1)
    with pytest.raises(ForgetlessError, match="2 samples"):
        classifier.partial_fit(train[:1], train_labels[:1])
    classifier.partial_fit(train, train_labels)
    with pytest.raises(ForgetlessError, match="shape"):
        classifier.predict(train[:, :-1])
    with pytest.raises(ForgetlessError, match="ridge_grid"):
        head(ridge_grid=(1.0, 0.0))
    with pytest.raises(ForgetlessError, match="holdout_fraction"):
        head(holdout_fraction=1.0)
