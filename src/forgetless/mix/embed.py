"""Document embeddings, batched and cached per shard (resumable)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from forgetless.mix.config import EmbedConfig
from forgetless.shards import ShardedRows, load_sharded_matrix


def embed_documents(
    texts: Sequence[str],
    ids: Sequence[str] | int,
    config: EmbedConfig,
    directory: str | Path,
    *,
    engine: str = "local",
    device=None,
    progress=True,
) -> np.ndarray:
    """L2-normalised embeddings of ``texts`` (memory-mapped float32 rows). ``texts`` is read
    one shard at a time (a list, or a ``TextFile`` streamed from disk); ``ids`` are the
    documents' ids, or their count when rows are identified by number."""
    from forgetless.embeddings import embed_texts, embedding_dimension, load_embedder

    embedder = load_embedder(config.embedder, device=device)
    store = ShardedRows(
        directory,
        ids,
        identity={"embedder": config.embedder},
        shard_size=config.shard_size,
        width=embedding_dimension(embedder),
        dtype=np.float32,
        columns={},
    )
    bar = tqdm(total=len(texts), desc="embeddings", unit="doc", disable=not progress)
    bar.update(store.done)
    pending = store.pending()
    if engine == "ray":
        if pending:
            _embed_with_ray(texts, config, store, pending, device, bar)
    else:
        for shard, start, stop in pending:
            store.matrix[start:stop] = embed_texts(
                embedder, texts[start:stop], config.batch_size, progress=False
            )
            store.commit(shard)
            bar.update(stop - start)
    bar.close()
    del store
    return load_embeddings(directory)


def load_embeddings(directory: str | Path) -> np.ndarray:
    return load_sharded_matrix(directory)


def _embed_with_ray(texts, config, store, pending, device, bar) -> None:
    """One Ray pass over every pending row; each shard is committed once all its rows are in,
    so an interrupted run still resumes at a shard boundary."""
    from forgetless.mix.engine import ray_embed_batches

    first = pending[0][1]
    shards = iter(pending)
    shard, start, stop = next(shards)
    filled = first
    batches = ray_embed_batches(texts, first, config.embedder, config.batch_size, device)
    for row, vectors in batches:
        store.matrix[row : row + len(vectors)] = vectors
        filled = row + len(vectors)
        bar.update(len(vectors))
        while shard is not None and filled >= stop:
            store.commit(shard)
            shard, start, stop = next(shards, (None, 0, 0))
