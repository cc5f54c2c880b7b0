"""The default (`--embeddings auto`) types of the token embedding and output head equal the ones
llama.cpp's own quantizer picks for the same type from the same f32 GGUF, on tied and untied
models of widths 64 (Q6_K falls back) and 256 (Q6_K holds it), for every GGUF block type slimlm
writes and the low-bit K-quant files; and on both built-in models the default Q4_0 file is the size
of llama.cpp's, and the Q2_K and Q3_K_S/M/L files have its types and sizes tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from slimlm.compress.blocks import FORMATS
from tests.conftest import build_tiny_model

pytestmark = [pytest.mark.llamacpp, pytest.mark.filterwarnings("ignore::UserWarning")]

HEADS = ("token_embd.weight", "output.weight")
LOW_BIT_FILES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L")  # K-quant file types beside the block types


def _tensors(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (type, bytes) of the token embedding and output head in a GGUF file."""
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(path).tensors if t.name in HEADS}


def _wide_llama(tokenizer_dir: Path, out: Path, tie: bool) -> Path:
    """A tiny llama 256 wide (Q6_K and Q4_K need rows of multiples of 256), tied or untied."""
    return build_tiny_model("llama", tokenizer_dir, out, seed=7, hidden_size=256, intermediate_size=512,
                            tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def models(tiny_models, tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    return {"llama-64-untied": tiny_models("llama"), "gemma3-64-tied": tiny_models("gemma3_text"),
            "llama-256-untied": _wide_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("w-untied"), tie=False),
            "llama-256-tied": _wide_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("w-tied"), tie=True)}


@pytest.mark.parametrize("name", ["llama-64-untied", "gemma3-64-tied", "llama-256-untied", "llama-256-tied"])
def test_default_types_equal_llama_quantize(name, models, tmp_path):
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.llamacpp_quant import llamacpp_quantize
    from slimlm.compress.quantize import quantize

    folder = models[name]
    f32 = export_gguf(folder, tmp_path / "f32.gguf", dtype="f32")
    compared = []
    for fmt in [*FORMATS, *LOW_BIT_FILES]:
        if fmt in FORMATS and FORMATS[fmt].block_size > 64 and name.split("-")[1] == "64":
            continue  # the ternary types need widths that are multiples of 256 in the body too
        theirs = _tensors(llamacpp_quantize(f32, tmp_path / f"llama-{fmt}.gguf", fmt, threads=1))
        ours = _tensors(quantize(folder, tmp_path / f"slimlm-{fmt}.gguf", format=f"gguf:{fmt}", check=False,
                                 record=False).out)
        assert ours.keys() == theirs.keys(), (fmt, ours, theirs)
        for tensor, (their_type, their_bytes) in theirs.items():
            our_type, our_bytes = ours[tensor]
            assert our_type == their_type, (fmt, tensor, our_type, their_type)
            assert our_bytes == their_bytes, (fmt, tensor, our_bytes, their_bytes)
            compared.append((fmt, tensor, their_type))
    types = {t for _, _, t in compared}
    if name.startswith("llama-256"):  # both the Q6_K head and (untied) the ternary types' Q4_K embedding
        assert "Q6_K" in types and len({f for f, _, _ in compared}) == len(FORMATS) + len(LOW_BIT_FILES), compared
        assert ("Q4_K" in types) == ("Q3_K" in types) == name.endswith("-untied"), compared
    else:
        assert "Q8_0" in types and "Q6_K" not in types, compared  # 64 wide: Q6_K falls back to Q8_0
    assert ("output.weight" in {t for _, t, _ in compared}) == name.endswith("-untied")


