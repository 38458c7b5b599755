"""Full and LoRA fine-tuning through the Hugging Face Trainer.

Going through ``transformers.Trainer`` (rather than a hand-written loop) is what makes
``accelerate launch``, DDP, FSDP and DeepSpeed work unchanged, and gives checkpointing,
resuming, logging and the progress bar for free. forgetless only prepares the features and
writes a plain, loadable checkpoint at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from forgetless.cards import CardContent, Provenance, write_card
from forgetless.data.features import IGNORE_INDEX, build_training_features
from forgetless.data.records import Record, record_row
from forgetless.errors import ForgetlessError
from forgetless.io import atomic_directory, write_json_atomic
from forgetless.registry import lookup
from forgetless.resources import track_peak_memory
from forgetless.schema import identity_dump
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
    # The whole run, set-up included (OSFT's SVDs, LoRA wrapping) and any part before an
    # interruption, and the peak memory of this call.
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
    provenance: Provenance | None = None,
) -> tuple[PreTrainedModel, TrainResult]:
    """Fine-tune ``model`` on ``records``; resumes from the last checkpoint in ``output_dir``.

    Returns the trained model (LoRA adapters merged in) and a summary. The final weights are
    written to ``output_dir/model`` as a plain Hugging Face checkpoint (safetensors) with a
    model card (README.md) naming the base model and data as ``provenance`` gives them.

    ``output_dir`` records what the run is (settings, starting weights, data): a finished run
    called again returns its model and summary without training, and a different run there is
    an error. After an interruption the summary still covers the whole run.

    For OSFT, ``model`` must hold the weights training *starts* from (also when resuming):
    the frozen subspaces come from them. Adaptive ranks are calibrated on
    ``calibration_records`` (the prior data), by default ``config.osft.calibration_data``
    read from ``data_dir``.
    """
    config.check_trackers_installed()
    output = Path(output_dir)
    identity = run_identity(model, records, config)
    finished = _finished_run(output, identity)
    if finished is not None:
        trained = AutoModelForCausalLM.from_pretrained(output / MODEL_DIR, dtype=model.dtype)
        return trained.to(next(model.parameters()).device), finished
    device_type = next(model.parameters()).device.type
    with track_peak_memory(device_type) as peak:
        started = time.perf_counter()
        model, result = _train(
            model, tokenizer, records, config, output, callbacks, progress,
            calibration_records, data_dir, identity,
        )  # fmt: skip
    result.seconds += time.perf_counter() - started
    result.peak_memory_mb = peak.mb
    if _main_process():
        # Saved once the summary is complete, so the card's compute is the run record's; the
        # run counts as finished only once its record is written after.
        provenance = provenance or Provenance(model.name_or_path or "a model given in memory")
        card = _card(provenance, identity, config, result, next(model.parameters()).device)
        with atomic_directory(output / MODEL_DIR) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            write_card(staging, card)
        write_json_atomic(output / RUN_RECORD, {"identity": identity, "result": result.to_dict()})
    return model, result


# Checkpointing and logging cadence: they leave the trained weights as they are.
_BOOKKEEPING = ("save_steps", "save_total_limit", "logging_steps")


def _card(
    provenance: Provenance,
    identity: dict,
    config: TrainConfig,
    result: TrainResult,
    device: torch.device,
) -> CardContent:
    method = lookup("train", config.method)
    dumped = identity["train"]
    settings = {
        key: value
        for key, value in dumped.items()
        if not isinstance(value, dict) and key not in _BOOKKEEPING
    }
    if method.settings is not None:  # e.g. train.lora: the method's own section, and no other
        section = dumped
        for part in method.settings.split(".")[1:]:
            section = section[part]
        prefix = method.settings.split(".", 1)[1]
        settings.update({f"{prefix}.{key}": value for key, value in section.items()})
    if device.type == "cuda":
        where, memory = f"cuda ({torch.cuda.get_device_name(device)})", "GPU memory allocated"
    else:
        where, memory = device.type, "process resident memory"
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        where += f", {torch.distributed.get_world_size()} processes"
    peak = result.peak_memory_mb
    compute = {
        "optimizer steps": result.steps,
        "tokens trained on": result.input_tokens_seen,
        "epochs": round(result.epochs, 3),
        "mean training loss": round(result.train_loss, 4),
        "wall time": f"{result.seconds:.0f} s",
        f"peak {memory}": None if peak is None else f"{peak:.0f} MiB",
        "device": where,
    }
    return CardContent(
        kind="fine-tune",
        method=config.method,
        method_summary=method.summary,
        provenance=Provenance(
            provenance.base_model,
            {**provenance.data, "fingerprint": identity["data"]},
            provenance.datasets,
            provenance.revision,
        ),
        settings=settings,
        compute=compute,
    )


RUN_RECORD = "forgetless_train.json"
TOTALS_FILE = "forgetless_totals.json"


def run_identity(model: PreTrainedModel, records: Sequence[Record], config: TrainConfig) -> dict:
    """What a training run is: its settings, the weights it starts from, and its data."""
    data = hashlib.sha256()
    for record in records:
        data.update(json.dumps(record_row(record), sort_keys=True).encode())
        data.update(b"\n")
    # A sum per tensor tells two starting points apart at the cost of one pass over the weights.
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    weights = hashlib.sha256(sums.numpy().tobytes())
    weights.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    return {
        "train": identity_dump(config),
        "model": weights.hexdigest()[:16],
        "data": f"{len(records)} records, sha256 {data.hexdigest()[:16]}",
    }


def _finished_run(output: Path, identity: dict) -> TrainResult | None:
    """The summary of the run ``output`` already finished, if it is this run; an error if
    ``output`` holds another run."""
    record_file = output / RUN_RECORD
    if not record_file.is_file():
        return None
    previous = json.loads(record_file.read_text())
    if previous.get("identity") != identity:
        before = previous.get("identity") or {}
        changed = [key for key in ("model", "data") if before.get(key) != identity[key]]
        changed += sorted(
            key
            for key in {**before.get("train", {}), **identity["train"]}
            if before.get("train", {}).get(key) != identity["train"].get(key)
        )
        raise ForgetlessError(
            f"{output} holds another training run (changed: {', '.join(changed) or 'format'}); "
            "use another output directory, or --overwrite to replace it"
        )
    if previous.get("result") is None or not (output / MODEL_DIR).is_dir():
        return None
    return TrainResult(**previous["result"])


def remove_run(output: str | Path) -> None:
    """Delete what a training run wrote into ``output`` (and nothing else of the folder)."""
    from forgetless.train.methods import ADAPTER_DIR, OSFT_RANKS

    output = Path(output)
    for name in (CHECKPOINTS_DIR, MODEL_DIR, ADAPTER_DIR):
        shutil.rmtree(output / name, ignore_errors=True)
    for name in (RUN_RECORD, OSFT_RANKS):
        (output / name).unlink(missing_ok=True)


def _main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class _StopOnNonFinite(TrainerCallback):
    """Stops a diverging run at the step where it diverged, instead of training on to weights
    of NaN and a loss the logs would average away."""

    def __init__(self, model: PreTrainedModel):
        self.parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_step_end(self, args, state, control, **kwargs):
        norms = torch.stack([p.detach().float().norm() for _, p in self.parameters])
        if not bool(torch.isfinite(norms).all()):
            name = self.parameters[int((~torch.isfinite(norms)).nonzero()[0])][0]
            raise ForgetlessError(
                f"training diverged at step {state.global_step}: {name} is no longer finite; "
                "lower train.learning_rate (or check the data)"
            )


class _RunTotals(TrainerCallback):
    """The whole run's wall time and summed loss, kept in every checkpoint: a resumed run's
    summary then covers the steps before the interruption too."""

    def __init__(self, before: dict):
        self.seconds_before = before.get("seconds", 0.0)
        self.loss_sum = torch.tensor(before.get("loss_sum", 0.0), dtype=torch.float64)
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        # Summed as a tensor: no device synchronisation per step.
        self.loss_sum = self.loss_sum.to(loss.device) + loss.detach().double()

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            totals = {"seconds": self.elapsed(), "loss_sum": float(self.loss_sum)}
            write_json_atomic(folder / TOTALS_FILE, totals)


class _Trainer(Trainer):
    """The Hugging Face Trainer, adding each step's loss to the run's totals."""

    def __init__(self, *args, totals: _RunTotals, **kwargs):
        super().__init__(*args, **kwargs)
        self.totals = totals

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.totals.add(loss)
        return loss


def _train(
    model, tokenizer, records, config, output, callbacks, progress, calibration_records, data_dir,
    identity,
) -> tuple[PreTrainedModel, TrainResult]:  # fmt: skip
    method = lookup("train", config.method).implementation
    set_seed(config.seed)
    features = build_training_features(tokenizer, records, config.max_length)
    model = method.prepare(model, config)
    # Built first: it starts the process group under torchrun / accelerate launch, which OSFT
    # needs to give every process the same subspaces.
    args = _training_arguments(model, config, output / CHECKPOINTS_DIR, progress)
    resume = _last_checkpoint(output / CHECKPOINTS_DIR)
    before: dict = {}
    if resume is not None and (Path(resume) / TOTALS_FILE).is_file():
        before = json.loads((Path(resume) / TOTALS_FILE).read_text())
    totals = _RunTotals(before)
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
        _StopOnNonFinite(model),
        totals,
    ]
    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=DataCollatorForSeq2Seq(
            tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
        ),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        totals=totals,
    )
    if args.process_index == 0:
        write_json_atomic(output / RUN_RECORD, {"identity": identity, "result": None})
    if resume:
        logger.info("resuming from %s", resume)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - started

    model = method.finish(trainer.model, output, main_process=trainer.is_world_process_zero())
    result = TrainResult(
        model_dir=str(output / MODEL_DIR),
        method=config.method,
        steps=outcome.global_step,
        train_loss=float(totals.loss_sum) / max(outcome.global_step, 1),
        train_runtime_s=before.get("seconds", 0.0) + runtime,
        input_tokens_seen=int(trainer.state.num_input_tokens_seen),
        epochs=float(trainer.state.epoch or 0.0),
        resumed_from=resume,
        seconds=before.get("seconds", 0.0),
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
        report_to=config.report_to or "none",
        run_name=config.run_name,
        project=config.project,
        include_num_input_tokens_seen=True,
        bf16=mixed_bf16,
        use_cpu=not on_cuda and not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )


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
