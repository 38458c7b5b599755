"""OSFT's cost against plain AdamW full fine-tuning, as a curve over tokens per optimizer step.

Every method trains the same model on the same token batches (micro-batches of 2 x 512 tokens,
accumulated to 1k, 4k and 16k tokens per optimizer step by default) with the same preserved
rank, through the hooks a ``transformers.Trainer`` calls (``on_pre_optimizer_step`` after
gradient clipping, the AdamW step, then the re-projection).

Time: all methods live in one process and their optimizer steps alternate (plain first, then
OSFT first, ...); a ratio is the median over pairs of an OSFT step over the plain step taken
next to it. On CPU the clock is the process's CPU time on ``--threads`` threads (default 1):
on a shared machine other jobs' load, and a scheduler pausing the process, inflate wall time
but not the work done. On CUDA it is wall time after a synchronize. OSFT re-projects the
weights only every ``osft.reproject_every`` steps, so each measured step re-projects once and
is charged 1 / reproject_every of that time (the amortised cost; the projection column shows
it).

Memory: each method again in a child process for two steps (peak RSS on CPU, peak allocated
memory on CUDA, both reset once the model and the bases are built). It does not depend on the
tokens per step: gradients accumulate in place.

    python benchmarks/osft_overhead.py                   # SmolLM2-135M, CPU or the first GPU
    python benchmarks/osft_overhead.py --tokens-per-step 1024 --pairs 5 \\
        --methods plain osft osft-gradients osft-sparse
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "plain": "AdamW full fine-tuning, every parameter trainable",
    "osft": "forgetless OSFT, defaults (two_sided, the step projected every step, untargeted "
    "parameters frozen)",
    "osft-gradients": "forgetless OSFT projecting the gradient too (project_gradients=true)",
    "osft-sparse": "forgetless OSFT projecting the gradient, and the weights every 8 steps",
    "osft-top-block": "forgetless OSFT with projection=top_block",
    "osft-all": "forgetless OSFT with untargeted parameters trained unconstrained",
    "peft-osf": "PEFT's OSF tuner (re-parameterised U/S/V factors)",
}
OSFT_SETTINGS = {
    "osft": {},
    "osft-gradients": {"project_gradients": True},
    "osft-sparse": {"project_gradients": True, "reproject_every": 8},
    "osft-top-block": {"projection": "top_block"},
    "osft-all": {"freeze_untargeted": False},
}


class Arm:
    """One method's model, optimizer and (for OSFT) projector, stepped by hand."""

    def __init__(self, method: str, args: argparse.Namespace):
        import torch
        from transformers import TrainerControl, TrainerState, TrainingArguments

        from forgetless.models import load_model
        from forgetless.train.config import OsftConfig
        from forgetless.train.osft import OsftCallback

        self.method = method
        torch.manual_seed(0)
        dtype = getattr(args, "dtype", "float32")
        self.model = load_model(args.model, dtype=dtype, device=args.device).model
        if getattr(args, "gradient_checkpointing", False):
            self.model.config.use_cache = False
            # Non-reentrant: OSFT freezes the embeddings, so the checkpointed blocks' inputs
            # need no gradient of their own.
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        self.callback = None
        if method in OSFT_SETTINGS:
            config = OsftConfig(
                rank_policy="fixed", preserve_ratio=args.preserve_ratio, **OSFT_SETTINGS[method]
            )
            self.callback = OsftCallback(self.model, config, verbose=False)
            self.every = config.reproject_every
            training_args = TrainingArguments(
                output_dir=args.scratch, use_cpu=self.model.device.type == "cpu", report_to=[]
            )
            self.callback.on_train_begin(training_args, TrainerState(), TrainerControl())
        elif method == "peft-osf":
            from peft import OSFConfig, get_peft_model

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            self.model = get_peft_model(
                self.model, OSFConfig(effective_rank=args.preserve_ratio, target_modules=targets)
            )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.0)
        self.device = self.model.device
        self.vocab = self.model.config.vocab_size
        # bf16 mixed precision as the Trainer's --bf16 applies it: fp32 weights, bf16 matmuls.
        self.autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=getattr(args, "autocast", False)
        )

    def step(self, batches) -> tuple[float, float]:
        """One optimizer step over ``batches``: (seconds, of which projecting)."""
        import torch

        started = self._now()
        for batch in batches:
            batch = batch.to(self.device)
            with self.autocast:
                loss = self.model(input_ids=batch, labels=batch).loss
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        projecting = 0.0
        if self.callback is not None and self.callback.config.project_gradients:
            before = self._now()
            self.callback.projector.project_gradients()
            projecting += self._now() - before
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = self._now() - started
        if self.callback is not None:
            before = self._now()
            self.callback.projector.pending_steps += 1
            self.callback.projector.reproject()
            amortised = (self._now() - before) / self.every
            projecting += amortised
            seconds += amortised
        return seconds, projecting

    def _now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def token_batches(args: argparse.Namespace, vocab: int, tokens_per_step: int, seed: int):
    import torch

    count = tokens_per_step // (args.micro_batch * args.seq_len)
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=generator)
        for _ in range(count)
    ]


