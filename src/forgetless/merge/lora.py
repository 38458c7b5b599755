"""PEFT LoRA adapters as merge experts, without materialising the fine-tuned checkpoint.

A LoRA adapter changes a targeted weight W by scaling · B @ A (transposed for embeddings and
for layers that store W as (in, out), PEFT's ``fan_in_fan_out``), with scaling = alpha / r,
or alpha / √r for rsLoRA. The merge asks each expert for the delta of one tensor at a time,
so an adapter computes that product when its tensor comes up (a few MB of factors read per
tensor) and every tensor it does not target has delta 0: no full checkpoint is written or
held, and the merge treats the result like any expert's delta.

Only plain LoRA is merged; what would change the model in other ways (DoRA's magnitudes,
trained biases, modules saved whole, trainable tokens) is refused in one line, with the way
out: ``merge_and_unload()`` in PEFT, then merge the saved checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from forgetless.errors import ForgetlessError
from forgetless.merge.checkpoint import (
    Checkpoint,
    check_tokenizer,
    resolve_checkpoint_dir,
    safetensors_file,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel.save_pretrained prefixes every name; adapters saved through transformers' own PEFT
# integration do not.
PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<linear>[AB])\.weight|lora_embedding_(?P<embedding>[AB]))$"
)
# PEFT saves a copy of a targeted embedding's frozen base weights beside its factors.
_BASE_COPY = ".base_layer.weight"

# adapter_config.json settings that make an adapter more than scaling · B @ A.
UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude per column)",
    "modules_to_save": "modules_to_save (modules trained in full)",
    "lora_bias": "lora_bias (a trained bias on B)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication (layers added to the base)",
    "alora_invocation_tokens": "aLoRA (active only after its invocation tokens)",
    "use_qalora": "QALoRA (pooled inputs)",
    "arrow_config": "Arrow routing between adapters",
}
MERGE_IT_YOURSELF = "merge it with PEFT's merge_and_unload(), save that and merge the checkpoint"


def is_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraFactors:
    """How one base tensor's delta is made: scaling · B @ A, transposed or not."""

    a: str  # tensor names in the adapter file
    b: str
    scaling: float
    transpose: bool


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors."""

    directory: Path
    label: str
    base_model: str | None  # the adapter's base_model_name_or_path
    file: Path
    shapes: dict[str, tuple[int, ...]]  # of the adapter file's tensors
    targets: dict[str, LoraFactors]  # base tensor name -> its factors
    base_copies: dict[str, str]  # base tensor name -> the adapter's copy of it

    @classmethod
    def open(cls, name: str, directory: Path | None = None) -> LoraAdapter:
        directory = directory or resolve_checkpoint_dir(name)
        config = _adapter_config(directory / ADAPTER_CONFIG)
        if config.get("peft_type") != "LORA":
            raise ForgetlessError(
                f"{name}: {ADAPTER_CONFIG} has peft_type {config.get('peft_type')!r}; only LoRA "
                "adapters are merged"
            )
        for key, what in UNSUPPORTED.items():
            if config.get(key):
                raise ForgetlessError(
                    f"{name}: {what} cannot be merged as a LoRA delta; {MERGE_IT_YOURSELF}"
                )
        if config.get("bias", "none") != "none":
            raise ForgetlessError(
                f"{name}: trained biases (bias {config['bias']!r}) cannot be merged as a LoRA "
                f"delta; {MERGE_IT_YOURSELF}"
            )
        file = directory / ADAPTER_WEIGHTS
        if not file.is_file():
            if (directory / "adapter_model.bin").is_file():
                raise ForgetlessError(
                    f"{name} has PyTorch .bin adapter weights; merging reads safetensors only: "
                    "re-save it with model.save_pretrained(path) (safetensors is the default)"
                )
            raise ForgetlessError(f"{name}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
        with safetensors_file(file) as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        targets, base_copies = _factors(name, config, shapes)
        return cls(
            directory,
            name,
            config.get("base_model_name_or_path"),
            file,
            shapes,
            targets,
            base_copies,
        )

    def check_against(self, base: Checkpoint) -> None:
        """Raise a one-line ForgetlessError unless every delta fits a tensor of ``base``."""
        shapes = {key: self._delta_shape(factors) for key, factors in self.targets.items()}
        shapes.update({key: self.shapes[copy] for key, copy in self.base_copies.items()})
        for key, shape in shapes.items():
            if key not in base.tensors:
                raise ForgetlessError(
                    f"{self.label} adapts {key}, which the base does not hold (tied to another "
                    "tensor, or another architecture?)"
                )
            expected = base.tensors[key].shape
            if shape != expected:
                raise ForgetlessError(
                    f"{self.label}: its {key} has shape {list(shape)}, the base's "
                    f"{list(expected)}; was it trained on another base?"
                )
        if self.base_model and not _same_model(self.base_model, base):
            # Names are not comparable (an alias, a hub id and a local copy can all be the same
            # model), so a differing name warns; what cannot be merged is refused above.
            logger.warning(
                "%s was trained on %s and is merged into %s: their tensor shapes match",
                self.label,
                self.base_model,
                base.label,
            )
        check_tokenizer(base, self.directory, self.label)

    def _delta_shape(self, factors: LoraFactors) -> tuple[int, ...]:
        shape = (self.shapes[factors.b][0], self.shapes[factors.a][1])
        return shape[::-1] if factors.transpose else shape

    def delta(self, key: str, reference: torch.Tensor) -> torch.Tensor:
        """The adapter's change of tensor ``key`` in fp32: scaling · B @ A, or zeros."""
        factors = self.targets.get(key)
        if factors is None:
            return torch.zeros_like(reference)
        with safetensors_file(self.file) as handle:
            a, b = (handle.get_tensor(name).float() for name in (factors.a, factors.b))
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ForgetlessError(f"{self.label}: the LoRA of {key} holds NaN or infinite values")
        product = b @ a
        if factors.transpose:
            product = product.T.contiguous()
        return product.mul_(factors.scaling)


