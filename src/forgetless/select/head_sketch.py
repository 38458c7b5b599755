"""A forward-only sketch of each sample's output-layer gradient: gradient information for the
Navigator at the cost of a forward pass.

For a sample with final hidden states h_t, next-token distributions p_t and targets y_t, the
gradient of its mean loss with respect to the output layer W (vocabulary x hidden) is

    G = (1/T) sum_t (p_t - e_{y_t}) h_t^T,

which a forward pass already holds the pieces of. We never form G (49k x 576 on SmolLM2):
with seeded Rademacher matrices P_V (rows x vocabulary) and P_H (columns x hidden) the
sketch is S = P_V G P_H^T = (1/T) sum_t (P_V p_t - P_V[:, y_t]) (P_H h_t)^T, a
rows x columns matrix. It is the Kronecker-structured random projection (P_V (x) P_H) vec(G),
so inner products of sketches estimate inner products of the gradients without bias, and the
anchor geometry of ``forgetless.select.metrics`` applies to sketches unchanged. The extra
cost is rows x vocabulary multiply-adds per token: rows / hidden of the output layer's own
(64 / 576 = 11 % on SmolLM2), about 2 % of its forward pass.

Why by hand: per-sample-gradient libraries (Opacus, torch.func) need a backward pass; this
needs none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from forgetless.data.features import IGNORE_INDEX
from forgetless.data.records import Record
from forgetless.select.gradients import length_sorted_batches, per_sample_losses


@dataclass
class HeadSketches:
    vectors: np.ndarray  # (samples, rows * columns) float32; zeros where nothing is learnt
    loss: np.ndarray  # mean token loss
    tokens: np.ndarray  # target tokens; 0 marks a sample with nothing to learn


def _signs(shape: tuple[int, int], seed: int, name: str) -> torch.Tensor:
    digest = hashlib.sha256(f"head-sketch/{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).float() * 2 - 1


def sketch_matrices(
    vocabulary: int, hidden: int, rows: int, columns: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """P_V^T (vocabulary x rows) and P_H^T (hidden x columns), scaled so that
    E[<S_i, S_j>] = <G_i, G_j>; generated on the CPU, so the same on every device."""
    return (
        _signs((vocabulary, rows), seed, "vocabulary") / rows**0.5,
        _signs((hidden, columns), seed, "hidden") / columns**0.5,
    )


@torch.no_grad()
def head_gradient_sketches(
    model: nn.Module,
    tokenizer,
    records: Sequence[Record],
    *,
    max_length: int,
    batch_size: int = 8,
    rows: int = 64,
    columns: int = 32,
    seed: int = 0,
    progress: bool = True,
    description: str = "head sketches",
) -> HeadSketches:
    """The sketch of every record's output-layer gradient, its loss and its target count."""
    device = next(model.parameters()).device
    vocabulary, hidden = model.get_output_embeddings().weight.shape
    vocab_signs, hidden_signs = (
        matrix.to(device) for matrix in sketch_matrices(vocabulary, hidden, rows, columns, seed)
    )
    vectors = np.zeros((len(records), rows * columns), np.float32)
    losses = np.zeros(len(records), np.float32)
    counts = np.zeros(len(records), np.int32)
    was_training = model.training
    model.eval()
    batches = length_sorted_batches(
        tokenizer, records, range(len(records)), max_length, batch_size, device
    )
    bar = tqdm(total=len(records), desc=description, disable=not progress, unit="sample")
    try:
        for batch, ids, mask, labels in batches:
            output = model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            )
            loss, count = per_sample_losses(output.logits, labels)
            targets = labels[:, 1:]
            scored = (targets != IGNORE_INDEX).float()
            residual = output.logits[:, :-1].float().softmax(-1) @ vocab_signs
            residual -= vocab_signs[targets.clamp(min=0)]
            projected_hidden = output.hidden_states[-1][:, :-1].float() @ hidden_signs
            weights = scored / count.clamp(min=1)[:, None]
            sketch = torch.einsum("bt,btr,btc->brc", weights, residual, projected_hidden)
            vectors[batch] = sketch.reshape(len(batch), -1).cpu().numpy()
            losses[batch] = loss.cpu().numpy()
            counts[batch] = count.cpu().numpy()
            bar.update(len(batch))
        bar.update(bar.total - bar.n)  # the records without a target token
    finally:
        bar.close()
        model.train(was_training)
    return HeadSketches(vectors, losses, counts)
