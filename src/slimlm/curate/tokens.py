"""Token counts: a curation run reports what each step removed in tokens as well as documents,
since tokens are what training pays for.

Counted once when the corpus is read (into `metadata["token_count"]`, the key datatrove's own
statistics sum) and again only by a step that rewrites text. The tokenizer is a local model's
(default: the built-in SmolLM2's), so the count is the one `finetune` and `distill` will see;
`words` counts whitespace-separated words instead, with no model at all.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimlmError

WORDS = "words"


class TokenCounter:
    """Picklable (datatrove ships steps to worker processes): the tokenizer loads on first use."""

    def __init__(self, tokenizer: str = WORDS):
        self.tokenizer = tokenizer
        self._tok = None

    def __getstate__(self):
        return {"tokenizer": self.tokenizer, "_tok": None}

    def check(self) -> None:
        """Load it now, so a wrong name fails before any work."""
        if self.tokenizer != WORDS:
            self._load()

    def _load(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            from slimlm.models.loading import dense_folder
            from slimlm.models.reference import resolve

            path = Path(self.tokenizer)
            folder = path if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists() \
                else dense_folder(resolve(self.tokenizer))
            try:
                self._tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise SlimlmError(f"tokenizer {self.tokenizer}: cannot load one from {folder} ({exc}): give a model "
                                  f"with a tokenizer, or `{WORDS}`") from None
        return self._tok

    def count(self, texts: list[str]) -> list[int]:
        if self.tokenizer == WORDS:
            return [len(t.split()) for t in texts]
        ids = self._load()(texts, add_special_tokens=False)["input_ids"]
        return [len(i) for i in ids]
