"""Per-document quality scores; clusters are pruned on their mean score per scorer.

* ``rules`` (the default) — quality rules after Gopher (Rae et al., 2021), each a check in
  [0, 1], multiplied, so failing any one fails the document: share of letters among
  non-space characters (0 at <= 60 %, 1 at >= 70 %), share of word 3-grams that are not
  repeats (0 at <= 30 %, 1 at >= 60 %) and, in a document of 20 words or more, distinct
  English function words (Gopher's the, be, to, of, and, that, have, with, and a few more
  such as a, in, is, for: one under 50 words, two from 50 on, as Gopher) and a mean word
  length within 3-10 characters. A cluster's mean is then about the share of its
  documents that pass. Higher is better.
* ``heuristic`` — the mean of four text statistics in [0, 1]: share of letters among
  non-space characters (0 at <= 50 %, 1 at >= 80 %), mean word length within 3-10
  characters, share of word 3-grams that are not repeats, and length (0 at <= 5 words, 1 at
  >= 50). Higher is better. Averaged, one failed statistic does not fail a document:
  random characters, navigation boilerplate and repeated lines all score above 0.75.
* ``perplexity`` — the reference LM's perplexity on the whole document (windows of
  ``mix.quality.perplexity.max_length`` tokens, as ``forgetless eval`` scores perplexity).
  Lower is better.
* ``fasttext`` — the probability a fastText classifier gives the high-quality label. Higher
  is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from forgetless.errors import ForgetlessError
from forgetless.mix.config import (
    FasttextScorerConfig,
    PerplexityScorerConfig,
    QualityConfig,
)

# Scorer -> whether a higher score is better (kept if mean >= threshold, else <= threshold).
HIGHER_IS_BETTER = {"rules": True, "heuristic": True, "perplexity": False, "fasttext": True}
# Gopher's stop words, and the commonest other English function words: prose uses some;
# lists, menus, code and noise rarely do. Gopher's eight alone miss whole news sentences.
STOP_WORDS = frozenset(
    "the be to of and that have with a an in on for is it as at by was are this from or".split()
)


def _ramp(value: float, low: float, high: float) -> float:
    return min(1.0, max(0.0, (value - low) / (high - low)))


def _letter_share(text: str) -> float:
    """Letters among the non-space characters."""
    visible = [char for char in text if not char.isspace()]
    return sum(char.isalpha() for char in visible) / max(len(visible), 1)


def heuristic_score(text: str) -> float:
    words = text.split()
    if not words:
        return 0.0
    letters = _letter_share(text)
    mean_word = sum(len(word) for word in words) / len(words)
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    unique = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    checks = (
        _ramp(letters, 0.5, 0.8),
        1.0 if 3 <= mean_word <= 10 else 0.0,
        unique,
        _ramp(len(words), 5, 50),
    )
    return sum(checks) / len(checks)


def rules_score(text: str) -> float:
    words = text.split()
    if not words:
        return 0.0
    letters = _letter_share(text)
    alphabetic = [word.lower().strip(".,;:!?\"'()[]") for word in words if _has_letter(word)]
    if not alphabetic:
        return 0.0
    mean_word = sum(len(word) for word in alphabetic) / len(alphabetic)
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    unique = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    # A headline or a tweet may do without function words and has too few words for a mean
    # length; a paragraph needs one function word, a page (Gopher's 50 words) two.
    short = len(alphabetic) < 20
    needed = 1 if len(alphabetic) < 50 else 2
    checks = (
        _ramp(letters, 0.6, 0.7),
        1.0 if short else min(1.0, len(STOP_WORDS.intersection(alphabetic)) / needed),
        _ramp(unique, 0.3, 0.6),
        1.0 if short or 3 <= mean_word <= 10 else 0.0,
    )
    return math.prod(checks)


def _has_letter(word: str) -> bool:
    return any(char.isalpha() for char in word)


def perplexity_scores(
    texts: Sequence[str], scorer: PerplexityScorerConfig, dtype: str, device: str, progress=True
) -> np.ndarray:
    from forgetless.evaluate.perplexity import perplexity
    from forgetless.models import load_model

    loaded = load_model(scorer.reference_model, dtype=dtype, device=device)
    result = perplexity(
        loaded.model,
        loaded.tokenizer,
        list(texts),
        max_length=scorer.max_length,
        progress=progress,
    )
    nll = np.asarray(result.document_nll, dtype=np.float64)
    tokens = np.asarray(result.document_tokens, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tokens > 0, np.exp(nll / np.maximum(tokens, 1)), np.inf)


def fasttext_scores(texts: Sequence[str], scorer: FasttextScorerConfig) -> np.ndarray:
    if scorer.model is None:
        raise ForgetlessError("the fasttext scorer needs mix.quality.fasttext.model (a .bin file)")
    try:
        import fasttext
    except ImportError:
        raise ForgetlessError("the fasttext scorer needs the fasttext package") from None
    try:
        model = fasttext.load_model(scorer.model)
    except ValueError as error:
        raise ForgetlessError(f"cannot load {scorer.model}: {error}") from None
    scores = np.zeros(len(texts))
    for index, text in enumerate(texts):
        labels, probabilities = model.predict(text.replace("\n", " "), k=-1)
        scores[index] = dict(zip(labels, probabilities, strict=True)).get(scorer.label, 0.0)
    return scores


def check_scorers(quality: QualityConfig) -> list[str]:
    """The scorers either thresholds name, in a fixed order; an unknown one is an error."""
    named = set(quality.thresholds) | set(quality.document_thresholds)
    unknown = named - set(HIGHER_IS_BETTER)
    if unknown:
        raise ForgetlessError(
            f"unknown quality scorer(s) {sorted(unknown)}; choose from {sorted(HIGHER_IS_BETTER)}"
        )
    return sorted(named)


def score_documents(
    texts: Sequence[str],
    scorers: Sequence[str],
    perplexity: PerplexityScorerConfig | None,
    fasttext: FasttextScorerConfig | None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    progress=True,
) -> dict[str, np.ndarray]:
    """One score array per scorer; a model-based scorer comes with its settings. ``texts`` is
    a list or a ``TextFile``; the perplexity scorer reads it whole."""
    scores: dict[str, np.ndarray] = {}
    for name in scorers:
        # The rule-based scorers stream: iterating a TextFile reads one line at a time.
        if name == "rules":
            scores[name] = np.fromiter(map(rules_score, texts), np.float64, len(texts))
        elif name == "heuristic":
            scores[name] = np.fromiter(map(heuristic_score, texts), np.float64, len(texts))
        elif name == "perplexity":
            scores[name] = perplexity_scores(texts, perplexity, dtype, device, progress)
        else:
            scores[name] = fasttext_scores(texts, fasttext)
    return scores


def passing(name: str, values: np.ndarray, threshold: float) -> np.ndarray:
    """Which scores (of documents, or cluster means) pass the threshold; NaN never does."""
    values = np.asarray(values, dtype=np.float64)
    return values >= threshold if HIGHER_IS_BETTER[name] else values <= threshold
