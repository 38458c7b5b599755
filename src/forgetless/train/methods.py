"""The training methods: what each does to the model around the Hugging Face Trainer.

A method is a :class:`TrainMethod` registered under the ``train`` family. ``train_model``
calls its hooks in order: ``prepare`` before the Trainer's arguments exist (wrap the model,
e.g. in a PEFT adapter), ``callbacks`` once they do (the process group is up, so every
process can agree on what it computes), and ``finish`` on the trained model (e.g. merge an
adapter). Heavy imports stay inside the hooks so that validating a config stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetless.registry import Method, register
from forgetless.train.config import TrainConfig

ADAPTER_DIR = "adapter"
OSFT_RANKS = "osft_ranks.json"


class TrainMethod:
    """Full fine-tuning: the model trains as it is."""

    def prepare(self, model, config: TrainConfig):
        return model

    def callbacks(
        self,
        model,
        tokenizer,
        config: TrainConfig,
        output: Path,
        *,
        main_process: bool,
        calibration_records: Sequence | None,
        data_dir: str | None,
        progress: bool,
    ) -> list[Any]:
        return []

    def finish(self, model, output: Path, *, main_process: bool):
        return model

    def trained_gradients(self, config: TrainConfig) -> dict[str, Any]:
        """The select.gradient settings whose per-sample gradients are those this method
        trains (``select.gradient.parameters=target``): every matrix of every block."""
        return {"parameters": "blocks"}


class LoraMethod(TrainMethod):
    """A PEFT LoRA adapter; merged into the weights at the end (the adapter is kept too)."""

    def trained_gradients(self, config: TrainConfig) -> dict[str, Any]:
        lora = config.lora
        return {
            "parameters": "lora",
            "lora_r": lora.r,
            "lora_alpha": lora.alpha,
            "lora_target_modules": lora.target_modules,
        }

    def prepare(self, model, config: TrainConfig):
        from peft import LoraConfig, get_peft_model

        from forgetless.errors import ForgetlessError

        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as error:  # PEFT's error when no module matches the targets
            raise ForgetlessError(
                f"train.lora.target_modules: {str(error).splitlines()[0]}"
            ) from None

    def finish(self, model, output: Path, *, main_process: bool):
        if main_process:
            model.save_pretrained(output / ADAPTER_DIR)
        return model.merge_and_unload()


class OsftMethod(TrainMethod):
    """Full fine-tuning projected, after every optimizer step, out of each matrix's top
    singular subspace (adaptive ranks calibrated on the prior data)."""

    def callbacks(
        self,
        model,
        tokenizer,
        config: TrainConfig,
        output: Path,
        *,
        main_process: bool,
        calibration_records: Sequence | None,
        data_dir: str | None,
        progress: bool,
    ) -> list[Any]:
        from forgetless.io import write_text_atomic
        from forgetless.train.osft import OsftCallback, calibration_batches, refuse_sharded_launch

        refuse_sharded_launch()  # before the SVDs, let alone a step
        calibration = None
        if config.osft.rank_policy == "adaptive":
            if calibration_records is None:
                from forgetless.data import load_records

                calibration_records = load_records(
                    config.osft.calibration_data,
                    data_dir=data_dir,
                    limit=config.osft.calibration_samples,
                )
            calibration = calibration_batches(
                tokenizer,
                calibration_records,
                config.max_length,
                config.osft.calibration_samples,
                config.seed,
            )
        callback = OsftCallback(model, config.osft, calibration, verbose=progress)
        if main_process:
            write_text_atomic(output / OSFT_RANKS, json.dumps(callback.ranks, indent=2))
        return [callback]


def _register(name: str, summary: str, method: TrainMethod, settings: str | None) -> None:
    register(
        Method(
            "train",
            name,
            summary,
            consumes="records",
            produces="model",
            settings=settings,
            implementation=method,
        )
    )


_register("full", "full fine-tuning of every weight", TrainMethod(), None)
_register(
    "lora", "a LoRA adapter (PEFT), merged into the weights at the end", LoraMethod(), "train.lora"
)
_register(
    "osft",
    "full fine-tuning kept orthogonal to each matrix's top singular subspace (adaptive "
    "rank per layer; Sculpting Subspaces)",
    OsftMethod(),
    "train.osft",
)
