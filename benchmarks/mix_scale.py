"""Cost of the mixture stage's passes as the pool grows (10k, 100k, 1M documents).

The pool is the shared corpora of the default ``mix.sources`` (C4, PubMedQA, NWGI, EUR-Lex:
5,607 documents), repeated with a seeded perturbation (5 % of the words dropped, one window
of up to 8 words shuffled) so that no two documents are equal and the length distribution
stays the real one. It is built once, as jsonl under ``--work-dir``, and read from disk
(``TextFile``) by every pass. Each size runs in a child process of its own, so its peak
resident memory (VmHWM, reset before each pass) is its own:

1. embed: sharded and resumable (an interrupted size continues at its first unfinished
   shard; ``--reembed`` starts over);
2. quality: the rules scorer (the default), streamed over the file;
3. k-means: trained on a seeded sample of at most ``--points-per-centroid`` x k rows;
4. assign: every document's nearest centroid and the cluster statistics, one streamed pass;
5. prune + merge: quality thresholds and Ward merging on the statistics and centroids only.

For each pass it prints wall and CPU seconds (the machine may be shared), documents per
second and peak RSS, then the ratios between consecutive sizes: time per document and peak
RSS. With ``--engine ray`` CPU seconds are this process's only, not the Ray workers'.

    python benchmarks/mix_scale.py --documents 10000 100000 1000000
    python benchmarks/mix_scale.py --embedder minilm-static --documents 10000 100000 1000000
    python benchmarks/mix_scale.py --quick

``--embedder`` takes any embedder forgetless accepts (model id, alias or path), or
``minilm-static``: MiniLM's own input token embeddings, mean-pooled (a sentence-transformers
StaticEmbedding built once under the work directory). It is a cheap stand-in that makes the
other passes measurable at a million documents on a CPU; its embedding pass measures
tokenisation and a table lookup, not a transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

STATIC_EMBEDDER = "minilm-static"
QUICK_SIZES = [300, 1000]


def peak_rss_mb() -> float:
    """VmHWM of this process: its peak resident memory since start or the last reset."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def reset_peak_rss() -> None:
    # Linux resets VmHWM to the current RSS on "5" (proc(5), clear_refs).
    Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def perturbed(text: str, rng: random.Random) -> str:
    """A near copy: about 5 % of the words dropped, one window of up to 8 words shuffled."""
    words = [word for word in text.split() if rng.random() >= 0.05] or text.split()[:1]
    start = rng.randrange(len(words))
    window = words[start : start + 8]
    rng.shuffle(window)
    words[start : start + 8] = window
    return " ".join(words)


def ensure_pool(work_dir: Path, documents: int, data_dir: str | None, seed: int) -> Path:
    """A pool file of at least ``documents`` lines, built once; smaller sizes read a prefix."""
    from forgetless.io import atomic_file
    from forgetless.mix.config import MixConfig
    from forgetless.mix.corpus import load_corpus

    built = sorted(work_dir.glob("pool-*.jsonl"), key=lambda path: int(path.stem[5:]))
    for path in built:
        if int(path.stem[5:]) >= documents:
            return path
    sources = MixConfig().sources
    texts = load_corpus(sources, None, data_dir).texts
    path = work_dir / f"pool-{documents}.jsonl"
    print(f"building {path}: {documents:,} documents from {len(texts):,} of {sources}", flush=True)
    with atomic_file(path) as out:
        for row in range(documents):
            text = texts[row % len(texts)]
            if row >= len(texts):
                text = perturbed(text, random.Random(f"{seed}/{row}"))
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def resolve_embedder(name: str, work_dir: Path) -> str:
    if name != STATIC_EMBEDDER:
        return name
    target = work_dir / "embedders" / STATIC_EMBEDDER
    if not target.is_dir():
        build_static_embedder(target)
    return str(target)


def build_static_embedder(target: Path) -> None:
    """MiniLM's input token embeddings, mean-pooled and normalised, as a sentence-transformers
    model: no transformer layers, so it embeds thousands of documents a second on a CPU."""
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    from forgetless.embeddings import resolve_embedder as packaged
    from forgetless.io import atomic_directory

    source = Path(packaged("all-MiniLM-L6-v2"))
    with safe_open(source / "model.safetensors", "np") as weights:
        table = weights.get_tensor("embeddings.word_embeddings.weight")
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    model = SentenceTransformer(
        modules=[StaticEmbedding(tokenizer, embedding_weights=table), Normalize()], device="cpu"
    )
    with atomic_directory(target) as staging:
        model.save(str(staging))


def embedded_rows(directory: Path, documents: int, embedder: str, shard_size: int) -> int:
    """Rows an earlier, interrupted run of this size already embedded (from the manifest)."""
    manifest_file = directory / "manifest.json"
    if not manifest_file.is_file():
        return 0
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("count") != documents or manifest.get("identity") != {"embedder": embedder}:
        return 0
    return min(documents, manifest["done_shards"] * shard_size)