def _adapter_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ForgetlessError(f"{file}: not a valid adapter config ({error})") from None
    if not isinstance(config, dict):
        raise ForgetlessError(f"{file}: not a valid adapter config (not a mapping)")
    return config


def _factors(
    name: str, config: dict, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, LoraFactors], dict[str, str]]:
    pairs: dict[str, dict[str, str]] = {}
    embeddings: set[str] = set()
    base_copies: dict[str, str] = {}
    for key in shapes:
        local = key.removeprefix(PEFT_PREFIX)
        if local.endswith(_BASE_COPY):
            base_copies[local.removesuffix(_BASE_COPY) + ".weight"] = key
            continue
        match = _FACTOR.match(local)
        if match is None:
            raise ForgetlessError(
                f"{name}: adapter tensor {key} is not a LoRA A or B matrix; {MERGE_IT_YOURSELF}"
            )
        module = match["module"]
        pairs.setdefault(module, {})[match["linear"] or match["embedding"]] = key
        if match["embedding"]:
            embeddings.add(module)
    alpha_pattern = config.get("alpha_pattern") or {}
    targets = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise ForgetlessError(f"{name}: {module} has no LoRA {missing} matrix")
        a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ForgetlessError(
                f"{name}: the LoRA of {module} has factors {list(a_shape)} and {list(b_shape)}; "
                "only linear and embedding layers (two matrices of one rank) are merged"
            )
        # The rank is the factors' (rank_pattern included); alpha follows PEFT's own lookup.
        rank = a_shape[0]
        alpha = alpha_pattern.get(_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = module in embeddings or bool(config.get("fan_in_fan_out"))
        targets[f"{module}.weight"] = LoraFactors(pair["A"], pair["B"], scaling, transpose)
    if not targets:
        raise ForgetlessError(f"{name}: the adapter holds no LoRA matrices")
    return targets, base_copies


def _pattern_key(patterns: dict, module: str) -> str:
    """PEFT's get_pattern_key: the first pattern that ends the module's name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return module


def _same_model(recorded: str, base: Checkpoint) -> bool:
    if recorded == base.label:
        return True
    local = Path(recorded).expanduser()
    return local.is_dir() and local.resolve() == base.directory.resolve()
