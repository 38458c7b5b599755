"""Full and LoRA fine-tuning through the Hugging Face Trainer.

Going through ``transformers.Trainer`` (rather than a hand-written loop) is what makes
``accelerate launch``, DDP, FSDP and DeepSpeed work unchanged, and gives checkpointing,
resuming, logging and the progress bar for free. forgetless only prepares the features and
writes a plain, loadable checkpoint at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from forgetless.data.features import IGNORE_INDEX, build_training_features
from forgetless.data.records import Record
from forgetless.errors import ForgetlessError
from forgetless.io import save_model, write_json_atomic
from forgetless.registry import lookup
from forgetless.resources import track_peak_memory
from forgetless.train import methods as _methods  # noqa: F401  (registers the methods)
from forgetless.train.config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"


@dataclass
class TrainResult:
    model_dir: str
    method: str
    steps: int
    train_loss: float
    train_runtime_s: float
    input_tokens_seen: int
    # Passes over the training data: a small selection trained for a fixed step budget is
    # repeated, and how often matters to any comparison between data sets.
    epochs: float
    resumed_from: str | None
    # The whole call, set-up included (OSFT's SVDs, LoRA wrapping), and its peak memory.
    seconds: float
    peak_memory_mb: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def train_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    progress: bool = True,
    calibration_records: Sequence[Record] | None = None,
    data_dir: str | None = None,
) -> tuple[PreTrainedModel, TrainResult]:
    """Fine-tune ``model`` on ``records``; resumes from the last checkpoint in ``output_dir``.

    Returns the trained model (LoRA adapters merged in) and a summary. The final weights are
    written to ``output_dir/model`` as a plain Hugging Face checkpoint (safetensors).

    For OSFT, ``model`` must hold the weights training *starts* from (also when resuming):
    the frozen subspaces come from them. Adaptive ranks are calibrated on
    ``calibration_records`` (the prior data), by default ``config.osft.calibration_data``
    read from ``data_dir``.
    """
    device_type = next(model.parameters()).device.type
    with track_peak_memory(device_type) as peak:
        started = time.perf_counter()
        model, result = _train(
            model, tokenizer, records, config, Path(output_dir), callbacks, progress,
            calibration_records, data_dir,
        )  # fmt: skip
    result.seconds = time.perf_counter() - started
    result.peak_memory_mb = peak.mb
    return model, result


def _train(
    model, tokenizer, records, config, output, callbacks, progress, calibration_records, data_dir
) -> tuple[PreTrainedModel, TrainResult]:
    method = lookup("train", config.method).implementation
    set_seed(config.seed)
    features = build_training_features(tokenizer, records, config.max_length)
    model = method.prepare(model, config)
    # Built first: it starts the process group under torchrun / accelerate launch, which OSFT
    # needs to give every process the same subspaces.
    args = _training_arguments(model, config, output / CHECKPOINTS_DIR, progress)
    callbacks = [
        *callbacks,
        *method.callbacks(
            model,
            tokenizer,
            config,
            output,
            main_process=args.process_index == 0,
            calibration_records=calibration_records,
            data_dir=data_dir,
            progress=progress,
        ),
    ]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=DataCollatorForSeq2Seq(
            tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
        ),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    resume = _last_checkpoint(output / CHECKPOINTS_DIR)
    _check_same_run(output / CHECKPOINTS_DIR, config, len(features), resuming=resume is not None)
    if resume:
        logger.info("resuming from %s", resume)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - started

    main_process = trainer.is_world_process_zero()
    model = method.finish(trainer.model, output, main_process=main_process)
    if main_process:
        save_model(model, tokenizer, output / MODEL_DIR)
    result = TrainResult(
        model_dir=str(output / MODEL_DIR),
        method=config.method,
        steps=outcome.global_step,
        train_loss=float(outcome.training_loss),
        train_runtime_s=runtime,
        input_tokens_seen=int(trainer.state.num_input_tokens_seen),
        epochs=float(trainer.state.epoch or 0.0),
        resumed_from=resume,
        seconds=runtime,
        peak_memory_mb=None,
    )
    return model, result


def _training_arguments(
    model: PreTrainedModel, config: TrainConfig, checkpoints: Path, progress: bool
) -> TrainingArguments:
    on_cuda = next(model.parameters()).device.type == "cuda"
    # fp32 master weights with bf16 autocast where the GPU supports it; exact fp32 elsewhere.
    mixed_bf16 = on_cuda and torch.cuda.is_bf16_supported() and model.dtype == torch.float32
    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        num_train_epochs=config.num_epochs,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to=[],
        include_num_input_tokens_seen=True,
        bf16=mixed_bf16,
        use_cpu=not on_cuda and not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )


RUN_RECORD = "forgetless_train.json"


def _check_same_run(checkpoints: Path, config: TrainConfig, n_features: int, resuming: bool):
    """Refuse to resume checkpoints written with other settings or data.

    The Trainer would silently continue from them (e.g. past a smaller max_steps), so a reused
    output directory must hold the same run.
    """
    record = {"train": config.model_dump(mode="json"), "training_sequences": n_features}
    record_file = checkpoints / RUN_RECORD
    if resuming and record_file.is_file():
        previous = json.loads(record_file.read_text())
        if previous != record:
            changed = sorted(
                key
                for key in {**previous["train"], **record["train"]}
                if previous["train"].get(key) != record["train"].get(key)
            )
            if previous["training_sequences"] != n_features:
                changed.append("data")
            raise ForgetlessError(
                f"{checkpoints.parent} holds checkpoints of a different run (changed: "
                f"{', '.join(changed)}); use another output directory or delete it"
            )
    write_json_atomic(record_file, record)


def _last_checkpoint(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    last = get_last_checkpoint(str(folder))
    if last is None:
        return None
    # A checkpoint killed mid-write lacks its trainer state; skip it rather than crash.
    if not (Path(last) / "trainer_state.json").is_file():
        logger.warning("ignoring incomplete checkpoint %s", last)
        return None
    return last
