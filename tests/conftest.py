"""Shared fixtures: a tiny tokenizer and tiny random-weight models of every family.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained in a second on
Python's own reference docs (pydoc_data ships with every Python), with a ChatML template, so
chat formatting, special tokens and streaming detokenization are exercised for real.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATRIX_FILE = ROOT / "build" / "compat.json"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True, scope="session")
def _isolated_state(tmp_path_factory):
    """Runs and caches go to a per-session folder, never the user's."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("slimlm-state")
    mp.setenv("SLIMLM_RUNS_DB", str(base / "runs.db"))
    mp.setenv("SLIMLM_DATA_DIR", str(base / "data"))
    mp.setenv("SLIMLM_CACHE_DIR", str(base / "cache"))
    yield
    mp.undo()


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="</s>")
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def build_tiny_model(model_type: str, tokenizer_dir: Path, out: Path, seed: int = 0, edit=None, **config) -> Path:
    """A tiny random model of `model_type` in `out`; `config` overrides the family's tiny config
    (e.g. hidden_size=256 for block types that need 256-wide rows), and `edit(model)` may change
    the initialised weights (under no_grad) before they are saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.models.families import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(model_type, **{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                        "eos_token_id": tokenizer.eos_token_id,
                                        "pad_token_id": tokenizer.pad_token_id, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 makes near-uniform logits; a larger scale gives decisive argmaxes,
    # so greedy comparisons test the cache rather than floating-point ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        if edit is not None:
            edit(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_tokenizer_dir, tmp_path_factory):
    """family -> folder of a tiny random model, built on first use."""
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{model_type}")
            cache[model_type] = build_tiny_model(model_type, tiny_tokenizer_dir, out)
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    """The tiny random llama as an f32 GGUF file, for llama.cpp."""
    from slimlm.compress.gguf_export import export_gguf

    return export_gguf(tiny_models("llama"), tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", dtype="f32")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from slimlm.models.reference import resolve

    return resolve("smollm2-135m-instruct").path


# --- the README compatibility matrix is generated from these results -----------------------
_MATRIX_TEST = re.compile(r"test_matrix_(\w+)\[(\w+)\]")


_MATRIX: dict[str, dict[str, str]] = {}


def pytest_runtest_logreport(report):
    """Collect test_matrix_<capability>[<family>] outcomes (on the xdist controller too)."""
    match = _MATRIX_TEST.search(report.nodeid)
    if not match:
        return
    capability, family = match.groups()
    cell = _MATRIX.setdefault(family, {})
    if report.failed:
        cell[capability] = "failed"
    elif report.skipped:
        cell[capability] = "skipped"
    elif report.when == "call" and cell.get(capability) != "failed":
        cell[capability] = "passed"


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput") or not _MATRIX:
        return
    MATRIX_FILE.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(MATRIX_FILE.read_text()) if MATRIX_FILE.exists() else {}
    for family, caps in _MATRIX.items():
        previous.setdefault(family, {}).update(caps)
    MATRIX_FILE.write_text(json.dumps(previous, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def smollm2_dense(smollm2_gguf, tmp_path_factory) -> Path:
    """The built-in SmolLM2 converted to a dense Hugging Face folder by `slimlm convert`."""
    from slimlm.models.loading import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "dense")


def greedy_alone(llm, ids, n: int) -> list[int]:
    """Greedy token ids (at most n, up to an end token) of one prompt on llama-cpp-python's own
    one-at-a-time loop (what the llama.cpp backend's stream runs), from a cleared cache: the
    yardstick of continuous batching's tests."""
    import llama_cpp

    llm.reset()
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or len(out) == n:
            break
        out.append(tok)
    return out


def llama_logits(path, ids, n_ctx: int = 64):
    """llama.cpp's logits [len(ids), vocab] (numpy float32) for `ids` from the GGUF at `path`, with an f32 KV
    cache, so what differs from transformers is only summation order: the independent yardstick of
    the export and upcycling tests."""
    import llama_cpp  # required: fails, never skips, when missing
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, n_gpu_layers=0,
                          type_k=0, type_v=0)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def run_cli(capture, *args):
    """Run `slimlm ARGS` in-process through the real entry point (error handling included);
    returns (exit code, stdout, stderr). `capture` is pytest's capsys or capfd."""
    from slimlm import cli

    capture.readouterr()  # drop what fixtures printed (e.g. transformers' progress while building a model)
    old = sys.argv
    sys.argv = ["slimlm", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    captured = capture.readouterr()
    return code, captured.out, captured.err
