"""Penalties toward earlier tasks of a sequence, as gradients added before each optimizer step.

* **EWC** (Elastic Weight Consolidation; Kirkpatrick et al., 2017, arXiv 1612.00796), in its
  online form (Schwarz et al., 2018, with γ = 1): after each task the diagonal empirical Fisher
  of the trained model on that task's training data is added to the earlier tasks'; the next
  task then minimises its loss plus ``(λ/2) Σ_i F_i (θ_i − θ*_i)²``, with ``θ*`` the weights
  it starts from (the previous task's result). Gradient: ``λ F (θ − θ*)``.
* **O-LoRA** (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual
  Learning", arXiv 2310.14152): each task's LoRA ``ΔW = B A`` (A: r × in) is pushed out of the
  row spaces of the earlier tasks' A matrices by ``λ₁ Σ_i ‖A_i A_tᵀ‖²_F`` per adapted module.
  With ``M = A_i A_tᵀ``, ``‖M‖²_F = tr(A_t A_iᵀ A_i A_tᵀ)``, so its gradient in ``A_t`` is
  ``2 A_t A_iᵀ A_i = 2 Mᵀ A_i``; stacking the earlier A's into one ``A_<t`` (Σ r_i × in) gives
  the whole sum as ``‖A_<t A_tᵀ‖²_F`` with gradient ``2 λ₁ (A_<t A_tᵀ)ᵀ A_<t``.

Both gradients are added by a Trainer callback in ``on_pre_optimizer_step``, as OSFT's
projection is, rather than as loss terms: one pass over the penalised weights per optimizer
step instead of extra autograd graph per micro-batch, whatever loss the Trainer computes, and
exact under gradient accumulation (added once per step). The Trainer has clipped the task
gradient by then, so ``train.max_grad_norm`` bounds the task's part only.

What a later task needs (the summed Fisher; the stacked A's) is written with safetensors, never
pickle, into the finished task's folder, so a resumed sequence reads it back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from forgetless.data.features import sample_example
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.io import load_tensors

FISHER_FILE = "ewc_fisher.safetensors"
SUBSPACES_FILE = "olora_subspaces.safetensors"
# PEFT names a LoRA's down-projection `<module>.lora_A.<adapter>.weight` in the model and
# `<module>.lora_A.weight` in a saved adapter, both under `base_model.model.`.
_LORA_A = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight$")


def _refuse_sharding(args, method: str) -> None:
    if args.deepspeed or args.fsdp:
        raise ForgetlessError(
            f"{method} needs each weight whole on every process, which FSDP and DeepSpeed "
            "shard; use DDP (torchrun, or accelerate launch without FSDP/DeepSpeed)"
        )


def _add_to_grad(param: nn.Parameter, gradient: torch.Tensor) -> None:
    # A weight the task's loss did not reach still feels the penalty.
    if param.grad is None:
        param.grad = gradient.to(param.dtype)
    else:
        param.grad.add_(gradient.to(param.grad.dtype))


def empirical_fisher(
    model: nn.Module, tokenizer, records: Sequence[Record], max_length: int
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` on ``records``: each trainable parameter's squared
    gradient of one record's loss, averaged over the records (fp32, on the weights' device).

    One record per backward pass: squaring a batch's mean gradient would average the
    per-example gradients first and underestimate the Fisher by up to the batch size.
    """
    examples = [sample_example(tokenizer, record, max_length) for record in records]
    examples = [example for example in examples if example is not None]
    if not examples:
        raise ForgetlessError(
            f"train.ewc: no record leaves a token to learn within max_length={max_length}"
        )
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is evaluated
    try:
        for input_ids, labels in examples:
            model.zero_grad(set_to_none=True)
            loss = model(
                input_ids=torch.tensor([input_ids], device=device),
                labels=torch.tensor([labels], device=device),
            ).loss
            loss.backward()
            for name, parameter in parameters.items():
                if parameter.grad is not None:
                    fisher[name].add_(parameter.grad.float().square())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for value in fisher.values():
        value.div_(len(examples))
    return fisher