def run_size(args, documents: int) -> dict:
    """Every pass over the first ``documents`` documents of the pool, measured one by one."""
    import shutil

    # Imported before the clock starts: loading libraries is not a pass.
    import faiss  # noqa: F401
    import sentence_transformers  # noqa: F401

    from forgetless.mix.cluster import (
        assign_and_count,
        dropped_documents,
        prune_and_merge,
        train_centroids,
    )
    from forgetless.mix.config import ClusterConfig, EmbedConfig, QualityConfig
    from forgetless.mix.corpus import TextFile
    from forgetless.mix.embed import embed_documents
    from forgetless.mix.quality import score_documents

    started_rss = peak_rss_mb()
    texts = TextFile(args.pool, limit=documents)
    if len(texts) < documents:
        raise SystemExit(f"{args.pool} holds {len(texts)} documents, fewer than {documents}")
    embed = EmbedConfig(
        embedder=args.embedder, batch_size=args.batch_size, shard_size=args.shard_size
    )
    quality = QualityConfig()
    cluster = ClusterConfig(
        clusters=args.clusters, kmeans_points_per_centroid=args.points_per_centroid
    )
    directory = args.work_dir / "embeddings" / args.embedder_slug / args.engine / str(documents)
    if args.reembed and directory.exists():
        shutil.rmtree(directory)
    already = embedded_rows(directory, documents, args.embedder, args.shard_size)
    passes, state = [], {}

    def measure(name: str, work: int, step) -> None:
        reset_peak_rss()
        wall, cpu = time.perf_counter(), cpu_seconds()
        step()
        passes.append(
            {
                "pass": name,
                "documents": work,
                "wall_s": time.perf_counter() - wall,
                "cpu_s": cpu_seconds() - cpu,
                "peak_rss_mb": peak_rss_mb(),
            }
        )

    def embed_pass():
        state["vectors"] = embed_documents(
            texts, documents, embed, directory, engine=args.engine, device="cpu", progress=False
        )

    def quality_pass():
        scorers = sorted(set(quality.thresholds) | set(quality.document_thresholds))
        state["scores"] = score_documents(texts, scorers, None, None, progress=False)

    def kmeans_pass():
        state["centroids"] = train_centroids(
            state["vectors"],
            args.clusters,
            cluster.kmeans_iterations,
            args.seed,
            args.points_per_centroid,
        )

    def assign_pass():
        dropped = dropped_documents(documents, state["scores"], quality.document_thresholds)
        state["assignment"], state["statistics"] = assign_and_count(
            state["vectors"], state["centroids"], state["scores"], dropped, args.engine
        )

    def merge_pass():
        state["kept"], state["super_of_cluster"] = prune_and_merge(
            state["centroids"],
            state["statistics"],
            cluster,
            quality.thresholds,
            quality.document_thresholds,
        )

    measure("embed", documents - already, embed_pass)
    measure("quality", documents, quality_pass)
    sample = min(documents, args.points_per_centroid * args.clusters)
    measure("k-means", sample, kmeans_pass)
    measure("assign", documents, assign_pass)
    measure("prune+merge", args.clusters, merge_pass)
    return {
        "documents": documents,
        "embedder": args.embedder_name,
        "engine": args.engine,
        "clusters": args.clusters,
        "kmeans_sample": sample,
        "kept_clusters": int(state["kept"].sum()),
        "super_clusters": int(state["super_of_cluster"].max()) + 1,
        "resumed_rows": already,
        "startup_rss_mb": started_rss,
        "peak_rss_mb": max([started_rss] + [step["peak_rss_mb"] for step in passes]),
        "passes": passes,
    }


def run_child(args, documents: int) -> dict:
    command = [sys.executable, __file__, "--child", str(documents), *args.forwarded]
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"the {documents:,}-document run failed (exit {finished.returncode})")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def print_size(result: dict) -> None:
    print(
        f"\n{result['documents']:,} documents ({result['embedder']}, engine {result['engine']}; "
        f"k = {result['clusters']}, k-means on {result['kmeans_sample']:,} rows; "
        f"{result['kept_clusters']} clusters kept, {result['super_clusters']} super-clusters)"
    )
    print(f"  after imports: {result['startup_rss_mb']:.0f} MB resident")
    if result["resumed_rows"]:
        print(f"  embedding resumed: {result['resumed_rows']:,} rows were embedded earlier")
    print(
        f"  {'pass':<12} {'items':>10} {'wall s':>9} {'CPU s':>9} {'items/s wall':>13} "
        f"{'items/s CPU':>12} {'peak RSS MB':>12}"
    )
    for step in result["passes"]:
        print(
            f"  {step['pass']:<12} {step['documents']:>10,} {step['wall_s']:>9.1f} "
            f"{step['cpu_s']:>9.1f} {rate(step['documents'], step['wall_s']):>13} "
            f"{rate(step['documents'], step['cpu_s']):>12} {step['peak_rss_mb']:>12.0f}"
        )
    wall, cpu = totals(result)
    print(
        f"  {'total':<12} {result['documents']:>10,} {wall:>9.1f} {cpu:>9.1f} "
        f"{rate(result['documents'], wall):>13} {rate(result['documents'], cpu):>12} "
        f"{result['peak_rss_mb']:>12.0f}"
    )


