"""Peak memory and wall time of merging N experts against a plain copy of one checkpoint.

The streaming merge (``forgetless.merge.merge_checkpoints``) reads every tensor of the base and
of N experts but holds only a few tensors at a time, so its peak memory should not grow with N.
The yardstick is what one model in memory costs: ``AutoModelForCausalLM.from_pretrained``
followed by ``save_pretrained`` of the base. The target is a peak RSS of at most 1.5x that copy
for every N.

Experts are the base plus seeded Gaussian noise (std 1e-3) on every floating tensor, written
once before anything is measured. Each variant (the copy, then one merge per N) runs in its own
fresh process, which imports the same modules whatever it measures and reports its own peak
RSS (``ru_maxrss``), so interpreter and imports weigh the same in every row; the time is that
of the copy or merge alone::

    python benchmarks/merge_memory.py                  # SmolLM2-135M, merging 2, 4, 8 experts
    python benchmarks/merge_memory.py --method ties --experts 2 16
    python benchmarks/merge_memory.py --quick          # tiny-llama, a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("sotu", "task_arithmetic", "ties", "dare")
NOISE_STD = 1e-3
TARGET_RSS_RATIO = 1.5


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB


def run_variant(args: argparse.Namespace) -> dict:
    """In the child: copy the base or merge ``args.experts[0]`` experts; time it, report RSS."""
    # Every variant imports both paths, so the copy is not charged for transformers alone.
    from transformers import AutoModelForCausalLM

    from forgetless.merge import merge_checkpoints
    from forgetless.merge.config import MergeConfig

    work = Path(args.child_work)
    imports_kib = peak_rss_kib()
    started = time.perf_counter()
    if args.child == "copy":
        AutoModelForCausalLM.from_pretrained(args.base).save_pretrained(work / "copy")
    else:
        count = args.experts[0]
        merge_checkpoints(
            args.base,
            [str(work / f"expert{i}") for i in range(count)],
            work / f"merged-{count}",
            config=MergeConfig(method=args.method),
            overwrite=True,
            progress=False,
        )
    return {
        "seconds": time.perf_counter() - started,
        "peak_kib": peak_rss_kib(),
        "imports_kib": imports_kib,
    }


def save_tiny_llama(directory: Path) -> None:
    from forgetless.models import load_model

    loaded = load_model("tiny-llama", dtype="float32", device="cpu")
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)


def make_experts(base: Path, work: Path, count: int) -> None:
    """Write experts 0..count-1 as the base plus seeded noise, one weight file in memory at a
    time. Weight file names are kept, so a sharded base's index stays valid when copied."""
    import torch
    from safetensors.torch import load_file, save_file

    weight_files = sorted(base.glob("*.safetensors"))
    other_files = [
        file for file in sorted(base.iterdir()) if file.is_file() and file.suffix != ".safetensors"
    ]
    for expert in range(count):
        directory = work / f"expert{expert}"
        directory.mkdir()
        generator = torch.Generator().manual_seed(expert)
        for weight_file in weight_files:
            state = load_file(weight_file)
            for tensor in state.values():
                if tensor.is_floating_point():
                    noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                    tensor.add_(noise.mul_(NOISE_STD))
            save_file(state, directory / weight_file.name, metadata={"format": "pt"})
            del state
        for file in other_files:
            shutil.copyfile(file, directory / file.name)


def prepare(args: argparse.Namespace) -> dict:
    """In a child: write the base (with --quick) and the experts; return the base's location."""
    work = Path(args.child_work)
    if args.quick:
        base = work / "base"
        save_tiny_llama(base)
    elif args.base:
        base = Path(args.base)
    else:
        from forgetless.models import smollm2_checkpoint_dir

        base = smollm2_checkpoint_dir()
    make_experts(base, work, max(args.experts))
    weight_bytes = sum(file.stat().st_size for file in base.glob("*.safetensors"))
    return {"base": str(base), "checkpoint_mib": weight_bytes / 2**20}


def run_child(task: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *task], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(task)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(label: str, method: str, results: dict[str, dict], checkpoint_mib: float) -> None:
    copy = results["copy"]
    print(
        f"\n{label}: checkpoint {checkpoint_mib:.1f} MiB of weights, method {method}, "
        f"one fresh process per row"
    )
    header = ("variant", "seconds", "peak RSS MiB", "time/copy", "RSS/copy")
    print("{:10s} {:>8s} {:>13s} {:>10s} {:>9s}".format(*header))
    for variant, result in results.items():
        print(
            f"{variant:10s} {result['seconds']:8.2f} {result['peak_kib'] / 1024:13.1f} "
            f"{result['seconds'] / copy['seconds']:9.2f}x "
            f"{result['peak_kib'] / copy['peak_kib']:8.2f}x"
        )
    imports_mib = max(result["imports_kib"] for result in results.values()) / 1024
    print(f"RSS after imports alone, before any weight is read: {imports_mib:.1f} MiB")

    ratios = {
        variant: result["peak_kib"] / copy["peak_kib"]
        for variant, result in results.items()
        if variant != "copy"
    }
    worst = max(ratios, key=ratios.get)
    verdict = "met" if ratios[worst] <= TARGET_RSS_RATIO else "NOT met"
    print(
        f"target: peak RSS <= {TARGET_RSS_RATIO}x one model (the copy) for every N: {verdict} "
        f"(highest: {worst} at {ratios[worst]:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", help="Base checkpoint directory (default: SmolLM2-135M).")
    parser.add_argument(
        "--quick", action="store_true", help="Use tiny-llama as the base (a smoke test)."
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], metavar="N")
    parser.add_argument("--method", choices=METHODS, default="sotu")
    parser.add_argument(
        "--work-dir", help="Where to create the temporary directory (default: the system's)."
    )
    parser.add_argument(
        "--keep-files", action="store_true", help="Keep the experts and outputs afterwards."
    )
    # Set by the parent in its child processes.
    parser.add_argument("--child", choices=("prepare", "copy", "merge"), help=argparse.SUPPRESS)
    parser.add_argument("--child-work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prepare(args) if args.child == "prepare" else run_variant(args)))
        return
    if args.quick and args.base:
        parser.error("--quick brings its own base; drop --base")
    if min(args.experts) < 1:
        parser.error("--experts must be positive")

    # Linux carries a process's peak RSS over fork and exec into its children's ru_maxrss, so
    # this process imports nothing heavy and leaves writing the experts to a child as well.
    work = Path(tempfile.mkdtemp(prefix="forgetless-merge-memory-", dir=args.work_dir))
    try:
        print(f"writing {max(args.experts)} experts to {work} ...", flush=True)
        source = ["--quick"] if args.quick else ["--base", args.base] if args.base else []
        experts = ["--experts", *map(str, args.experts)]
        prepared = run_child([*source, *experts, "--child-work", str(work), "--child", "prepare"])
        label = "tiny-llama" if args.quick else args.base or "SmolLM2-135M-Instruct"

        variants = {"copy": ["copy"]}
        variants.update({f"merge N={n}": ["merge", "--experts", str(n)] for n in args.experts})
        results = {}
        for name, variant in variants.items():
            task = ["--base", prepared["base"], "--method", args.method, "--child-work", str(work)]
            result = results[name] = run_child([*task, "--child", *variant])
            print(
                f"{name:10s} {result['seconds']:8.2f} s  peak {result['peak_kib'] / 1024:8.1f} MiB",
                flush=True,
            )
        report(label, args.method, results, prepared["checkpoint_mib"])
    finally:
        if args.keep_files:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
