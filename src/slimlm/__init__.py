"""slimlm: make a small language model good enough for the job, prove it, run it locally.

slimlm never reaches a model hub: the switches below are set before transformers or
huggingface_hub is imported anywhere in the package, so a forgotten local path fails fast
instead of starting a download.
"""

import os as _os

_os.environ["HF_HUB_OFFLINE"] = "1"
_os.environ["TRANSFORMERS_OFFLINE"] = "1"
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"

from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.models import (  # noqa: E402
    GenerationParams,
    convert,
    load,
    model_info,
    resolve,
)

__all__ = ["SlimlmError", "GenerationParams", "convert", "load", "model_info", "resolve", "__version__"]
