"""Proxy runs: train a small LM on text sampled from a mixture, score it on the targets.

Any callable ``(weights, workdir) -> {"objective": float, ...}`` can replace
:class:`LanguageModelProxy`; the search only needs the objective (lower is better), plus the
loss on each constrained task when ``mix.search.constraints`` is set, and a ``seed=`` keyword
(the proxy seed) when ``mix.search.noise_runs`` is.
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
    """The text of every target and constrained task (perplexity tasks), ``target_limit``
    documents each."""
    from forgetless.errors import ForgetlessError
    from forgetless.evaluate.config import EvalConfig
    from forgetless.evaluate.tasks import load_tasks

    evaluate = EvalConfig(limit=search.target_limit)
    names = list(dict.fromkeys([*search.targets, *search.constraints]))
    loaded = load_tasks(names, evaluate, data_dir=data_dir)
    texts = {}
    for name, (spec, records) in loaded.items():
        if spec.kind != "perplexity":
            role = "target" if name in search.targets else "constraint"
            raise ForgetlessError(f"mix {role} {name!r} must be a perplexity task (ppl:...)")
        texts[name] = [record.text for record in records]
    return texts


def truncate_layers(model, layers: int, name: str) -> None:
    """Keep the first ``layers`` transformer blocks of a decoder-only model, in place.

    transformers has no generic layer-dropping helper; every Llama-like model keeps its
    blocks in ``model.model.layers`` and their count in ``config.num_hidden_layers``.
    """
    from forgetless.errors import ForgetlessError

    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ForgetlessError(
            f"mix.search.proxy_layers: {name} has no model.layers to truncate; unset it"
        )
    if layers > len(blocks):
        raise ForgetlessError(
            f"mix.search.proxy_layers={layers} but {name} has {len(blocks)} blocks"
        )
    model.model.layers = blocks[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]


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

    def _model(self, seed: int):
        from forgetless.models import load_model

        mix = self.search
        loaded = load_model(mix.proxy_model, dtype="float32", device=self.device)
        if mix.proxy_layers is not None:
            truncate_layers(loaded.model, mix.proxy_layers, mix.proxy_model)
        if mix.proxy == "scratch":
            fork_devices: list = []
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(seed)
                fresh = type(loaded.model)(loaded.model.config)
            loaded.model = fresh.to(next(loaded.model.parameters()).device)
        return loaded

    def __call__(
        self, weights: np.ndarray, workdir: Path, seed: int | None = None
    ) -> dict[str, float]:
        """Train and score a proxy on ``weights``; ``seed`` (default: the search's) sets the
        proxy's initialisation, the documents drawn and their order."""
        from forgetless.data.records import TextRecord
        from forgetless.evaluate.perplexity import perplexity
        from forgetless.train.sft import train_model

        mix = self.search
        seed = self.seed if seed is None else seed
        sample = sample_mixture(
            self.document_tokens,
            self.groups,
            weights,
            mix.proxy_tokens,
            repetition_cap=self.repetition_cap,
            seed=seed,
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
            seed=seed,
            save_steps=max(1, steps),
        )
        loaded = self._model(seed)
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
        metrics["objective"] = sum(mix.targets[t] * metrics[t] for t in mix.targets) / total
        metrics["train_tokens"] = float(sample.tokens_per_cluster.sum())
        return metrics
