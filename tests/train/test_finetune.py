"""Fine-tuning as a user meets it: LoRA/DoRA/full on the tiny random models, the folders it
writes (loadable by peft and by slimlm), and `slimlm finetune` through the real entry point."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.models.loading import load_torch
from slimlm.runs import read_manifest
from slimlm.train import TrainConfig, finetune
from slimlm.train.core import causal_lm_loss
from slimlm.train.data import collate, load_data
from slimlm.train.finetune import DEFAULT_TARGETS, linear_names, resolve_targets
from tests.conftest import run_cli

PAIRS = [("What is the capital of France?", "Paris."), ("Two plus two?", "Four."),
         ("Colour of the sky?", "Blue."), ("Opposite of hot?", "Cold.")]
IDS = torch.tensor([[3, 40, 77, 120, 200, 33, 91, 250, 300, 17]])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS * 3))
    return path


def quick(steps: int = 3, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(lr=1e-2, max_steps=steps, batch_size=4, eval_every=0, save_every=0), **kw})


def logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_learns_and_the_adapter_reloads(tiny_models, pairs, tmp_path):
    from peft import PeftModel

    folder = tiny_models("llama")
    base, tok = load_torch(folder)
    batch = collate(load_data(pairs, tok, eval_fraction=0).train)
    before = causal_lm_loss(base, batch)[0].item()
    result = finetune(folder, pairs, tmp_path / "lora", train=quick(10, lr=2e-2), eval_fraction=0)
    after = causal_lm_loss(result.model.eval(), batch)[0].item()
    assert after < 0.5 * before  # a tiny repeated data set is learned
    assert result.targets == list(DEFAULT_TARGETS["llama"]) and 0 < result.trainable_params < result.total_params

    out = tmp_path / "lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "slimlm.json", "loss.png",
            "train_log.jsonl"} <= {p.name for p in out.iterdir()}
    reloaded = PeftModel.from_pretrained(load_torch(folder)[0], out)
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)
    manifest = read_manifest(out)
    assert manifest["operation"] == "finetune" and manifest["parent"]["path"] == str(folder)
    assert manifest["params"]["method"] == "lora" and manifest["metrics"]["steps"] == 10


def test_merged_model_equals_adapter_and_loads_in_slimlm(tiny_models, pairs, tmp_path):
    from peft import PeftModel

    folder = tiny_models("qwen2")
    out = tmp_path / "merged"
    finetune(folder, pairs, out, merge=True, train=quick(), eval_fraction=0)
    merged, _ = load_torch(out)  # slimlm's torch backend path
    adapter = PeftModel.from_pretrained(load_torch(folder)[0], out / "adapter")
    assert torch.allclose(logits(merged), logits(adapter), atol=1e-4)
    assert not torch.allclose(logits(merged), logits(load_torch(folder)[0]), atol=1e-3)  # training changed it
    assert read_manifest(out)["params"]["merged"] and read_manifest(out / "adapter")["operation"] == "finetune"


@pytest.mark.llamacpp
def test_gguf_adapter_in_llamacpp_equals_the_merged_model(tiny_models, pairs, tmp_path):
    """llama.cpp applying adapter.gguf to the exported base computes what the merged model does
    (Llama: lora_b takes the rotary row reordering of q/k)."""
    import llama_cpp  # required: fails, never skips, when missing
    import numpy as np

    from slimlm.compress.gguf_export import export_gguf

    folder, out = tiny_models("llama"), tmp_path / "tuned"
    finetune(folder, pairs, out, merge=True, gguf=True, train=quick(5, lr=3e-2), eval_fraction=0)
    export_gguf(folder, tmp_path / "base.gguf", dtype="f32")
    export_gguf(out, tmp_path / "merged.gguf", dtype="f32")

    def run(model, lora=None):
        extra = {"lora_path": str(lora)} if lora else {}
        llm = llama_cpp.Llama(model_path=str(model), logits_all=True, n_ctx=32, verbose=False, n_gpu_layers=0,
                              type_k=0, type_v=0, **extra)
        try:
            llm.eval(IDS[0].tolist())
            return np.array(llm.scores[: IDS.shape[1]], dtype=np.float32)
        finally:
            llm.close()

    base, merged = run(tmp_path / "base.gguf"), run(tmp_path / "merged.gguf")
    adapted = run(tmp_path / "base.gguf", out / "adapter" / "adapter.gguf")
    assert np.abs(base - merged).max() > 0.1  # the adapter matters
    assert np.allclose(adapted, merged, atol=1e-3)
    assert np.allclose(merged, logits(load_torch(out)[0])[0].numpy(), atol=1e-3)


@pytest.mark.parametrize("family", ["phi3", "gemma3_text"])
def test_dora_runs_on_other_families(tiny_models, pairs, tmp_path, family):
    from peft import PeftModel

    folder = tiny_models(family)
    result = finetune(folder, pairs, tmp_path / "dora", method="dora", rank=4,
                      train=quick(2, gradient_checkpointing=True))
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True
    assert result.targets == list(DEFAULT_TARGETS[family]) and result.train.eval_loss is not None
    reloaded = PeftModel.from_pretrained(load_torch(folder)[0], tmp_path / "dora")
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


def test_full_finetuning_writes_a_dense_folder(tiny_models, pairs, tmp_path):
    folder = tiny_models("llama")
    result = finetune(folder, pairs, tmp_path / "full", method="full", train=quick(2, lr=1e-3))
    assert result.adapter is None and result.trainable_params == result.total_params
    dense, _ = load_torch(tmp_path / "full")
    assert torch.allclose(logits(dense), logits(result.model), atol=1e-5)


def test_default_targets_exist_in_every_family():
    from transformers import AutoModelForCausalLM

    from slimlm.models.families import FAMILIES, tiny_config

    for model_type in FAMILIES:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size=384))
        targets = resolve_targets(model, None)
        assert targets and set(targets) <= set(linear_names(model)), model_type


def test_bad_target_lists_the_linear_modules(tiny_models, pairs, tmp_path):
    with pytest.raises(SlimlmError) as info:
        finetune(tiny_models("llama"), pairs, tmp_path / "x", target_modules=["q_proj,attn_qkv"], train=quick(1))
    message = str(info.value)
    assert "'attn_qkv' matches no module" in message and "down_proj, gate_proj, k_proj" in message
    with pytest.raises(SlimlmError, match="llama.cpp cannot apply DoRA|which dora is not"):
        finetune(tiny_models("llama"), pairs, tmp_path / "y", method="dora", gguf=True, train=quick(1))


def test_output_folder_is_protected(tiny_models, pairs, tmp_path):
    folder = tiny_models("llama")
    out = tmp_path / "run"
    finetune(folder, pairs, out, train=quick(2, save_every=1))
    with pytest.raises(SlimlmError, match="pass --resume to continue"):
        finetune(folder, pairs, out, train=quick(2, save_every=1))
    with pytest.raises(SlimlmError, match="lr 0.01 -> 0.02"):
        finetune(folder, pairs, out, train=quick(2, save_every=1, lr=2e-2), resume=True)
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    with pytest.raises(SlimlmError, match="not a slimlm output folder"):
        finetune(folder, pairs, stranger, train=quick(1), force=True)
    assert (stranger / "todo.txt").exists()


def test_cli_end_to_end(tiny_models, pairs, tmp_path, capfd):
    import slimlm.cli  # noqa: F401 - registers every verb

    folder, out = tiny_models("llama"), tmp_path / "cli"
    code, stdout, err = run_cli(capfd, "finetune", folder, "--data", pairs, "--out", out, "--max-steps", "2",
                                "--rank", "4", "--target", "q_proj", "--target", "v_proj", "--merge", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["targets"] == ["q_proj", "v_proj"] and result["merged"] and result["train"]["steps"] == 2
    assert (out / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()

    code, stdout, err = run_cli(capfd, "finetune", folder, "--data", pairs, "--out", out, "--max-steps", "2")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "--force" in err
    code, stdout, err = run_cli(capfd, "finetune", folder, "--data", pairs, "--out", out, "--max-steps", "2",
                                "--force", "--method", "lora")
    assert code == 0, err
    assert "held-out loss, perplexity" in stdout and "PeftModel.from_pretrained" in stdout
    code, stdout, _ = run_cli(capfd, "finetune", "--help")
    assert code == 0 and "slimlm finetune ./dense --data" in stdout and "--merge" in stdout


def test_cli_config_file_with_an_override_equals_the_flags(tiny_models, pairs, tmp_path, capfd):
    """`--config FILE` gives the settings and an option typed on the command line overrides the
    file's (--rank 4 over rank: 8, --max-steps 3 over 5): the run equals the one given as flags."""
    from safetensors.torch import load_file

    import slimlm.cli  # noqa: F401 - registers every verb

    folder, recipe = tiny_models("llama"), tmp_path / "recipe.yaml"
    recipe.write_text("rank: 8\ndropout: 0.0\ntarget_modules: [q_proj, v_proj]\neval_fraction: 0.25\n"
                      "train:\n  lr: 2e-2\n  max_steps: 5\n  batch_size: 2\n  seed: 3\n")
    flags = ["--rank", "4", "--dropout", "0", "--target", "q_proj", "--target", "v_proj", "--eval-fraction", "0.25",
             "--lr", "0.02", "--max-steps", "3", "--batch-size", "2", "--seed", "3"]
    code, by_flags, err = run_cli(capfd, "finetune", folder, "--data", pairs, "--out", tmp_path / "flags", *flags,
                                  "--json")
    assert code == 0, err
    code, by_file, err = run_cli(capfd, "finetune", folder, "--data", pairs, "--out", tmp_path / "file", "--config",
                                 recipe, "--rank", "4", "--max-steps", "3", "--json")
    assert code == 0, err
    a, b = json.loads(by_flags), json.loads(by_file)
    assert b["train"]["steps"] == 3 and b["targets"] == ["q_proj", "v_proj"]
    assert b["trainable_params"] == a["trainable_params"]  # rank 4, not the file's 8
    assert {k: b["train"][k] for k in ("steps", "tokens", "train_loss", "eval_loss")} == \
           {k: a["train"][k] for k in ("steps", "tokens", "train_loss", "eval_loss")}
    weights = [load_file(tmp_path / run / "adapter_model.safetensors") for run in ("flags", "file")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    params = [read_manifest(tmp_path / run)["params"] for run in ("flags", "file")]
    for p in params:
        p["train"].pop("out")
    assert params[0] == params[1]


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "phi3", "gemma2", "gemma3_text",
                                    "deepseek_v3"])
