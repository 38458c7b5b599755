"""Throughput of the per-sample gradient feature extractor, and of Navigator pool scoring.

Three ways over the same samples, in one run, with the same model and parameter set:

* ``batched``: forgetless' extractor (one batched forward/backward with per-sample gradient
  hooks, projected to d dimensions, stored);
* ``batch1``: a LESS-style loop, one sample per forward/backward, its flattened gradient
  projected with the same projector;
* ``plain``: one ordinary batched forward/backward of the summed loss over the same batches
  (the floor: no per-sample gradients, no projection).

Targets: batched >= 5x batch1 and >= 0.7x plain. Then the Navigator scores a synthetic pool
of 386-dimensional inputs (embedding + length + loss); target >= 1000 samples/s::

    python benchmarks/grad_features.py                       # SmolLM2-135M, LoRA r=8 q/v
    python benchmarks/grad_features.py --parameters blocks --projector kronecker \
        --projection-dim 8192                                 # every matrix, LoGra sketch
    python benchmarks/grad_features.py --parameters blocks --projector exact
                                      # every matrix, exact products with two directions
    python benchmarks/grad_features.py --model tiny-llama --samples 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def sample_records(args):
    from forgetless.data import load_records
    from forgetless.data.records import TextRecord

    try:
        records = load_records("pubmedqa", split="train", data_dir=args.data_dir)
    except Exception:  # no data directory: synthetic text of similar length
        records = [
            TextRecord(text=" ".join(f"word{j % 97}" for j in range(400)), id=str(i))
            for i in range(args.samples)
        ]
    return records[: args.samples]


def feature_model(args):
    import torch
    from peft import LoraConfig, get_peft_model

    from forgetless.models import load_model

    loaded = load_model(args.model, dtype="float32", device=args.device)
    model = loaded.model
    if args.parameters == "lora":
        torch.manual_seed(0)
        # Non-zero B so that both LoRA factors have gradients, as after a warm-up.
        lora = LoraConfig(
            r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
        )
        model = get_peft_model(model, lora)
    return model.eval(), loaded.tokenizer


def exact_products(model, settings):
    """forgetless.select.exact's featuriser with two random full-size directions (their
    values do not change the work), as g_ref and g_V would be."""
    import torch

    from forgetless.select.exact import ReferenceProducts
    from forgetless.select.gradients import gradient_modules

    modules = gradient_modules(model, settings.parameters, settings.last_blocks)
    generator = torch.Generator().manual_seed(0)
    directions = [
        {
            name: torch.randn(
                module.weight.numel() + (module.bias.numel() if module.bias is not None else 0),
                generator=generator,
            )
            for name, module in modules.items()
        }
        for _ in range(2)
    ]
    return ReferenceProducts(directions, next(model.parameters()).device)


def time_batched(model, tokenizer, records, settings, projector=None):
    from forgetless.select.gradients import extract_gradient_features

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        extract_gradient_features(
            model, tokenizer, records, settings, folder, progress=False, projector=projector
        )
        return _finished(model) - started


def _batches(tokenizer, records, settings):
    from forgetless.data.features import sample_example

    examples = [sample_example(tokenizer, record, settings.max_length) for record in records]
    examples = sorted((e for e in examples if e is not None), key=lambda e: len(e[0]))
    size = settings.batch_size
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def time_batch1(model, tokenizer, records, settings, exact=None):
    import torch

    from forgetless.select.gradients import (
        KroneckerSketch,
        RandomProjector,
        gradient_modules,
        pad_batch,
        per_sample_losses,
    )

    modules = gradient_modules(model, settings.parameters, settings.last_blocks)
    weights = [module.weight for module in modules.values()]
    device = next(model.parameters()).device
    if exact is not None:

        def project(name, grad):
            return grad.reshape(1, -1) @ exact.references[name].T

    elif settings.projector == "kronecker":
        sketch = KroneckerSketch(modules, settings.projection_dim, 0, device)

        def project(name, grad):
            out_factor, in_factor = sketch.factors[name]
            return out_factor.T @ grad @ in_factor

    else:
        projector = RandomProjector(settings.projection_dim, settings.projector, 0, "cpu")
        projector.device = device

        def project(name, grad):
            return projector.project(name, grad.reshape(1, -1))

    for weight in weights:
        weight.requires_grad_(True)
    started = time.perf_counter()
    for batch in _batches(tokenizer, records, settings):
        for example in batch:
            ids, mask, labels = pad_batch([example], tokenizer.pad_token_id, device)
            loss, _ = per_sample_losses(model(input_ids=ids, attention_mask=mask).logits, labels)
            grads = torch.autograd.grad(loss.sum(), weights)
            for name, grad in zip(modules, grads, strict=True):
                project(name, grad)
    return _finished(model) - started


def time_plain(model, tokenizer, records, settings):
    import torch

    from forgetless.select.gradients import gradient_modules, pad_batch, per_sample_losses

    modules = gradient_modules(model, settings.parameters, settings.last_blocks)
    weights = [module.weight for module in modules.values()]
    for weight in weights:
        weight.requires_grad_(True)
    device = next(model.parameters()).device
    started = time.perf_counter()
    for batch in _batches(tokenizer, records, settings):
        ids, mask, labels = pad_batch(batch, tokenizer.pad_token_id, device)
        loss, _ = per_sample_losses(model(input_ids=ids, attention_mask=mask).logits, labels)
        torch.autograd.grad(loss.sum(), weights)
    return _finished(model) - started


def _finished(model) -> float:
    """The clock once the device's queued work is done (CUDA runs asynchronously)."""
    import torch

    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def navigator_rate(pool: int, repeats: int = 3) -> float:
    import numpy as np

    from forgetless.select.navigator import Navigator

    inputs = np.random.default_rng(0).normal(size=(pool, 386)).astype(np.float32)
    navigator = Navigator(386, 128)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        navigator.score(inputs)
        best = min(best, time.perf_counter() - started)
    return pool / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--parameters", default="lora", choices=["lora", "last_blocks", "blocks"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument(
        "--projector",
        default="rademacher",
        choices=["rademacher", "gaussian", "kronecker", "exact"],
        help="exact: inner products with two full-size directions (forgetless.select.exact) "
        "instead of a projection; needs --parameters blocks or last_blocks.",
    )
    parser.add_argument("--pool", type=int, default=100_000, help="Navigator scoring pool.")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="Also write the figures here.")
    args = parser.parse_args()

    import torch

    from forgetless.select.config import GradientConfig

    torch.set_grad_enabled(True)
    model, tokenizer = feature_model(args)
    records = sample_records(args)
    settings = GradientConfig(
        parameters=args.parameters,
        projection_dim=args.projection_dim,
        projector="rademacher" if args.projector == "exact" else args.projector,
        batch_size=args.batch_size,
        max_length=args.max_length,
        shard_size=max(args.samples, 1),
    )
    exact = exact_products(model, settings) if args.projector == "exact" else None
    # One untimed pass: first-call allocations and the projection cache are not measured.
    time_batched(model, tokenizer, records[: args.batch_size], settings, exact)
    seconds = {
        "batched": time_batched(model, tokenizer, records, settings, exact),
        "batch1": time_batch1(model, tokenizer, records, settings, exact),
        "plain": time_plain(model, tokenizer, records, settings),
    }
    count = len(records)
    print(
        f"model {args.model}, parameters {args.parameters}, {count} samples of <= "
        f"{args.max_length} tokens, batch {args.batch_size}, "
        + (
            "exact products with two directions, "
            if exact is not None
            else f"d = {args.projection_dim} ({args.projector}), "
        )
        + f"device {next(model.parameters()).device}, {torch.get_num_threads()} threads"
    )
    print(f"{'way':<10}{'samples/s':>12}{'batched speed vs this':>24}")
    for way, elapsed in seconds.items():
        ratio = elapsed / seconds["batched"]
        print(f"{way:<10}{count / elapsed:>12.2f}{ratio:>23.2f}x")
    print(
        f"batched vs batch1: {seconds['batch1'] / seconds['batched']:.2f}x (target >= 5x); "
        f"batched vs plain: {seconds['plain'] / seconds['batched']:.2f}x (target >= 0.7x)"
    )
    rate = navigator_rate(args.pool)
    print(f"navigator pool scoring: {rate:,.0f} samples/s over {args.pool:,} (target >= 1000)")
    if args.json:
        figures = {
            "model": args.model,
            "device": str(next(model.parameters()).device),
            "samples": count,
            "samples_per_s": {way: count / elapsed for way, elapsed in seconds.items()},
            "batched_vs_batch1": seconds["batch1"] / seconds["batched"],
            "batched_vs_plain": seconds["plain"] / seconds["batched"],
            "navigator_samples_per_s": rate,
        }
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
