"""Training: full fine-tuning, LoRA and OSFT through the Hugging Face Trainer.

* :func:`train_model` (``train.sft``) — fine-tune a model on records, resumably;
* :mod:`forgetless.train.methods` — the registered methods and their hooks;
* :mod:`forgetless.train.stages` — the training stages recipes chain.
"""


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for its config) must not import torch.
    if name in ("TrainResult", "train_model"):
        from forgetless.train import sft

        return getattr(sft, name)
    raise AttributeError(name)


__all__ = ["TrainResult", "train_model"]
