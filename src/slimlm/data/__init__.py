"""Data: where text and records come from, below every verb that reads them.

Corpora (the built-in `python-docs`, the diverse calibration set `mix` and its held-out
out-of-domain corpora (calibration_mix.py), text files and folders, a JSONL field), the built-in
task sets (`pydoc`, built from the standard library's docstrings, builtin_tasks.py), the one JSONL
reader with `file:line` errors, chat and prompt records, and the one calibration / held-out
split of the built-in corpus. eval/, train/, compress/ and the router read through here, so a
data file means the same thing, and fails the same way, to every verb. This package imports
no verb's package (it sits below them in the layers of pyproject.toml). The privacy detectors
(privacy.py) live here because two verbs use them: the server's guard and curation's PII step.
"""

from slimlm.data.builtin_tasks import BUILTIN_TASKS, builtin_task
from slimlm.data.calibration_mix import held_out_chat, held_out_corpora, held_out_prose, mix_docs, ngram_overlap
from slimlm.data.corpora import BUILTIN_CORPORA, builtin_corpus, python_docs, text_documents, text_files
from slimlm.data.jsonl import JsonlReport, read_jsonl
from slimlm.data.records import check_chat_record, read_prompts, read_records, record_scores
from slimlm.data.splits import DEFAULT_CALIB, HELD_OUT, calibration_corpus, calibration_docs, held_out_docs

__all__ = ["BUILTIN_CORPORA", "BUILTIN_TASKS", "DEFAULT_CALIB", "HELD_OUT", "JsonlReport", "builtin_corpus",
           "builtin_task", "calibration_corpus", "calibration_docs", "check_chat_record", "held_out_chat",
           "held_out_corpora", "held_out_docs", "held_out_prose", "mix_docs", "ngram_overlap", "python_docs",
           "read_jsonl", "read_prompts", "read_records", "record_scores", "text_documents", "text_files"]
