"""`awq`: activation-aware per-channel scales (compress/awq.py), folded into the preceding norm so
the fp32 model is unchanged, then round-to-nearest on the scaled weights.

AWQ searches its scales per group of a block format, so it needs one: a packed folder's
per-channel format (group size 0) is refused before any work. K-quant and mixed-precision files
(per-tensor types) are written from the rescaled model with RTN's bytes, the scales searched for a
proxy block format (`source_typed`)."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
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
    typed_formats = True  # K-quant and mixed files: RTN's bytes of the rescaled model (source_typed)
    keeps_parent_blocks = False  # its scales change every weight, so no parent block is the right one

    def check_format(self, kind: str, fmt: BlockFormat) -> None:
        if fmt.block_size == 0:
            raise SlimlmError("AWQ searches scales per group: give --group-size > 0 (per-channel is not supported)")

    @contextmanager
    def source(self, job: QuantJob) -> Iterator[Path]:
        """An fp32-equivalent copy of the input whose weights round better, removed afterwards."""
        with _rewritten(job, job.fmt) as folder:
            yield folder

    @contextmanager
    def source_typed(self, job) -> Iterator[Path]:
        """The same rewrite for a K-quant or mixed file, whose tensors are then RTN's bytes in their
        types (the default encode_typed); norms carry the folded scales into the file too.

        The scale search needs one block format; K-quant types are not one, so a proxy stands in:
        Q4_0, whose 32-wide 4-bit groups with a scale each are the block format closest to Q4_K's
        32-wide sub-blocks (most of a Q4_K_M file; Q3_K too), Q5_0 for a file mostly in 5- or
        6-bit types, Q8_0 for one mostly in Q8_0 (counting tensors)."""
        from slimlm.compress.blocks import get_format

        bits = Counter(t[1:2] for t in job.types.values()).most_common(1)[0][0]
        proxy = {"5": "Q5_0", "6": "Q5_0", "8": "Q8_0"}.get(bits, "Q4_0")
        job.notes.append(f"AWQ scales searched for {proxy} (the proxy of the file's K-quant types)")
        with _rewritten(job, get_format(proxy)) as folder:
            yield folder


@contextmanager
def _rewritten(job, fmt: BlockFormat) -> Iterator[Path]:
    """apply_awq's fp32-equivalent copy of job.folder (scales searched for `fmt`) next to job.out."""
    from slimlm.compress.awq import apply_awq

    job.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{job.out.name}.awq-", dir=job.out.parent))
    try:
        report = apply_awq(job.folder, tmp / "model", fmt, job.texts, samples=job.samples,
                           seq_len=job.seq_len, progress=True)
        job.notes.extend([f"AWQ scaled {len(report['scaled'])} groups"] + [
            f"AWQ skipped layer {s['layer']} {s['group']}: {s['why']}" for s in report["skipped"]
            if s["group"] != "v->o"])
        yield tmp / "model"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
