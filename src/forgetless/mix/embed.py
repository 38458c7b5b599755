"""Document embeddings, batched and cached per shard (resumable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from forgetless.config import MixConfig
from forgetless.mix.corpus import Corpus
from forgetless.shards import ShardedRows, load_sharded_rows


def embed_corpus(
    corpus: Corpus, config: MixConfig, directory: str | Path, *, device=None, progress=True
) -> np.ndarray:
    """L2-normalised embeddings of every document (memory-mapped float32 rows)."""
    from forgetless.embeddings import embed_texts, embedding_dimension, load_embedder

    embedder = load_embedder(config.embedder, device=device)
    store = ShardedRows(
        directory,
        corpus.ids,
        identity={"embedder": config.embedder},
        shard_size=config.shard_size,
        width=embedding_dimension(embedder),
        dtype=np.float32,
        columns={},
    )
    bar = tqdm(total=len(corpus), desc="embeddings", unit="doc", disable=not progress)
    bar.update(store.done)
    for shard, start, stop in store.pending():
        store.matrix[start:stop] = embed_texts(
            embedder, corpus.texts[start:stop], config.embed_batch_size, progress=False
        )
        store.commit(shard)
        bar.update(stop - start)
    bar.close()
    del store
    return load_embeddings(directory)


def load_embeddings(directory: str | Path) -> np.ndarray:
    return load_sharded_rows(directory)[1]
