"""The one calibration / held-out split of the built-in corpus, used by every compression
method, bench and test.

GPTQ, AWQ, pruning and llama.cpp's importance matrix all fit to calibration text, and a
compressed model is then judged on how closely it matches the original on text. If the judging
text were among the calibration text, a method could look better than it is by fitting the very
text it is scored on; so the last `HELD_OUT` topics of `python-docs` in its fixed sorted order
(on Python 3.11: 'while', 'with', 'yield', about 4,800 characters) are never calibrated on.
The same module is where the default calibration set is named: `DEFAULT_CALIB` is `mix`, the
diverse set of data/calibration_mix.py (with its own held-out corpora); `python-docs` keeps this
split. Three topics hold more than the 512 tokens of the quick fidelity check (quantize's
`quick_fidelity` reads 6 characters a token) and enough for the quantize bench's perplexity and
KL on a 2-core CPU, while the other 76 topics (460,000 characters) stay for calibration. Written
once here, the split cannot drift between a method and the bench that measures it.
"""

from __future__ import annotations

from slimlm.data.corpora import BUILTIN_CORPORA, builtin_corpus, python_docs, text_documents
from slimlm.errors import SlimlmError

HELD_OUT = 3  # the last topics of python-docs, never calibrated on
DEFAULT_CALIB = "mix"  # what GPTQ/AWQ/pruning calibrate on unless told (data/calibration_mix.py)


def calibration_docs(held_out: int = HELD_OUT) -> list[str]:
    """python-docs without its last `held_out` topics: what methods calibrate on by default."""
    docs = python_docs()
    return docs[:-held_out] if held_out else docs


def held_out_docs(held_out: int = HELD_OUT) -> list[str]:
    """The last `held_out` topics of python-docs: what a compressed model is judged on."""
    return python_docs()[-held_out:] if held_out else []


def calibration_corpus(source: str = "python-docs", field_name: str | None = None) -> list[str]:
    """Calibration documents from a source: python-docs without its held-out topics, `mix` (which
    holds none of any held-out corpus), or any other text source (file, folder, JSONL field)
    whole, since the user chose it. The held-out corpora themselves are refused."""
    if source == "python-docs":
        return calibration_docs()
    if source.startswith("held-out") and source in BUILTIN_CORPORA:
        names = ", ".join(k for k in BUILTIN_CORPORA if not k.startswith("held-out"))
        raise SlimlmError(f"'{source}' is evaluation text, held out from calibration: calibrate on {names} "
                          "or your own text")
    if source in BUILTIN_CORPORA:  # mix: built without any held-out text (calibration_mix.py)
        return builtin_corpus(source)
    return text_documents(source, field_name)
