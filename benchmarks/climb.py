"""Speed of the CLIMB clustering stage: embedding and k-means.

* Embedding throughput of forgetless' path (``forgetless.mix.embed.embed_documents``: sharded,
  cached, resumable) against a raw ``SentenceTransformer.encode`` of the same texts with the
  same batch size, in one run. Target: >= 0.9x raw.
* Spherical k-means (faiss) of 100k x 384 points into 1000 clusters. Target: <= 30 s on 2
  CPU cores.

    python benchmarks/climb.py --data-dir ../shared/data
    python benchmarks/climb.py --documents 500 --points 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time


def pool_texts(args) -> list[str]:
    from forgetless.config import load_config
    from forgetless.mix.corpus import load_corpus

    config = load_config(None, {"data_dir": args.data_dir})
    texts = load_corpus(config.mix.sources, config.mix.limit_per_source, config.data_dir).texts
    return (texts * (args.documents // len(texts) + 1))[: args.documents]


def embedding_ratio(args) -> tuple[float, float]:
    from forgetless.embeddings import load_embedder
    from forgetless.mix.config import EmbedConfig
    from forgetless.mix.embed import embed_documents

    texts = pool_texts(args)
    config = EmbedConfig(batch_size=args.batch_size, shard_size=args.shard_size)
    embedder = load_embedder(config.embedder, device="cpu")
    embedder.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    started = time.perf_counter()
    embedder.encode(
        texts, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False
    )
    raw = time.perf_counter() - started
    ids = [str(i) for i in range(len(texts))]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        embed_documents(texts, ids, config, folder, device="cpu", progress=False)
        ours = time.perf_counter() - started
    return len(texts) / raw, len(texts) / ours


def kmeans_seconds(points: int, dim: int, clusters: int) -> float:
    import numpy as np

    from forgetless.mix.cluster import spherical_kmeans

    rng = np.random.default_rng(0)
    data = rng.normal(size=(points, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    started = time.perf_counter()
    spherical_kmeans(data, clusters, iterations=25, seed=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import torch

    raw, ours = embedding_ratio(args)
    threads = torch.get_num_threads()
    print(f"{args.documents} pool documents, batch {args.batch_size}, {threads} threads")
    print(f"raw SentenceTransformer.encode: {raw:8.1f} docs/s")
    ratio = ours / raw
    print(f"forgetless embed_documents:     {ours:8.1f} docs/s  ({ratio:.2f}x raw; target >= 0.9x)")
    seconds = kmeans_seconds(args.points, 384, args.clusters)
    print(
        f"spherical k-means, {args.points:,} x 384 into {args.clusters} clusters, 25 iterations: "
        f"{seconds:.1f} s (target <= 30 s)"
    )


if __name__ == "__main__":
    main()
