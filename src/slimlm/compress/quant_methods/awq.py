"""`awq`: activation-aware per-channel scales (compress/awq.py), folded into the preceding norm so
the fp32 model is unchanged, then round-to-nearest on the scaled weights.

AWQ searches its scales per group of a block format, so it needs one: a packed folder's
per-channel format (group size 0) is refused before any work."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimlm.compress.blocks import BlockFormat
from slimlm.compress.quant_methods.base import QuantJob, QuantMethod, register_quant_method
from slimlm.errors import SlimlmError


@register_quant_method("awq")
class AWQ(QuantMethod):
    help = ("AWQ: activation-aware per-channel scaling (equivalent in fp32) from calibration text, then "
            "round-to-nearest")
    calibrated = True

    def check_format(self, kind: str, fmt: BlockFormat) -> None:
        if fmt.block_size == 0:
            raise SlimlmError("AWQ searches scales per group: give --group-size > 0 (per-channel is not supported)")

    @contextmanager
    def source(self, job: QuantJob) -> Iterator[Path]:
        """An fp32-equivalent copy of the input whose weights round better, removed afterwards."""
        from slimlm.compress.awq import apply_awq

        job.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{job.out.name}.awq-", dir=job.out.parent))
        try:
            report = apply_awq(job.folder, tmp / "model", job.fmt, job.texts, samples=job.samples,
                               seq_len=job.seq_len, progress=True)
            job.notes.extend([f"AWQ scaled {len(report['scaled'])} groups"] + [
                f"AWQ skipped layer {s['layer']} {s['group']}: {s['why']}" for s in report["skipped"]
                if s["group"] != "v->o"])
            yield tmp / "model"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
