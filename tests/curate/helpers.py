"""Run one curation step's datatrove blocks over hand-made documents, in this process."""

from __future__ import annotations

from pathlib import Path

from datatrove.data import Document

from slimlm.config import load_config
from slimlm.curate.steps import CURATE_STEPS, StepContext
from slimlm.curate.tokens import TokenCounter


def apply_step(name: str, texts: list[str], tmp: Path, **settings) -> tuple[list[Document], list[Document]]:
    """(kept, removed) documents after the document step `name` with `settings`."""
    import gzip
    import json

    step = CURATE_STEPS.create(name)
    params = load_config(step.params, settings)
    step.check(params)
    ctx = StepContext(work=tmp, label=f"01-{name}", tasks=1, token_counter=TokenCounter("words"))
    docs = [Document(text=t, id=str(i), metadata={"token_count": len(t.split())}) for i, t in enumerate(texts)]
    data = iter(docs)
    for block in step.document_steps(params, ctx):
        data = block(data, 0, 1)
    kept = list(data)
    removed = []
    for shard in sorted((tmp / "removed" / f"01-{name}").glob("*.jsonl.gz")):
        with gzip.open(shard, "rt") as f:
            for line in f:
                r = json.loads(line)
                removed.append(Document(text=r["text"], id=r["id"], metadata=r.get("metadata", {})))
    return kept, removed
