"""Model references, loading, conversion, information and inference backends."""

from slimlm.models.backends import GenerationParams, open_backend
from slimlm.models.info import ModelInfo, model_info
from slimlm.models.loading import convert, load_torch
from slimlm.models.reference import BUILTINS, ModelRef, resolve

load = open_backend

__all__ = ["BUILTINS", "GenerationParams", "ModelInfo", "ModelRef", "convert", "load", "load_torch",
           "model_info", "open_backend", "resolve"]