def test_matrix_finetune(family, tiny_models, pairs, tmp_path):
    """LoRA on each family's tiny model lowers the training loss and its adapter reloads."""
    from peft import PeftModel

    folder = tiny_models(family)
    base, tok = load_torch(folder)
    batch = collate(load_data(pairs, tok, eval_fraction=0).train)
    before = causal_lm_loss(base, batch)[0].item()
    result = finetune(folder, pairs, tmp_path / "lora", train=quick(4, lr=2e-2), eval_fraction=0,
                      record_run=False)
    assert causal_lm_loss(result.model.eval(), batch)[0].item() < before
    reloaded = PeftModel.from_pretrained(load_torch(folder)[0], tmp_path / "lora")
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)


def test_qlora_on_a_slimlm_quantized_base(tiny_models, pairs, tmp_path):
    """LoRA on a 4-bit packed base (QLoRA-style): the packed weights stay frozen and unchanged,
    the adapter learns, and reloading it onto the quantized base gives the trained logits.
    Merging, DoRA and full training are refused: they need float base weights."""
    from slimlm.compress.quantize import quantize
    from slimlm.train.qlora import load_adapter, packed_linear_class

    q4 = tmp_path / "q4"
    quantize(str(tiny_models("llama")), q4, method="rtn", format="hf", bits=4, check=False, record=False)
    base, tok = load_torch(q4)
    packed = [m for m in base.modules() if isinstance(m, packed_linear_class())]
    assert packed and set(DEFAULT_TARGETS["llama"]) <= set(linear_names(base))
    codes_before = [m.qweight.clone() for m in packed]
    batch = collate(load_data(pairs, tok, eval_fraction=0).train)
    before = causal_lm_loss(base, batch)[0].item()
    result = finetune(q4, pairs, tmp_path / "qlora", train=quick(4, lr=2e-2), eval_fraction=0, record_run=False)
    assert causal_lm_loss(result.model.eval(), batch)[0].item() < before
    trained = [m for m in result.model.modules() if isinstance(m, packed_linear_class())]
    assert all(torch.equal(m.qweight, c) for m, c in zip(trained, codes_before))
    reloaded = load_adapter(load_torch(q4)[0], tmp_path / "qlora")
    assert torch.allclose(logits(reloaded), logits(result.model), atol=1e-5)
    for kw in ({"merge": True}, {"method": "dora"}, {"method": "full"}):
        with pytest.raises(SlimlmError, match="quantized"):
            finetune(q4, pairs, tmp_path / "no", train=quick(1), eval_fraction=0, record_run=False, **kw)
