"""Proxy runs: train a small LM on text sampled from a mixture, score it on the targets.

Any callable ``(weights, workdir) -> {"objective": float, ...}`` can replace
:class:`LanguageModelProxy`; the search only needs the objective (lower is better).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from forgetless.mix.config import SearchConfig
from forgetless.mix.corpus import Corpus
from forgetless.mix.sampler import sample_mixture

ProxyRunner = Callable[[np.ndarray, Path], dict[str, float]]


def load_target_texts(search: SearchConfig, data_dir: str | None) -> dict[str, list[str]]:
    """The text of every target task (perplexity tasks), ``target_limit`` documents each."""
    from forgetless.errors import ForgetlessError
    from forgetless.evaluate.config import EvalConfig
    from forgetless.evaluate.tasks import load_tasks

    evaluate = EvalConfig(limit=search.target_limit)
    loaded = load_tasks(list(search.targets), evaluate, data_dir=data_dir)
    texts = {}
    for name, (spec, records) in loaded.items():
        if spec.kind != "perplexity":
            raise ForgetlessError(f"mix target {name!r} must be a perplexity task (ppl:...)")
        texts[name] = [record.text for record in records]
    return texts


class LanguageModelProxy:
    """The default proxy: a small causal LM trained on ``proxy_tokens`` of the mixture."""

    def __init__(
        self,
        search: SearchConfig,
        seed: int,
        repetition_cap: float,
        corpus: Corpus,
        groups: np.ndarray,
        *,
        device: str = "auto",
        data_dir: str | None = None,
        progress: bool = False,
    ):
        from forgetless.models import load_tokenizer

        self.search, self.seed, self.repetition_cap = search, seed, repetition_cap
        self.corpus, self.groups, self.device, self.progress = corpus, groups, device, progress
        self.tokenizer = load_tokenizer(search.proxy_model)
        lengths = self.tokenizer(corpus.texts, add_special_tokens=False)["input_ids"]
        self.document_tokens = np.array([len(ids) + 1 for ids in lengths], dtype=np.float64)
        self.targets = load_target_texts(search, data_dir)

    def cluster_tokens(self) -> np.ndarray:
        count = int(self.groups.max()) + 1
        kept = self.groups >= 0
        return np.bincount(self.groups[kept], weights=self.document_tokens[kept], minlength=count)

    def _model(self):
        from forgetless.models import load_model

        mix = self.search
        loaded = load_model(mix.proxy_model, dtype="float32", device=self.device)
        if mix.proxy == "scratch":
            fork_devices: list = []
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(self.seed)
                fresh = type(loaded.model)(loaded.model.config)
            loaded.model = fresh.to(next(loaded.model.parameters()).device)
        return loaded

    def __call__(self, weights: np.ndarray, workdir: Path) -> dict[str, float]:
        from forgetless.data.records import TextRecord
        from forgetless.evaluate.perplexity import perplexity
        from forgetless.train.sft import train_model

        mix = self.search
        sample = sample_mixture(
            self.document_tokens,
            self.groups,
            weights,
            mix.proxy_tokens,
            repetition_cap=self.repetition_cap,
            seed=self.seed,
        )
        records = [TextRecord(text=self.corpus.texts[i]) for i in sample.documents]
        steps = max(1, math.ceil(mix.proxy_tokens / (mix.proxy_batch_size * mix.proxy_max_length)))
        from forgetless.train.config import TrainConfig

        train = TrainConfig(
            method="full",
            learning_rate=mix.proxy_learning_rate,
            max_steps=steps,
            batch_size=mix.proxy_batch_size,
            max_length=mix.proxy_max_length,
            lr_scheduler="cosine",
            warmup_steps=max(1, steps // 20),
            seed=self.seed,
            save_steps=max(1, steps),
        )
        loaded = self._model()
        model, _ = train_model(
            loaded.model, loaded.tokenizer, records, train, workdir, progress=self.progress
        )
        # The proxy's weights are not needed once scored; only its metrics are kept.
        shutil.rmtree(workdir / "model", ignore_errors=True)
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        model.eval()
        metrics: dict[str, float] = {}
        for task, texts in self.targets.items():
            result = perplexity(
                model,
                loaded.tokenizer,
                texts,
                max_length=mix.proxy_max_length,
                batch_size=mix.proxy_batch_size,
                progress=False,
            )
            metrics[task] = math.log(result.perplexity)
        total = sum(mix.targets.values())
        metrics["objective"] = sum(mix.targets[t] * metrics[t] for t in self.targets) / total
        metrics["train_tokens"] = float(sample.tokens_per_cluster.sum())
        return metrics