def rate(items: int, seconds: float) -> str:
    return f"{items / seconds:,.0f}" if items and seconds > 0 else "-"


def totals(result: dict) -> tuple[float, float]:
    return (
        sum(step["wall_s"] for step in result["passes"]),
        sum(step["cpu_s"] for step in result["passes"]),
    )


def print_growth(results: list[dict]) -> None:
    """Time per document and peak RSS, each size against the one before it."""
    print("\nGrowth (each size against the previous one; 1.0 = constant per document)")
    print(
        f"  {'documents':>10} {'µs/doc wall':>12} {'µs/doc CPU':>11} {'peak RSS MB':>12} "
        f"{'x time/doc wall':>16} {'x time/doc CPU':>15} {'x peak RSS':>11}"
    )
    previous = None
    for result in results:
        wall, cpu = totals(result)
        row = (1e6 * wall / result["documents"], 1e6 * cpu / result["documents"])
        ratios = ["", "", ""]
        if previous is not None:
            ratios = [
                f"{row[0] / previous[0]:.2f}",
                f"{row[1] / previous[1]:.2f}",
                f"{result['peak_rss_mb'] / previous[2]:.2f}",
            ]
        print(
            f"  {result['documents']:>10,} {row[0]:>12.0f} {row[1]:>11.0f} "
            f"{result['peak_rss_mb']:>12.0f} {ratios[0]:>16} {ratios[1]:>15} {ratios[2]:>11}"
        )
        previous = (*row, result["peak_rss_mb"])
    if any(result["resumed_rows"] for result in results):
        print("  (a resumed embedding pass counts only the rows embedded in this run)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--documents",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="Pool sizes, each run in a child process of its own.",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/forgetless_mix_scale"))
    parser.add_argument("--data-dir", default=None, help="[default: $FORGETLESS_DATA_DIR]")
    parser.add_argument(
        "--embedder",
        default="all-MiniLM-L6-v2",
        help=f"Any embedder forgetless accepts, or {STATIC_EMBEDDER} (see above).",
    )
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument(
        "--clusters", type=int, default=1000, help="k, fixed across sizes (CLIMB's 1000)."
    )
    parser.add_argument("--points-per-centroid", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reembed", action="store_true", help="Embed each size again instead of resuming."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"Sizes {QUICK_SIZES}, k = 10, the {STATIC_EMBEDDER} embedder: a smoke test.",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.documents, args.clusters, args.embedder = QUICK_SIZES, 10, STATIC_EMBEDDER
    args.embedder_name = args.embedder
    args.embedder_slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(args.embedder).name)
    args.work_dir = args.work_dir.resolve()
    # What a child needs to repeat the parent's settings.
    args.forwarded = [
        "--work-dir",
        str(args.work_dir),
        "--embedder",
        args.embedder,
        "--engine",
        args.engine,
        "--clusters",
        str(args.clusters),
        "--points-per-centroid",
        str(args.points_per_centroid),
        "--batch-size",
        str(args.batch_size),
        "--shard-size",
        str(args.shard_size),
        "--seed",
        str(args.seed),
        *(["--reembed"] if args.reembed else []),
        *(["--data-dir", args.data_dir] if args.data_dir else []),
    ]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        args.pool = ensure_pool(args.work_dir, args.child, args.data_dir, args.seed)
        args.embedder = resolve_embedder(args.embedder, args.work_dir)
        print(json.dumps(run_size(args, args.child)), flush=True)
        return
    ensure_pool(args.work_dir, max(args.documents), args.data_dir, args.seed)
    resolve_embedder(args.embedder, args.work_dir)
    print(
        f"work directory {args.work_dir}; {os.cpu_count()} CPUs; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        flush=True,
    )
    results = []
    for documents in sorted(args.documents):
        results.append(run_child(args, documents))
        print_size(results[-1])
        save_results(args, results[-1])
    print_growth(results)


def save_results(args, result: dict) -> None:
    """Merge into ``results/<embedder>-<engine>.json`` of the work directory, by size."""
    from forgetless.io import write_json_atomic

    path = args.work_dir / "results" / f"{args.embedder_slug}-{args.engine}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[str(result["documents"])] = result
    write_json_atomic(path, saved)


if __name__ == "__main__":
    main()