class EwcCallback(TrainerCallback):
    """Adds ``λ F (θ − θ*)`` to each parameter's gradient before every optimizer step.

    Build it from the model before training starts, also when resuming a checkpoint: ``θ*``
    is the weights the model holds then (the previous task's result), kept in fp32.
    """

    def __init__(self, model: nn.Module, fisher: Mapping[str, torch.Tensor], lam: float):
        parameters = dict(model.named_parameters())
        unknown = sorted(set(fisher) - set(parameters))
        if unknown:
            raise ForgetlessError(
                f"the EWC Fisher holds {len(unknown)} parameters the model lacks "
                f"(e.g. {unknown[0]}): it comes from another architecture"
            )
        self.lam = lam
        self.terms = [
            (name, parameters[name], value.float(), parameters[name].detach().float().clone())
            for name, value in fisher.items()
        ]

    def on_train_begin(self, args, state, control, **kwargs):
        _refuse_sharding(args, "EWC")
        # The Trainer may have moved the model since the callback was built.
        self.terms = [
            (name, param, fisher.to(param.device), anchor.to(param.device))
            for name, param, fisher, anchor in self.terms
        ]

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for _, param, fisher, anchor in self.terms:
            # `param - anchor` is a new fp32 tensor: the in-place products leave the weight alone.
            _add_to_grad(param, (param - anchor).mul_(fisher).mul_(self.lam))

    @torch.no_grad()
    def penalty(self, model: nn.Module) -> float:
        """``(λ/2) Σ F (θ − θ*)²`` at ``model``'s weights (e.g. the trained model's)."""
        parameters = dict(model.named_parameters())
        total = 0.0
        for name, _, fisher, anchor in self.terms:
            drift = parameters[name].to(anchor.device, torch.float32) - anchor
            total += float((fisher * drift.square()).sum(dtype=torch.float64))
        return total * self.lam / 2


def lora_module(parameter_name: str) -> str | None:
    """The adapted module a LoRA A parameter belongs to (None for any other parameter)."""
    found = _LORA_A.match(parameter_name)
    return None if found is None else found["module"]


def adapter_subspaces(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Each adapted module's A matrix (r × in, fp32) of a saved PEFT adapter."""
    weights = load_tensors(Path(adapter_dir) / "adapter_model.safetensors")
    subspaces = {}
    for name, value in weights.items():
        module = lora_module(name)
        if module is not None:
            subspaces[module] = value.float()
    return subspaces


def orthogonality_penalty(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``‖A_<t A_tᵀ‖²_F``: the summed squared overlaps of the current A with earlier ones."""
    return (previous @ current.T).square().sum()


def orthogonality_gradient(
    previous: torch.Tensor, current: torch.Tensor, lam: float
) -> torch.Tensor:
    """Gradient in ``current`` of ``lam * orthogonality_penalty(previous, current)``."""
    return (previous @ current.T).T @ previous * (2 * lam)


def overlap(previous: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> float:
    """``Σ_modules ‖A_<t A_tᵀ‖²_F`` of two sets of A matrices (modules present in both)."""
    return sum(
        float(orthogonality_penalty(previous[module], current[module]))
        for module in previous
        if module in current
    )


class OloraCallback(TrainerCallback):
    """Adds the gradient of ``λ₁ Σ ‖A_<t A_tᵀ‖²_F`` to every LoRA A before each optimizer step.

    ``previous`` maps each adapted module to the earlier tasks' A matrices stacked row-wise
    (Σ r_i × in). The current A's are found in the (PEFT) model the Trainer trains.
    """

    def __init__(self, previous: Mapping[str, torch.Tensor], lam: float):
        self.previous, self.lam = dict(previous), lam
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _refuse_sharding(args, "O-LoRA")
        found = {}
        for name, param in model.named_parameters():
            module = lora_module(name)
            if module is not None and param.requires_grad:
                found[module] = param
        missing = sorted(set(self.previous) - set(found))
        if missing:
            raise ForgetlessError(
                f"train.lora.target_modules: this task's LoRA leaves out {len(missing)} "
                f"modules the earlier tasks adapted (e.g. {missing[0]})"
            )
        self.pairs = [
            (found[module], stacked.to(found[module].device, torch.float32))
            for module, stacked in self.previous.items()
        ]

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for param, previous in self.pairs:
            _add_to_grad(param, orthogonality_gradient(previous, param.float(), self.lam))
