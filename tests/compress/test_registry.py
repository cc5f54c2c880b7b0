"""Methods are registry entries the library dispatches through: a method defined here, in the test,
runs through the real CLI with one registration line, `--help` lists every registered method, and
the README shows every built-in one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from slimlm.compress.prune_methods import PRUNE_METHODS, SparsityMethod, register_prune_method
from slimlm.compress.prune_sparse import decoder_linears, magnitude_prune
from slimlm.compress.quant_methods import QUANT_METHODS, QuantMethod, register_quant_method
from slimlm.errors import SlimlmError
from tests.conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


class Twin(QuantMethod):
    """Round-to-nearest under another name (the base class's codes), counting its calls."""
    help = "round-to-nearest under another name (a test's method)"
    calls = 0

    def choose(self, job, name, w):
        type(self).calls += 1
        return super().choose(job, name, w)


class Magnitude(SparsityMethod):
    """Magnitude pruning: no calibration statistic, the smallest |W| of each row go."""
    help = "zero the smallest |W| of each row (a test's method)"

    def statistics(self, job) -> dict:
        return {name: None for name in decoder_linears(job.model)}

    def weight_pruner(self, sparsity, nm):
        return lambda weight, _: magnitude_prune(weight, sparsity, nm)


@pytest.fixture
def twin():
    register_quant_method("twin")(Twin)
    Twin.calls = 0
    try:
        yield Twin
    finally:
        QUANT_METHODS.unregister("twin")


@pytest.fixture
def magnitude():
    register_prune_method("magnitude")(Magnitude)
    try:
        yield Magnitude
    finally:
        PRUNE_METHODS.unregister("magnitude")


def _tensors(path) -> dict:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def test_a_method_registered_here_runs_through_the_cli(twin, tiny_models, tmp_path, capfd):
    folder = tiny_models("llama")
    outputs = {}
    for method in ("twin", "rtn"):
        code, out, err = run_cli(capfd, "quantize", folder, "--method", method, "--format", "gguf:Q8_0",
                                 "--out", tmp_path / f"{method}.gguf", "--no-check", "--json",
                                 "--embeddings", "f16")  # so the Q8_0 tensors are the method's
        assert code == 0, err
        outputs[method] = json.loads(out)
    assert outputs["twin"]["method"] == "twin" and outputs["twin"]["format"] == "gguf:Q8_0"
    assert outputs["twin"]["params_quantized"] == outputs["rtn"]["params_quantized"] > 0
    got, want = _tensors(tmp_path / "twin.gguf"), _tensors(tmp_path / "rtn.gguf")
    assert got == want  # the same codes, byte for byte
    assert twin.calls == sum(kind == "Q8_0" for kind, _ in got.values())  # asked once per quantized weight
    manifest = json.loads((tmp_path / "twin.slimlm.json").read_text())
    assert manifest["params"]["method"] == "twin"


def test_a_prune_method_registered_here_runs_through_the_cli(magnitude, tiny_models, tmp_path, capfd):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_models("qwen2")
    code, out, err = run_cli(capfd, "prune", folder, "--method", "magnitude", "--ratio", "0.25",
                             "--out", tmp_path / "pruned", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "magnitude" and result["sparsity"]["overall"] == pytest.approx(0.25)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    linears = decoder_linears(pruned)
    for name, module in decoder_linears(original).items():
        assert torch.equal(linears[name].weight, magnitude_prune(module.weight, 0.25)), name
    # as a sparsity method it takes an N:M pattern, which the built-in structured ones refuse
    code, out, err = run_cli(capfd, "prune", folder, "--method", "magnitude", "--pattern", "2:4",
                             "--out", tmp_path / "two-four", "--json")
    assert code == 0 and json.loads(out)["sparsity"]["overall"] == pytest.approx(0.5), err
    code, _, err = run_cli(capfd, "prune", folder, "--method", "layers", "--pattern", "2:4", "--out", tmp_path / "x")
    assert code == 1 and "--pattern is for wanda, sparsegpt and magnitude, not layers" in err, err


@pytest.mark.parametrize("verb,registry", [("quantize", QUANT_METHODS), ("prune", PRUNE_METHODS)])
def test_help_lists_every_registered_method(verb, registry, twin, magnitude, capfd):
    code, out, err = run_cli(capfd, verb, "--help")
    assert code == 0, err
    assert {"twin", "magnitude"} & set(registry)  # the test's own method is among them
    for name, cls in registry.items():
        assert f"{name}:" in out, f"{verb} --help does not list {name}"
        assert cls.help.split()[0] in out


def test_unknown_method_is_the_one_line_error(tiny_models, tmp_path, capfd):
    for verb in ("quantize", "prune"):
        code, out, err = run_cli(capfd, verb, tiny_models("llama"), "--method", "magic", "--out", tmp_path / "x")
        assert code == 1 and err.startswith("error: unknown method 'magic': choose one of ") and out == "", err
        assert err.strip().count("\n") == 0
    with pytest.raises(SlimlmError, match="unknown method 'magic'"):
        QUANT_METHODS.create("magic")


def test_readme_shows_every_built_in_method():
    shown = {name for names in re.findall(r"--method ([a-z|]+)", README) for name in names.split("|")}
    for name in [*QUANT_METHODS, *PRUNE_METHODS]:
        assert name in shown, f"README.md shows no `--method {name}`"


def test_registration_refuses_mistakes():
    with pytest.raises(ValueError, match="already registered"):
        register_quant_method("rtn")(Twin)
    with pytest.raises(TypeError, match="must subclass QuantMethod"):
        register_quant_method("odd")(Magnitude)
    with pytest.raises(ValueError, match="needs a `help` line"):
        register_quant_method("silent")(type("Silent", (QuantMethod,), {}))
    assert "odd" not in QUANT_METHODS and "silent" not in QUANT_METHODS and QUANT_METHODS["rtn"].name == "rtn"
