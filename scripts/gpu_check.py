"""The GPU check: one prepared run that fits a short lease on one GPU with no network.

Run it through ``scripts/gpu_check.sh`` (which first installs carried wheels, see
docs/gpu.md)::

    bash scripts/gpu_check.sh --out gpu_results          # full: CUDA, a 1.2B model in bf16
    bash scripts/gpu_check.sh --device cpu --quick --out /tmp/check   # CPU, for CI

Parts, each but the first in a process of its own with a time limit, so one failure or
overrun leaves the others' results:

1. ``environment``: versions, device, memory.
2. ``osft_sizes``: OSFT vs plain AdamW vs PEFT's OSF, step time and peak memory
   (``benchmarks/osft_sizes.py``) on a randomly initialised Llama-3.2-1B shape, fp32 master
   weights under bf16 autocast (what the Trainer's ``bf16`` does).
3. ``grad_features``: the per-sample gradient extractor against a batch-1 loop and against a
   plain forward/backward (``benchmarks/grad_features.py``).
4. ``end_to_end``: ``forgetless train`` (OSFT) → ``eval`` → ``train`` (full, a second expert)
   → ``merge`` (SoTU) → ``eval`` on tiny-llama and generated JSONL files, on the device; checks
   that every perplexity is finite, that training lowered the domain's, and that OSFT's update
   left the preserved subspace alone.
5. ``fsdp2_trainer`` (GPU only): ``accelerate launch`` with FSDP2 (one process) of
   ``forgetless train --method osft`` on tiny-llama, with the same subspace check: the
   Trainer + accelerate path that a CPU cannot run.

It needs no model download and no data directory. ``summary.json`` and ``summary.md`` in
``--out`` hold every part's status, seconds and figures; the exit status is 1 if any part
failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = {
    "sizes": ["llama-3.2-1b"],
    "size_args": ["--dtype", "float32", "--autocast", "--methods", "plain", "osft", "peft-osf",
                  "--tokens-per-step", "32768", "--micro-batch", "8", "--seq-len", "2048",
                  "--steps", "3"],
    "grad_args": ["--model", "random:smollm2-135m", "--samples", "256", "--batch-size", "16",
                  "--max-length", "512"],
    "limits": {"osft_sizes": 300, "grad_features": 60, "end_to_end": 90, "fsdp2_trainer": 60},
}  # fmt: skip
QUICK = {
    "sizes": ["tiny-llama"],
    "size_args": ["--quick", "--methods", "plain", "osft"],
    "grad_args": ["--model", "tiny-llama", "--samples", "8", "--batch-size", "4",
                  "--max-length", "32", "--projection-dim", "64", "--pool", "1000"],
    "limits": {"osft_sizes": 240, "grad_features": 120, "end_to_end": 300, "fsdp2_trainer": 0},
}  # fmt: skip


def environment(args) -> dict:
    import peft
    import torch
    import transformers

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
            cuda=torch.version.cuda,
        )
    return info


def osft_sizes(args, mode) -> dict:
    target = Path(args.out) / "osft_sizes.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "osft_sizes.py"), "--device",
               args.device, "--sizes", *mode["sizes"], *mode["size_args"],
               "--json", str(target)]  # fmt: skip
    log = _run(command, Path(args.out) / "osft_sizes.log")
    rows = json.loads(target.read_text())["rows"]
    plain = {row["size"]: row for row in rows if row["method"] == "plain"}
    ratios = {
        f"{row['size']} {row['method']}": {
            "time_ratio": row["step_s"] / plain[row["size"]]["step_s"],
            "memory_ratio": row["peak_bytes"] / plain[row["size"]]["peak_bytes"],
            "step_s": row["step_s"],
            "peak_gib": row["peak_bytes"] / 2**30,
            "parameters": row["parameters"],
        }
        for row in rows
    }
    _check_finite(ratios)
    return {"ratios": ratios, "table": _table_of(log)}


def grad_features(args, mode) -> dict:
    target = Path(args.out) / "grad_features.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "grad_features.py"), *mode["grad_args"],
               "--device", args.device, "--json", str(target)]  # fmt: skip
    _run(command, Path(args.out) / "grad_features.log")
    result = json.loads(target.read_text())
    _check_finite(result)
    return result


def end_to_end(args) -> dict:
    """Train → eval → merge through the CLI, in this process (one import of everything)."""
    from forgetless.cli import main

    work = Path(args.out) / "end_to_end"
    work.mkdir(parents=True, exist_ok=True)
    domain, other, general = (work / f"{name}.jsonl" for name in ("domain", "other", "general"))
    _write_texts(domain, "the patient was given {} mg of the drug and recovered on day {}")
    _write_texts(other, "the court held in case {} that the contract of year {} was void")
    _write_texts(general, "a walk in the park on day {} with {} friends and a dog")
    device = ["--set", f"model.device={args.device}"]
    tasks = f"ppl:{domain},ppl:{general}"

    def cli(argv: list[str]) -> None:
        try:
            main(argv)
        except SystemExit as exit_:
            if exit_.code:
                raise RuntimeError(f"forgetless {' '.join(argv)} exited {exit_.code}") from None

    started = time.perf_counter()
    train = ["train", "--model", "tiny-llama", "--max-steps", "6", "--batch-size", "4",
             "--max-length", "48", "--learning-rate", "1e-3", *device]  # fmt: skip
    fixed_ranks = [
        "--set",
        "train.osft.rank_policy=fixed",
        "--set",
        "train.osft.preserve_ratio=0.5",
    ]
    cli([*train, "--data", str(domain), "--method", "osft", "--output-dir", str(work / "osft"),
         *fixed_ranks])  # fmt: skip
    cli([*train, "--data", str(other), "--method", "full", "--output-dir", str(work / "full")])
    cli(["merge", "--base", "tiny-llama", "--experts", str(work / "osft" / "model"),
         str(work / "full" / "model"), "--method", "sotu", "--keep", "0.5",
         "--output-dir", str(work / "merged"), *device])  # fmt: skip
    evaluations = {}
    for name, model in (("base", "tiny-llama"), ("osft", str(work / "osft" / "model")),
                        ("merged", str(work / "merged"))):  # fmt: skip
        output = work / f"eval_{name}.json"
        cli(["eval", "--model", model, "--tasks", tasks, "--output", str(output), *device])
        evaluations[name] = json.loads(output.read_text())
    perplexities = {
        name: {Path(task).stem: _perplexity_of(metrics) for task, metrics in result.items()}
        for name, result in evaluations.items()
    }
    _check_finite(perplexities)
    if perplexities["osft"]["domain"] >= perplexities["base"]["domain"]:
        raise RuntimeError(f"OSFT training did not lower the domain perplexity: {perplexities}")
    drift = osft_subspace_leak(work / "osft" / "model", args.device)
    if drift["worst_relative_leak"] > 1e-3:
        raise RuntimeError(f"OSFT's update reached the preserved subspace: {drift}")
    return {
        "seconds": time.perf_counter() - started,
        "perplexity": perplexities,
        "osft_update": drift,
    }


# FSDP2 through accelerate and the Trainer, on one GPU: accelerate turns FSDP on only for
# accelerator processes, so this path cannot run on a CPU (docs/osft.md, Distributed training).
FSDP2_ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: bf16
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""


def fsdp2_trainer(args) -> dict:
    """``accelerate launch`` (FSDP2, one process) of ``forgetless train --method osft``: the
    Trainer shards the model after the callback is built; the update must still stay out of
    the preserved subspace."""
    work = Path(args.out) / "fsdp2_trainer"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "accelerate_fsdp2.yaml"
    config.write_text(FSDP2_ACCELERATE_CONFIG)
    data = work / "domain.jsonl"
    _write_texts(data, "the patient was given {} mg of the drug and recovered on day {}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "-m", "forgetless.cli", "train", "--model", "tiny-llama", "--data", str(data),
               "--method", "osft", "--max-steps", "4", "--batch-size", "4", "--max-length", "48",
               "--learning-rate", "1e-3", "--output-dir", str(work / "osft"),
               "--set", "train.osft.rank_policy=fixed",
               "--set", "train.osft.preserve_ratio=0.5"]  # fmt: skip
    _run(command, work / "train.log")
    leak = osft_subspace_leak(work / "osft" / "model", args.device)
    if leak["worst_relative_leak"] > 1e-3:
        raise RuntimeError(f"under FSDP2 OSFT's update reached the preserved subspace: {leak}")
    return {"osft_update": leak}


def osft_subspace_leak(trained_dir: Path, device: str) -> dict:
    """Largest share of a targeted matrix's update that lies in its preserved (top) subspace,
    with the ranks of ``osft.rank_policy=fixed, preserve_ratio=0.5``."""
    from forgetless.models import load_model
    from forgetless.train.config import OsftConfig
    from forgetless.train.osft import SubspaceBasis, choose_ranks, target_modules

    base = load_model("tiny-llama", dtype="float32", device=device).model
    trained = load_model(str(trained_dir), dtype="float32", device=device).model
    config = OsftConfig(rank_policy="fixed", preserve_ratio=0.5)
    before = target_modules(base, config.target_modules)
    after = target_modules(trained, config.target_modules)
    worst, moved = 0.0, 0.0
    for choice in choose_ranks(before, config):
        weight = before[choice.name].weight.detach().float()
        update = after[choice.name].weight.detach().float() - weight
        leak = SubspaceBasis(weight, choice.rank, config.projection).high_energy(update)
        norm = float(update.norm())
        moved = max(moved, norm)
        if norm > 0:
            worst = max(worst, max(leak) / norm)
    if moved == 0.0:
        raise RuntimeError("OSFT training left every targeted matrix unchanged")
    return {"worst_relative_leak": worst, "largest_update_norm": moved}


def _write_texts(path: Path, template: str, count: int = 64) -> None:
    lines = [json.dumps({"text": template.format(i * 7 % 50, i)}) for i in range(count)]
    path.write_text("\n".join(lines) + "\n")


def _perplexity_of(metrics: dict) -> float:
    return float(metrics["details"]["perplexity"])


def _check_finite(value) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _check_finite(item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise RuntimeError(f"a non-finite figure: {value}")


def _run(command: list[str], log: Path) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=_environment())
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        name = command[2] if command[1] == "-m" else Path(command[1]).name
        raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-800:]}")
    return done.stdout


def _environment() -> dict:
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _table_of(stdout: str) -> str:
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("random-init")), 0)
    return "\n".join(lines[start:])


def run_part(name: str, args, mode) -> dict:
    """Run one part in a child process of this script, under its time limit."""
    command = [sys.executable, __file__, "--part", name, "--device", args.device,
               "--out", args.out, *(["--quick"] if args.quick else [])]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=mode["limits"][name],
            env=_environment(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    (Path(args.out) / f"{name}.stderr.log").write_text(done.stderr)
    if done.returncode != 0:
        return {"status": "failed", "seconds": seconds, "error": done.stderr.strip()[-1500:]}
    return {"status": "ok", "seconds": seconds, **json.loads(done.stdout.splitlines()[-1])}


def write_summary(out: Path, parts: dict, args) -> None:
    summary = {"mode": "quick" if args.quick else "full", "device": args.device, "parts": parts}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# forgetless GPU check ({summary['mode']}, {args.device})", ""]
    for name, part in parts.items():
        lines.append(f"## {name}: {part['status']} in {part['seconds']:.0f} s")
        if part.get("table"):
            lines += ["", "```", part["table"], "```"]
        figures = {k: v for k, v in part.items() if k not in ("status", "seconds", "table")}
        lines += ["", "```json", json.dumps(figures, indent=2), "```", ""]
    (out / "summary.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: minutes on a CPU.")
    parser.add_argument("--out", default="gpu_check_results", help="Folder for the results.")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # set in the children
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    if args.part:
        parts = {
            "osft_sizes": lambda: osft_sizes(args, mode),
            "grad_features": lambda: grad_features(args, mode),
            "end_to_end": lambda: end_to_end(args),
            "fsdp2_trainer": lambda: fsdp2_trainer(args),
        }
        print(json.dumps(parts[args.part]()))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU; use --device cpu", file=sys.stderr)
            sys.exit(2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts = {"environment": {"status": "ok", "seconds": 0.0, **environment(args)}}
    for name in mode["limits"]:
        if name == "fsdp2_trainer" and not args.device.startswith("cuda"):
            parts[name] = {"status": "skipped", "seconds": 0.0, "why": "needs a GPU"}
            continue
        parts[name] = run_part(name, args, mode)
        print(f"{name}: {parts[name]['status']} in {parts[name]['seconds']:.0f} s", flush=True)
    write_summary(Path(args.out), parts, args)
    print(f"all parts in {time.perf_counter() - started:.0f} s; see {args.out}/summary.md")
    if any(part["status"] not in ("ok", "skipped") for part in parts.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
