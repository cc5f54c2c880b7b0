"""Systems measurement on a tiny random model: every key present, numbers sane and consistent
with each other and with the loaded model."""

from __future__ import annotations

import json

import pytest

from slimlm.errors import SlimlmError
from slimlm.eval.cost import CostConfig, api_cost_per_1m, load_api_prices
from slimlm.eval.systems import measure_systems, run_bench

KEYS = {"model", "backend", "precision", "machine", "quick", "repeat", "gen_tokens", "load_s", "prompt_lengths",
        "prompt_tokens", "ttft_s", "decode_tps", "ttft_s_by_length", "decode_tps_by_length", "prefill_tps",
        "peak_rss_bytes", "size_bytes", "params_total", "params_active", "flops_per_token", "workload",
        "energy_j_per_1k_tokens",
        "energy_source", "cost_per_1m_tokens_local", "cost_breakdown", "api_cost_per_1m", "api_prices_as_of",
        "notes"}


@pytest.fixture(scope="module")
def tiny_backend(tiny_models):
    from slimlm.models.backends import open_backend

    backend = open_backend(tiny_models("llama"), "torch")
    yield backend
    backend.close()


def _ordered(stats):
    return stats["min"] <= stats["median"] <= stats["max"]


def test_measure_systems_on_a_tiny_model(tiny_backend):
    out = measure_systems(tiny_backend, load_s=0.5, prompt_lengths=(16, 32), gen_tokens=8, repeat=2)
    assert set(out) == KEYS
    json.dumps(out)  # JSON-serialisable as returned
    assert out["backend"] == "torch" and out["load_s"] == 0.5 and out["repeat"] == 2
    assert out["prompt_lengths"] == [16, 32]
    for n in ("16", "32"):
        assert abs(out["prompt_tokens"][n] - int(n)) <= 2
        assert out["prefill_tps"][n]["min"] > 0 and _ordered(out["prefill_tps"][n])
        assert _ordered(out["ttft_s_by_length"][n]) and _ordered(out["decode_tps_by_length"][n])
    assert out["ttft_s"] == out["ttft_s_by_length"]["16"] and out["ttft_s"]["min"] > 0
    assert out["decode_tps"]["min"] > 0 and _ordered(out["decode_tps"])
    # prefill rate is prompt tokens (16, or a token or two fewer) over time to first token, run by run,
    # so the slowest prefill is the longest first-token time's
    slowest, longest = out["prefill_tps"]["16"]["min"], out["ttft_s"]["max"]
    assert 14 / longest * 0.999 <= slowest <= 16 / longest * 1.001

    params = sum(p.numel() for p in tiny_backend.model.parameters())
    assert out["params_total"] == params and out["params_active"] == params
    matrices = sum(p.numel() for p in tiny_backend.model.parameters() if p.ndim >= 2)
    embedding = tiny_backend.model.get_input_embeddings().weight.numel()
    assert out["flops_per_token"] == 2 * (matrices - embedding)  # the tiny model's output head is its own
    assert out["size_bytes"] > params * 4  # fp32 safetensors plus tokenizer files
    assert out["peak_rss_bytes"] > 10 * 2**20

    work = out["workload"]
    assert work["requests"] == 4 and work["output_tokens"] > 0
    assert abs(work["input_tokens"] - 2 * (16 + 32)) <= 8
    assert out["energy_source"].startswith(("measured (RAPL)", "estimated (CPU time"))
    assert out["energy_j_per_1k_tokens"] > 0

    # cost and API pricing follow from the workload by the documented formulas
    parts = out["cost_breakdown"]
    assert out["cost_per_1m_tokens_local"] == pytest.approx(parts["hardware_usd"] + parts["energy_usd"])
    assert parts["seconds"] == pytest.approx(work["seconds"] / (work["input_tokens"] + work["output_tokens"]) * 1e6)
    prices = load_api_prices()
    assert out["api_prices_as_of"] == prices["as_of"]
    assert out["api_cost_per_1m"] == pytest.approx(api_cost_per_1m(work["input_tokens"], work["output_tokens"], prices))
    assert parts["assumptions"]["cpu_watts_per_core"] == CostConfig().cpu_watts_per_core


def test_quick_is_one_short_measurement(tiny_backend):
    out = measure_systems(tiny_backend, prompt_lengths=(24, 48), gen_tokens=64, repeat=5, quick=True)
    assert out["quick"] and out["repeat"] == 1 and out["gen_tokens"] == 16
    assert out["prompt_lengths"] == [24] and out["workload"]["requests"] == 1
    assert out["load_s"] is None
    assert out["ttft_s"]["min"] == out["ttft_s"]["median"] == out["ttft_s"]["max"]


def test_lengths_over_the_context_are_skipped_with_a_note(tiny_backend):
    ctx = tiny_backend.model.config.max_position_embeddings  # 256 in the tiny configs
    out = measure_systems(tiny_backend, prompt_lengths=(16, ctx), gen_tokens=4, repeat=1)
    assert out["prompt_lengths"] == [16] and list(out["prefill_tps"]) == ["16"]
    assert any(f"prompt length {ctx} skipped" in note for note in out["notes"])
    with pytest.raises(SlimlmError, match="fits the model's context"):
        measure_systems(tiny_backend, prompt_lengths=(ctx,), gen_tokens=4, repeat=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(repeat=0), "--repeat"),
    (dict(gen_tokens=0), "--gen-tokens"),
    (dict(prompt_lengths=()), "--prompt-lengths"),
    (dict(prompt_lengths=(16, -3)), "--prompt-lengths"),
    (dict(prompt_lengths=(0,)), "--prompt-lengths"),
])
def test_bad_inputs_are_one_line_errors(tiny_backend, kwargs, match):
    with pytest.raises(SlimlmError, match=match) as err:
        measure_systems(tiny_backend, **kwargs)
    assert "\n" not in str(err.value)


def test_run_bench_rejects_bad_inputs_before_loading(tmp_path):
    # the model does not exist: the input check must answer first, not the loader
    with pytest.raises(SlimlmError, match="--repeat"):
        run_bench(str(tmp_path / "missing"), "torch", repeat=0)


def test_run_bench_times_the_load(tiny_models):
    out = run_bench(str(tiny_models("llama")), "torch", prompt_lengths=(16,), gen_tokens=4, repeat=1)
    assert out["load_s"] > 0 and out["backend"] == "torch"


def test_run_bench_records_its_run(tiny_models):
    """The library records the run (not the CLI), so `slimlm bench` and a Python caller both leave one."""
    from slimlm.runs import get_run

    out = run_bench(str(tiny_models("llama")), "torch", prompt_lengths=(16,), gen_tokens=4, repeat=1)
    run = get_run(out["run_id"])
    assert run.command == "bench" and run.params["prompt_lengths"] == [16]
    assert run.metrics["systems"]["load_s"] == out["load_s"]
    assert "run_id" not in run_bench(str(tiny_models("llama")), "torch", prompt_lengths=(16,), gen_tokens=4,
                                     repeat=1, record=False)