def test_embeddings_override_and_notes(models, tmp_path):
    from slimlm.compress.quantize import quantize

    folder = models["llama-256-untied"]
    out = quantize(folder, tmp_path / "f16.gguf", format="gguf:Q4_0", check=False, record=False, embeddings="f16")
    assert {t for t, _ in _tensors(out.out).values()} == {"F16"}
    out = quantize(folder, tmp_path / "q8.gguf", format="gguf:Q4_0", check=False, record=False, embeddings="q8_0")
    assert {t for t, _ in _tensors(out.out).values()} == {"Q8_0"}
    auto = quantize(folder, tmp_path / "auto.gguf", format="gguf:TQ2_0", check=False, record=False)
    assert _tensors(auto.out) == {"token_embd.weight": ("Q4_K", _tensors(auto.out)["token_embd.weight"][1]),
                                  "output.weight": ("Q6_K", _tensors(auto.out)["output.weight"][1])}
    assert not auto.notes, auto.notes
    # the untied token embedding's Q4_K bytes are llama.cpp's own for the same floats
    from safetensors.numpy import load_file

    from tests.compress.ggml_reference import ggml_quantize

    w = load_file(folder / "model.safetensors")["model.embed_tokens.weight"].astype(np.float32)
    embd = next(t for t in GGUFReader(auto.out).tensors if t.name == "token_embd.weight")
    assert np.array_equal(np.asarray(embd.data).reshape(-1), ggml_quantize(w, embd.tensor_type, 144).reshape(-1))
    from llama_cpp import Llama

    llm = Llama(model_path=str(auto.out), n_ctx=32, verbose=False, n_gpu_layers=0)  # llama.cpp runs it
    tokens = [tok for tok, _ in zip(llm.generate([1, 40, 77], temp=0.0), range(3))]
    llm.close()
    assert len(tokens) == 3


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_default_q4_0_matches_llama_quantize_on_builtin_models(model, tmp_path):
    """The default Q4_0 file (RTN) of each built-in model: the embedding/output types llama.cpp's
    Q4_0 file has, and a size within 2% of it."""
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.compress.llamacpp_quant import llamacpp_quantize
    from slimlm.compress.quantize import quantize
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    folder = dense_folder(resolve(model))
    f32 = export_gguf(folder, tmp_path / "f32.gguf", dtype="f32")
    theirs = llamacpp_quantize(f32, tmp_path / "llama.gguf", "Q4_0")
    ours = Path(quantize(folder, tmp_path / "slimlm.gguf", format="gguf:Q4_0", check=False, record=False).out)
    assert {k: t for k, (t, _) in _tensors(ours).items()} == {k: t for k, (t, _) in _tensors(theirs).items()}
    size_ours, size_theirs = ours.stat().st_size, theirs.stat().st_size
    print(f"{model}: slimlm Q4_0 {size_ours / 2**20:.3f} MiB, llama.cpp Q4_0 {size_theirs / 2**20:.3f} MiB")
    assert np.isclose(size_ours, size_theirs, rtol=0.02), (size_ours, size_theirs)


@pytest.fixture(scope="module")
def builtin_f32(tmp_path_factory):
    """model name -> (dense folder, its f32 GGUF), exported once per model for the tests below."""
    from slimlm.compress.gguf_export import export_gguf
    from slimlm.models.loading import dense_folder
    from slimlm.models.reference import resolve

    cache = {}

    def get(model: str) -> tuple[Path, Path]:
        if model not in cache:
            folder = dense_folder(resolve(model))
            cache[model] = folder, export_gguf(folder, tmp_path_factory.mktemp(model) / "f32.gguf", dtype="f32")
        return cache[model]

    return get


@pytest.mark.real_model
@pytest.mark.parametrize("model, ftype", [
    *[("smollm2-135m-instruct", f) for f in LOW_BIT_FILES], *[("gemma3-270m", f) for f in LOW_BIT_FILES]])
def test_low_bit_kquant_files_match_llama_quantize_on_builtin_models(builtin_f32, model, ftype, tmp_path):
    """slimlm's Q2_K / Q3_K_S / Q3_K_M / Q3_K_L file of each built-in model (RTN) against
    llama-quantize's of the same f32 GGUF: every tensor the same type and the same bytes (the files
    differ only by slimlm's metadata)."""
    from slimlm.compress.llamacpp_quant import llamacpp_quantize
    from slimlm.compress.quantize import quantize
    from slimlm.models.reference import resolve

    folder, f32 = builtin_f32(model)
    theirs = llamacpp_quantize(f32, tmp_path / "llama.gguf", ftype)
    ours = Path(quantize(folder, tmp_path / "slimlm.gguf", format=f"gguf:{ftype}", check=False, record=False).out)
    a = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(ours).tensors}
    b = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(theirs).tensors}
    print(f"{model} {ftype}: slimlm {ours.stat().st_size / 2**20:.3f} MiB, "
          f"llama.cpp {theirs.stat().st_size / 2**20:.3f} MiB")
    assert {k: v for k, v in a.items() if a[k] != b.get(k)} == {}, {k: (a.get(k), v) for k, v in b.items() if a.get(k) != v}
    assert a.keys() == b.keys()  # so the tensor data are the same size; the files differ by metadata only
    data = {t.name: t.data for t in GGUFReader(theirs).tensors}
    differ = {t.name: t.data.tobytes() for t in GGUFReader(ours).tensors if not np.array_equal(t.data, data[t.name])}
    # where the bytes differ they are the GGUF parent's own, kept where the type is the parent's
    # (compress/source_blocks.py; llama-quantize re-rounds Gemma's Q4_K tensors, which is not exact)
    parent = {t.name: t.data.tobytes() for t in GGUFReader(resolve(model).path).tensors}
    assert {n: b == parent.get(n) for n, b in differ.items()} == dict.fromkeys(differ, True)
    assert model == "gemma3-270m" or not differ  # SmolLM2's Q4_1 parent shares no type with these files
    assert np.isclose(ours.stat().st_size, theirs.stat().st_size, rtol=0.002), (ours.stat().st_size, theirs.stat().st_size)
