"""Training: data preparation, the shared training loop, and fine-tuning (LoRA, DoRA, full)."""

from slimlm.train.core import TrainConfig, Trainer, TrainResult, causal_lm_loss
from slimlm.train.data import TrainData, load_data
from slimlm.train.finetune import FinetuneResult, export_gguf_lora, finetune

__all__ = ["FinetuneResult", "TrainConfig", "TrainData", "TrainResult", "Trainer", "causal_lm_loss",
           "export_gguf_lora", "finetune", "load_data"]
