"""Training: full fine-tuning and LoRA through the Hugging Face Trainer."""

from forgetless.train.sft import TrainResult, save_checkpoint, train_model

__all__ = ["TrainResult", "save_checkpoint", "train_model"]
