"""The OGS Navigator: a small policy over gradient-free sample features, trained by
constrained reinforcement learning to pick samples whose gradients help the domain without
entering the general-knowledge anchor's gradient subspace.

The paper (arXiv 2602.06359) publishes no details; this design is ours.

* Inputs per sample: the sentence embedding, log token count and the base model's loss —
  all cheap to compute for a whole pool, none needs a gradient.
* Episode: draw ``candidates`` samples from the gradient-featured set; the policy samples
  ``k = budget * candidates`` of them without replacement (Plackett-Luce over its logits,
  drawn with the Gumbel top-k trick).
* Reward: mean domain utility u = cos(g, g_V) of the picked samples, the first-order
  estimate of the validation-loss decrease of a unit step along their gradients. Cost: their
  mean anchor cost (subspace energy or conflict), the first-order anchor-loss increase.
* Constrained objective (Lagrangian): maximise reward - lam * (cost - limit); REINFORCE with
  a leave-one-out baseline over the episodes of an update, advantages standardised; lam
  follows dual ascent, lam <- max(0, lam + eta * (mean cost - limit)).

Then the trained policy's logit ranks every pool sample; the top budget is the selection.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from forgetless.errors import ForgetlessError
from forgetless.select.config import NavigatorConfig

logger = logging.getLogger(__name__)


class Navigator(nn.Module):
    """Selection logit of a sample from its standardised features."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.scale).squeeze(-1)

    def fit_standardisation(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp(min=1e-6))

    @torch.no_grad()
    def score(self, features: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Logits for a pool, in batches (no gradients)."""
        self.eval()
        tensor = torch.as_tensor(features, dtype=torch.float32)
        parts = [self(tensor[i : i + batch_size]) for i in range(0, len(tensor), batch_size)]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)


@dataclass
class IterationLog:
    iteration: int
    reward: float
    cost: float
    lam: float
    entropy: float


def plackett_luce_log_prob(logits: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """log P(order) of picking ``order`` (first k, in sequence) without replacement."""
    remaining = torch.ones_like(logits, dtype=torch.bool)
    total = logits.new_zeros(logits.shape[0])
    for step in range(order.shape[1]):
        masked = logits.masked_fill(~remaining, float("-inf"))
        chosen = order[:, step]
        total = total + logits.gather(1, chosen[:, None]).squeeze(1) - masked.logsumexp(1)
        remaining = remaining.scatter(1, chosen[:, None], False)
    return total


def train_navigator(
    features: np.ndarray,
    utility: np.ndarray,
    cost: np.ndarray,
    settings: NavigatorConfig,
    *,
    budget: float,
    cost_limit: float,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Navigator, list[IterationLog]]:
    """Train a Navigator on samples with known utility and cost (see the module doc)."""
    if len(features) < 2:
        raise ForgetlessError("the Navigator needs at least 2 gradient-featured samples")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    inputs = torch.as_tensor(features, dtype=torch.float32)
    utility_t = torch.as_tensor(utility, dtype=torch.float32)
    cost_t = torch.as_tensor(cost, dtype=torch.float32)
    navigator = Navigator(inputs.shape[1], settings.hidden_size)
    navigator.fit_standardisation(inputs)
    optimizer = torch.optim.Adam(navigator.parameters(), lr=settings.learning_rate)
    candidates = min(settings.candidates, len(inputs))
    picks = max(1, min(candidates - 1, round(budget * candidates)))
    lam = 0.0
    log: list[IterationLog] = []
    for iteration in tqdm(range(settings.iterations), desc="navigator", disable=not progress):
        draws = torch.stack(
            [
                torch.randperm(len(inputs), generator=generator)[:candidates]
                for _ in range(settings.episodes)
            ]
        )
        logits = navigator(inputs[draws])
        uniform = torch.rand(logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
        gumbel = -torch.log(-torch.log(uniform))
        order = (logits.detach() + gumbel).topk(picks, dim=1).indices
        picked = draws.gather(1, order)
        reward = utility_t[picked].mean(1)
        spent = cost_t[picked].mean(1)
        lagrangian = reward - lam * (spent - cost_limit)
        baseline = (lagrangian.sum() - lagrangian) / (len(lagrangian) - 1)
        advantage = lagrangian - baseline
        advantage = advantage / advantage.std().clamp(min=1e-8)
        probabilities = logits.softmax(1)
        entropy = -(probabilities * logits.log_softmax(1)).sum(1).mean()
        loss = -(advantage * plackett_luce_log_prob(logits, order)).mean()
        loss = loss - settings.entropy_weight * entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_cost = float(spent.mean())
        lam = max(0.0, lam + settings.lambda_learning_rate * (mean_cost - cost_limit))
        log.append(
            IterationLog(iteration, float(reward.mean()), mean_cost, lam, float(entropy.detach()))
        )
    navigator.eval()
    return navigator, log


def log_as_dicts(log: list[IterationLog]) -> list[dict]:
    return [asdict(entry) for entry in log]


def top_k_quality(
    scores: np.ndarray, utility: np.ndarray, cost: np.ndarray, budget: float
) -> dict[str, float]:
    """Mean utility and cost of the top ``budget`` share by ``scores``."""
    k = max(1, math.ceil(budget * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    return {"utility": float(utility[top].mean()), "cost": float(cost[top].mean()), "k": k}


def supervised_reference(
    train_inputs: np.ndarray, train_target: np.ndarray, test_inputs: np.ndarray
) -> np.ndarray:
    """Predictions of a ridge regression fitted directly to the exact score.

    A reference for the Navigator: if even a supervised fit of the same inputs does not rank
    unseen samples, the inputs carry no signal about the gradient geometry, and no policy
    training would help.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(train_inputs, train_target)
    return model.predict(test_inputs)


def fold_assignment(count: int, folds: int, seed: int) -> np.ndarray:
    """A seeded fold index in [0, folds) for each of ``count`` samples, sizes within one."""
    return np.random.default_rng(seed).permutation(np.arange(count) % folds)


def cross_validate(
    features: np.ndarray,
    utility: np.ndarray,
    cost: np.ndarray,
    exact: np.ndarray,
    settings: NavigatorConfig,
    *,
    budget: float,
    cost_limit: float,
    folds: int,
    seed: int = 0,
    progress: bool = True,
    train_share: float = 1.0,
) -> tuple[dict, np.ndarray, list[Navigator]]:
    """k-fold cross-validation of the Navigator against the exact score.

    Each fold is scored by a Navigator trained on the other folds (and by the supervised
    reference fitted on them); ``train_share`` < 1 trains on a seeded share of them (a
    learning curve: the same held-out folds, fewer training samples). Returns the summary
    (Spearman of the out-of-fold scores with ``exact``, the quality of their top ``budget``),
    the out-of-fold Navigator logits and the fold Navigators.
    """
    from forgetless.evaluate.stats import rank_correlation

    fold = fold_assignment(len(features), folds, seed + 1)
    logits = np.zeros(len(features))
    ridge = np.zeros(len(features))
    navigators = []
    trained_counts = []
    for index in range(folds):
        held = fold == index
        trained = np.flatnonzero(~held)
        if train_share < 1.0:
            count = max(2, round(train_share * len(trained)))
            picked = np.random.default_rng(seed + 1 + index).choice(trained, count, replace=False)
            trained = np.sort(picked)
        trained_counts.append(len(trained))
        navigator, _ = train_navigator(
            features[trained],
            utility[trained],
            cost[trained],
            settings,
            budget=budget,
            cost_limit=cost_limit,
            seed=seed + 1 + index,
            progress=progress,
        )
        logits[held] = navigator.score(features[held])
        navigators.append(navigator)
        ridge[held] = supervised_reference(features[trained], exact[trained], features[held])
    summary = {
        "folds": folds,
        "samples": int(len(features)),
        "training_samples": float(np.mean(trained_counts)),
        # None where undefined (a constant score, e.g. a Navigator that learnt nothing).
        "spearman_vs_exact": rank_correlation(logits, exact),
        "ridge_spearman_vs_exact": rank_correlation(ridge, exact),
        "navigator_top": top_k_quality(logits, utility, cost, budget),
        "ridge_top": top_k_quality(ridge, utility, cost, budget),
        "exact_top": top_k_quality(exact, utility, cost, budget),
    }
    return summary, logits, navigators


def warn_without_signal(cross_validation: dict, unscored: int) -> None:
    """Say so when the Navigator ranks held-out featured samples no better than chance.

    Its calibrated scores then shrink to the mean exact score, so the ``unscored`` samples
    without a gradient are ranked close to random: a selection the user would otherwise take
    for a gradient-informed one (docs/select.md measured Spearman near 0 on real pools).
    """
    from forgetless.evaluate.stats import significant_rank_correlation

    spearman, samples = cross_validation["spearman_vs_exact"], cross_validation["samples"]
    significant = significant_rank_correlation(samples)
    if unscored == 0 or (spearman is not None and spearman > significant):
        return
    shown = "undefined" if spearman is None else f"{spearman:.2f}"
    logger.warning(
        "the OGS Navigator ranks held-out featured samples with Spearman %s against the exact "
        "score, no better than chance at %d samples (%.2f needed), so the %d pool samples "
        "without a gradient are ranked close to random; a larger select.featured_samples "
        "scores more of the pool exactly",
        shown,
        samples,
        significant,
        unscored,
    )