def reset_peak_memory(device) -> None:
    """Start the peak-memory count from what is held now."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def peak_memory(device) -> int:
    """Bytes: peak allocated CUDA memory, or the process's peak RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: one step of ``args.memory_of``; print peak memory and trainable size."""
    arm = Arm(args.memory_of, args)
    # Loading the GGUF checkpoint de-quantises it through buffers far larger than training
    # needs, so the process's lifetime peak says nothing about a step: reset the peak once the
    # model, the bases and their SVD temporaries are in place.
    reset_peak_memory(arm.device)
    batches = token_batches(args, arm.vocab, args.micro_batch * args.seq_len, seed=0)
    arm.step(batches)
    arm.step(batches)  # the second step holds AdamW's state as every later one does
    print(json.dumps({"peak_bytes": peak_memory(arm.device), "trainable": arm.trainable()}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--methods", nargs="+", default=["plain", "osft"], choices=list(METHODS),
        help="plain is always included: every ratio is against it.",
    )  # fmt: skip
    parser.add_argument(
        "--preserve-ratio", type=float, default=0.5, help="Frozen fraction of min(m, n)."
    )
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--micro-batch", type=int, default=2, help="Sequences per micro-batch.")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=3, help="Measured steps per method and size.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch).")
    parser.add_argument("--no-memory", action="store_true", help="Skip the memory children.")
    parser.add_argument("--scratch", default="/tmp/forgetless-osft-benchmark")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # set in the memory children
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()
    for tokens in args.tokens_per_step:
        if tokens % (args.micro_batch * args.seq_len):
            parser.error("every --tokens-per-step must be a multiple of micro-batch x seq-len")
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_of:
        measure_memory(args)
        return

    methods = ["plain", *(m for m in args.methods if m != "plain")]
    started = time.perf_counter()
    arms = {method: Arm(method, args) for method in methods}
    print(f"set-up (load, SVDs): {time.perf_counter() - started:.0f} s", flush=True)
    vocab = arms["plain"].vocab
    for arm in arms.values():  # warm-up: allocator, AdamW state
        arm.step(token_batches(args, vocab, args.micro_batch * args.seq_len, seed=0))
    curve = []
    for tokens in args.tokens_per_step:
        times = {method: [] for method in methods}
        projecting = {method: [] for method in methods}
        for pair in range(args.pairs):
            batches = token_batches(args, vocab, tokens, seed=1 + pair)
            # Alternate who goes first, so a drift in the machine's load favours neither.
            for method in methods if pair % 2 == 0 else reversed(methods):
                seconds, projection = arms[method].step(batches)
                times[method].append(seconds)
                projecting[method].append(projection)
            print(
                f"{tokens} tokens/step, pair {pair + 1}: "
                + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in methods),
                flush=True,
            )
        for method in methods:
            ratios = [t / p for t, p in zip(times[method], times["plain"], strict=True)]
            curve.append(
                {
                    "method": method,
                    "tokens_per_step": tokens,
                    "step_s": statistics.median(times[method]),
                    "projection_s": statistics.median(projecting[method]),
                    "time_ratio": statistics.median(ratios),
                    "time_ratios": ratios,
                }
            )
    memory = {}
    if not args.no_memory:
        for method in methods:
            child = [sys.executable, __file__, *sys.argv[1:], "--memory-of", method]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
            memory[method] = json.loads(done.stdout.strip().splitlines()[-1])

    device = arms["plain"].device
    clock = "wall time" if device.type == "cuda" else f"CPU time on {args.threads} thread(s)"
    print(
        f"\n{args.model} on {device}; micro-batches of {args.micro_batch} x {args.seq_len} "
        f"tokens; preserved rank {args.preserve_ratio:g} of min(m, n); {clock}, median of "
        f"{args.pairs} alternating pairs per size; {time.perf_counter() - started:.0f} s in all"
    )
    print("{:15s} {:>7s} {:>8s} {:>8s} {:>10s}".format("method", "tokens", "s/step", "proj s",
                                                        "time/plain"))  # fmt: skip
    for row in curve:
        print(
            f"{row['method']:15s} {row['tokens_per_step']:7d} {row['step_s']:8.2f} "
            f"{row['projection_s']:8.2f} {row['time_ratio']:9.3f}x"
        )
    if memory:
        print("\n{:15s} {:>9s} {:>10s} {:>11s}".format("method", "peak GiB", "mem/plain",
                                                      "trainable"))  # fmt: skip
        for method, result in memory.items():
            ratio = result["peak_bytes"] / memory["plain"]["peak_bytes"]
            print(
                f"{method:15s} {result['peak_bytes'] / 2**30:9.2f} {ratio:9.2f}x "
                f"{result['trainable'] / 1e6:10.1f}M"
            )
    for method in methods:
        print(f"  {method}: {METHODS[method]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"curve": curve, "memory": memory, "args": vars(args)}, handle, indent=2)


if __name__ == "__main__":
    main()
