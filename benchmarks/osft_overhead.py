"""Step time and peak memory of OSFT against plain AdamW full fine-tuning and PEFT's OSF.

All methods train the same model on the same token batches (16 sequences x 256 tokens per
optimizer step by default, as micro-batches with gradient accumulation) with the same preserved
rank, through the same ``transformers.Trainer``. Each method runs in its own process so peak
memory is measured cleanly (peak RSS on CPU, peak allocated memory on CUDA); ratios are against
plain full fine-tuning measured in the same run::

    python benchmarks/osft_overhead.py                 # SmolLM2-135M, CPU or the first GPU
    python benchmarks/osft_overhead.py --steps 5 --micro-batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = {
    "plain": "AdamW full fine-tuning, every parameter trainable",
    "osft": "forgetless OSFT (untargeted parameters frozen, the default)",
    "osft-all": "forgetless OSFT with untargeted parameters trained unconstrained",
    "peft-osf": "PEFT's OSF tuner (re-parameterised U/S/V factors)",
}


def run_method(args: argparse.Namespace) -> dict:
    """Train ``args.method`` for warm-up + measured steps; return timings and peak memory."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from forgetless.models import load_model
    from forgetless.train.config import OsftConfig
    from forgetless.train.osft import OsftCallback

    torch.manual_seed(0)
    loaded = load_model(args.model, dtype="float32", device=args.device)
    model = loaded.model
    # The same seven matrix kinds for every method (OSFT's default regex; PEFT takes names).
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    callbacks: list = []
    if args.method in ("osft", "osft-all"):
        config = OsftConfig(
            rank_policy="fixed",
            preserve_ratio=args.preserve_ratio,
            freeze_untargeted=args.method == "osft",
        )
        callbacks.append(OsftCallback(model, config, verbose=False))
    elif args.method == "peft-osf":
        from peft import OSFConfig, get_peft_model

        model = get_peft_model(
            model, OSFConfig(effective_rank=args.preserve_ratio, target_modules=targets)
        )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self._started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._started)

    timer = StepTimer()
    sequences = args.seqs_per_step * (args.warmup + args.steps)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, model.config.vocab_size, (sequences, args.seq_len), generator=generator
    )
    data = [{"input_ids": row, "labels": row} for row in tokens]
    training_args = TrainingArguments(
        output_dir=args.scratch,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.seqs_per_step // args.micro_batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=model.device.type == "cpu",
        dataloader_num_workers=0,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    Trainer(
        model=model, args=training_args, train_dataset=data, callbacks=[*callbacks, timer]
    ).train()
    measured = timer.times[args.warmup :]
    if model.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "method": args.method,
        "step_s": statistics.median(measured),
        "step_times_s": measured,
        "peak_bytes": peak,
        "trainable_params": trainable,
        "device": str(model.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--preserve-ratio", type=float, default=0.5, help="Frozen fraction of min(m, n)."
    )
    parser.add_argument("--seqs-per-step", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured optimizer steps.")
    parser.add_argument("--steps", type=int, default=3, help="Measured optimizer steps.")
    parser.add_argument("--scratch", default="/tmp/forgetless-osft-benchmark")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # set in the per-method child
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()
    if args.seqs_per_step % args.micro_batch:
        parser.error("--seqs-per-step must be a multiple of --micro-batch")
    if args.method:
        print(json.dumps(run_method(args)))
        return

    results = {}
    for method in args.methods:
        child = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        result = results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        peak = result["peak_bytes"] / 2**30
        print(f"{method:9s} {result['step_s']:8.2f} s/step  peak {peak:6.2f} GiB", flush=True)

    plain = results.get("plain")
    device = next(iter(results.values()))["device"]
    print(
        f"\n{args.model} on {device}, {args.seqs_per_step} x {args.seq_len} tokens per optimizer "
        f"step (micro-batch {args.micro_batch}), preserved rank {args.preserve_ratio:g}, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    header = ("method", "s/step", "time/plain", "peak GiB", "mem/plain", "trainable")
    print("{:9s} {:>8s} {:>11s} {:>9s} {:>10s} {:>11s}".format(*header))
    for method, result in results.items():
        time_ratio = result["step_s"] / plain["step_s"] if plain else float("nan")
        memory_ratio = result["peak_bytes"] / plain["peak_bytes"] if plain else float("nan")
        peak = result["peak_bytes"] / 2**30
        print(
            f"{method:9s} {result['step_s']:8.2f} {time_ratio:10.2f}x {peak:9.2f} "
            f"{memory_ratio:9.2f}x {result['trainable_params'] / 1e6:10.1f}M"
        )
    for method in results:
        print(f"  {method}: {METHODS[method]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
