"""Training: data preparation, the shared training loop, fine-tuning (LoRA, DoRA, full) and the
settings of each verb as a config dataclass (configs.py) that a YAML recipe can hold."""

from slimlm.train.configs import DistillConfig, FinetuneConfig
from slimlm.train.core import TrainConfig, Trainer, TrainResult, causal_lm_loss
from slimlm.train.data import TrainData, load_data
from slimlm.train.finetune import FinetuneResult, export_gguf_lora, finetune

__all__ = ["DistillConfig", "FinetuneConfig", "FinetuneResult", "TrainConfig", "TrainData", "TrainResult", "Trainer",
           "causal_lm_loss", "export_gguf_lora", "finetune", "load_data"]
