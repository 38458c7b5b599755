"""Token-level perplexity of a model on held-out documents.

Every document is tokenised on its own (with BOS only when the tokenizer normally adds one)
and cut into windows of at most ``max_length`` tokens. Consecutive windows share exactly one
token - the last input of one window is the first of the next - so every token after the
first of a document is predicted exactly once, and no window is wasted predicting nothing.
The result is the token-weighted mean NLL over all predicted tokens and its exponential.

The interval comes from a document-level bootstrap: tokens of one document are far from
independent, so resampling tokens would give an interval that is much too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from forgetless.errors import ForgetlessError
from forgetless.evaluate.multiple_choice import (
    adds_bos_token,
    evaluation_mode,
    max_context_length,
    model_device,
    score_token_positions,
)
from forgetless.evaluate.stats import bootstrap_ratio_interval

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    documents: int
    perplexity_ci95: tuple[float, float]
    # Per document, in input order: summed NLL (nats) and number of predicted tokens.
    document_nll: tuple[float, ...]
    document_tokens: tuple[int, ...]

    def to_dict(self, *, include_documents: bool = True) -> dict:
        result = asdict(self)
        if not include_documents:
            del result["document_nll"], result["document_tokens"]
        return result


def document_windows(ids: Sequence[int], max_length: int) -> list[list[int]]:
    """Windows of at most ``max_length`` tokens, each starting on the previous one's last token.

    Window k predicts its own tokens 1.., so together they predict ids[1:] exactly once.
    """
    if max_length < 2:
        raise ForgetlessError(f"max_length must be at least 2, got {max_length}")
    windows = []
    start = 0
    while start + 1 < len(ids):
        windows.append(list(ids[start : start + max_length]))
        start += max_length - 1
    return windows


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` (one document each) with a bootstrap 95 % interval."""
    if isinstance(texts, str):
        raise ForgetlessError("perplexity expects a sequence of documents, not a single string")
    if batch_size < 1:
        raise ForgetlessError(f"batch_size must be positive, got {batch_size}")
    # A window never exceeds the positions the model was trained on.
    max_length = min(max_length, max_context_length(model, tokenizer))
    prefix = [tokenizer.bos_token_id] if adds_bos_token(tokenizer) else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    windows: list[tuple[int, list[int]]] = []  # (document index, token ids)
    for doc, text in enumerate(texts):
        ids = prefix + tokenizer.encode(text, add_special_tokens=False)
        windows += [(doc, window) for window in document_windows(ids, max_length)]
    # Similar lengths side by side keep padding low; the sums do not depend on the order.
    windows.sort(key=lambda entry: len(entry[1]), reverse=True)

    nll_sums = [0.0] * len(texts)
    token_counts = [0] * len(texts)
    device = model_device(model)
    with (
        evaluation_mode(model),
        tqdm(total=len(windows), desc="perplexity", disable=not progress) as bar,
    ):
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            width = max(len(ids) for _, ids in batch)
            # Right padding: real tokens never attend to it and it is never a target.
            input_ids = torch.tensor(
                [ids + [pad_id] * (width - len(ids)) for _, ids in batch], device=device
            )
            attention = torch.tensor(
                [[1] * len(ids) + [0] * (width - len(ids)) for _, ids in batch], device=device
            )
            positions = torch.arange(width, device=device).expand(len(batch), width)
            rows = torch.tensor(
                [row for row, (_, ids) in enumerate(batch) for _ in ids[1:]], device=device
            )
            columns = torch.tensor(
                [column for _, ids in batch for column in range(len(ids) - 1)], device=device
            )
            targets = torch.tensor([token for _, ids in batch for token in ids[1:]], device=device)
            log_probs = score_token_positions(
                model, input_ids, attention, positions, rows, columns, targets
            )
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=device)
            per_row.index_add_(0, rows, -log_probs.double())
            for (doc, ids), nll in zip(batch, per_row.tolist(), strict=True):
                nll_sums[doc] += nll
                token_counts[doc] += len(ids) - 1
            bar.update(len(batch))

    total_tokens = sum(token_counts)
    if total_tokens == 0:
        raise ForgetlessError("no tokens to score: every document is shorter than two tokens")
    mean_nll = sum(nll_sums) / total_tokens
    low, high = bootstrap_ratio_interval(
        nll_sums, token_counts, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED
    )
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        tokens=total_tokens,
        documents=len(texts),
        perplexity_ci95=(math.exp(low), math.exp(high)),
        document_nll=tuple(nll_sums),
        document_tokens=tuple(token_counts),
    )
