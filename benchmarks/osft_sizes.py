"""OSFT's cost against plain AdamW full fine-tuning as the model grows: step time and peak
memory per size, on randomly initialised models of published shapes (``random:<shape>``,
``forgetless.model_shapes``).

Every (size, method) runs in a process of its own, so each peak is that method's alone and a
model that only just fits is never held twice. A process builds the model (and OSFT's bases),
takes one warm-up step (allocator, AdamW state), resets the memory peak, then times
``--steps`` optimizer steps of ``--tokens-per-step`` tokens through the same code as
``benchmarks/osft_overhead.py`` (the hooks a ``transformers.Trainer`` calls). Time is CPU time
on ``--threads`` threads on CPU, wall time after a synchronize on CUDA; memory is peak RSS on
CPU, peak allocated memory on CUDA.

Why the ratio grows with size: OSFT's projection costs about 4·m·n·k multiply-adds per matrix
per step (k the preserved rank, a fixed fraction of min(m, n)), whatever the batch, while a
training step costs about 6·m·n per token. The ratio therefore grows with the model width
and shrinks with the tokens per step: compare sizes at the tokens per step each would be
trained with (``--tokens-per-step`` takes one value per size).

    python benchmarks/osft_sizes.py                                   # CPU: 135M, 360M, 0.6B
    python benchmarks/osft_sizes.py --device cuda --dtype float32 --autocast \\
        --sizes llama-3.2-1b smollm2-1.7b --methods plain osft peft-osf
    python benchmarks/osft_sizes.py --quick                           # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from osft_overhead import METHODS, Arm, peak_memory, reset_peak_memory, token_batches  # noqa: E402

CPU_SIZES = ["smollm2-135m", "smollm2-360m", "qwen3-0.6b"]


def measure(args: argparse.Namespace) -> dict:
    """Child process: one method at one size."""
    import torch

    started = time.perf_counter()
    arm = Arm(args.method_of, args)
    setup = time.perf_counter() - started
    batches = token_batches(args, arm.vocab, args.tokens, seed=0)
    arm.step(batches)
    reset_peak_memory(arm.device)
    times, projecting = [], []
    for step in range(args.steps):
        seconds, projection = arm.step(token_batches(args, arm.vocab, args.tokens, seed=1 + step))
        times.append(seconds)
        projecting.append(projection)
    return {
        "size": args.model,
        "method": args.method_of,
        "tokens_per_step": args.tokens,
        "parameters": sum(p.numel() for p in arm.model.parameters()),
        "trainable": arm.trainable(),
        "setup_s": setup,
        "step_s": statistics.median(times),
        "projection_s": statistics.median(projecting),
        "peak_bytes": peak_memory(arm.device),
        "device": str(arm.device),
        "threads": torch.get_num_threads(),
    }


def run_child(args: argparse.Namespace, size: str, method: str, tokens: int) -> dict:
    child = [
        sys.executable, __file__, *sys.argv[1:],
        "--model", size, "--method-of", method, "--tokens", str(tokens),
    ]  # fmt: skip
    done = subprocess.run(child, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{size} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    plain = {row["size"]: row for row in rows if row["method"] == "plain"}
    device = rows[0]["device"]
    clock = "wall time" if device.startswith("cuda") else f"CPU time on {args.threads} thread(s)"
    precision = f"{args.dtype} weights" + (", bf16 autocast" if args.autocast else "")
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(
        f"\nrandom-init models of published shapes on {device}; {precision}{checkpointing}; "
        f"micro-batches of {args.micro_batch} x {args.seq_len} tokens; preserved rank "
        f"{args.preserve_ratio:g} of min(m, n); {clock}, median of {args.steps} steps"
    )
    header = "{:14s} {:>7s} {:14s} {:>7s} {:>8s} {:>7s} {:>10s} {:>9s} {:>9s} {:>10s}"
    print(header.format("size", "params", "method", "tokens", "s/step", "proj s", "time/plain",
                        "peak GiB", "mem/plain", "trainable"))  # fmt: skip
    for row in rows:
        base = plain[row["size"]]
        print(
            f"{row['size']:14s} {row['parameters'] / 1e9:6.2f}B {row['method']:14s} "
            f"{row['tokens_per_step']:7d} {row['step_s']:8.2f} {row['projection_s']:7.2f} "
            f"{row['step_s'] / base['step_s']:9.3f}x {row['peak_bytes'] / 2**30:9.2f} "
            f"{row['peak_bytes'] / base['peak_bytes']:8.2f}x {row['trainable'] / 1e6:9.1f}M"
        )
    for method in dict.fromkeys(row["method"] for row in rows if row["method"] != "plain"):
        growth = [
            f"{row['size']} {row['step_s'] / plain[row['size']]['step_s']:.2f}x time, "
            f"{row['peak_bytes'] / plain[row['size']]['peak_bytes']:.2f}x memory"
            for row in rows
            if row["method"] == method
        ]
        print(f"{method} / plain by size: " + "; ".join(growth))
    for method in dict.fromkeys(row["method"] for row in rows):
        print(f"  {method}: {METHODS[method]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", nargs="+", default=None,
        help=f"Shapes from forgetless.model_shapes (default {' '.join(CPU_SIZES)}).",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--autocast", action="store_true", help="bf16 mixed precision.")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--methods", nargs="+", default=["plain", "osft"], choices=list(METHODS),
        help="plain is always included: every ratio is against it.",
    )  # fmt: skip
    parser.add_argument("--preserve-ratio", type=float, default=0.5)
    parser.add_argument(
        "--tokens-per-step", type=int, nargs="+", default=[1024],
        help="One value for every size, or one per size.",
    )  # fmt: skip
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="Timed steps per size and method.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch).")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, one short step (CI).")
    parser.add_argument("--scratch", default="/tmp/forgetless-osft-benchmark")
    parser.add_argument("--json", help="Also write the rows here.")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # set in the children
    parser.add_argument("--method-of", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.micro_batch, args.seq_len, args.steps = ["tiny-llama"], 1, 32, 1
        args.tokens_per_step = [32]
    sizes = args.sizes or CPU_SIZES
    if len(args.tokens_per_step) not in (1, len(sizes)):
        parser.error("--tokens-per-step takes one value, or one per size")
    for tokens in args.tokens_per_step:
        if tokens % (args.micro_batch * args.seq_len):
            parser.error("every --tokens-per-step must be a multiple of micro-batch x seq-len")
    import torch

    torch.set_num_threads(args.threads)
    if args.method_of:
        print(json.dumps(measure(args)))
        return

    started = time.perf_counter()
    methods = ["plain", *(m for m in args.methods if m != "plain")]
    per_size = args.tokens_per_step * (len(sizes) // len(args.tokens_per_step))
    rows = []
    for size, tokens in zip(sizes, per_size, strict=True):
        name = size if size == "tiny-llama" else f"random:{size}"
        for method in methods:
            row = run_child(args, name, method, tokens)
            row["size"] = size
            rows.append(row)
            print(
                f"{size} {method}: {row['step_s']:.2f} s/step, "
                f"{row['peak_bytes'] / 2**30:.2f} GiB, set-up {row['setup_s']:.0f} s",
                flush=True,
            )
    print_table(rows, args)
    print(f"{time.perf_counter() - started:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
