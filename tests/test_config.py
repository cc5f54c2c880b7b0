"""Configs as data: the strict YAML loader (slimlm.config), the finetune/distill config dataclasses,
the shipped recipes, and the CLI's --config handling that needs no model (a bad recipe fails before
anything loads). Training through --config is tested with the tiny models in tests/train/."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slimlm.config import fields_of, load_config, make_config, replace_checked
from slimlm.errors import SlimlmError
from slimlm.train.configs import DistillConfig, FinetuneConfig
from slimlm.train.core import TrainConfig
from tests.conftest import ROOT, run_cli

RECIPES = {"lora-finetune.yaml": FinetuneConfig, "distill-logit.yaml": DistillConfig}


@dataclass
class Inner:
    depth: int = 1
    names: list[str] | None = None


@dataclass
class Middle:
    rate: float = 0.5
    inner: Inner = field(default_factory=lambda: Inner(depth=7))


@dataclass
class Outer:
    name: str
    where: Path | None = None
    flag: bool = False
    mode: str | bool = "auto"
    middle: Middle = field(default_factory=Middle)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def one_line_error(call) -> str:
    with pytest.raises(SlimlmError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_nested_sections_start_from_the_field_default(tmp_path):
    path = write(tmp_path, "name: run\nwhere: out/dir\nmiddle:\n  inner:\n    names: [a, b]\n")
    got = load_config(Outer, path)
    assert got == Outer("run", Path("out/dir"), middle=Middle(inner=Inner(depth=7, names=["a", "b"])))
    assert isinstance(got.where, Path)
    # distill's train section keeps distill's learning rate unless the recipe names one
    assert load_config(DistillConfig, {"train": {"max_steps": 5}}).train == TrainConfig(lr=1e-4, max_steps=5)
    assert load_config(FinetuneConfig, {"train": {"max_steps": 5}}).train == TrainConfig(max_steps=5)


def test_unknown_key_names_the_key_the_section_and_the_allowed_keys(tmp_path):
    message = one_line_error(lambda: load_config(Outer, write(tmp_path, "name: x\nmiddle:\n  inner:\n    deep: 2\n")))
    assert message == f"{tmp_path / 'recipe.yaml'}: unknown key 'deep' in section 'middle.inner': allowed keys are " \
                      "depth, names"
    message = one_line_error(lambda: load_config(FinetuneConfig, {"rnak": 8}))
    assert "unknown key 'rnak' at the top level" in message and "rank" in message and "train" in message
    message = one_line_error(lambda: load_config(FinetuneConfig, {"train": {"learning_rate": 1e-3}}))
    assert "'learning_rate' in section 'train'" in message and "lr, max_grad_norm" in message
    # the run folder comes from --out, never from a recipe
    message = one_line_error(lambda: load_config(DistillConfig, {"train": {"out": "somewhere"}}))
    assert "unknown key 'out'" in message and "out" not in fields_of(TrainConfig)


def test_wrong_types_are_named(tmp_path):
    cases = [({"train": {"lr": "fast"}}, "train.lr must be a number, not the string 'fast'"),
             ({"rank": 8.5}, "rank must be an integer, not the number 8.5"),
             ({"rank": True}, "rank must be an integer, not the boolean True"),
             ({"merge": "yes"}, "merge must be true or false, not the string 'yes'"),
             ({"merge": 1}, "merge must be true or false, not the integer 1"),
             ({"seq_len": None}, "seq_len must be an integer, not null"),
             ({"target_modules": "q_proj"}, "target_modules must be a list of strings or null, not the string"),
             ({"target_modules": ["q_proj", 3]}, "target_modules must be a list of strings or null"),
             ({"train": 3}, "train must be a section (a mapping of TrainConfig settings), not the integer 3"),
             ({"train": {"bf16": 2}}, "train.bf16 must be a string or true or false, not the integer 2")]
    for data, expected in cases:
        assert expected in one_line_error(lambda: load_config(FinetuneConfig, data)), data
    assert "missing key 'name'" in one_line_error(lambda: load_config(Outer, {}))


def test_yaml_numbers_and_coercions(tmp_path):
    got = load_config(FinetuneConfig, write(tmp_path, "alpha: 16\neval_fraction: 0\ntrain:\n  lr: 2e-4\n"
                                                      "  max_grad_norm: null\n  bf16: false\n"))
    assert got.train.lr == 2e-4 and isinstance(got.train.lr, float)  # YAML 1.1 would read the string '2e-4'
    assert got.alpha == 16.0 and isinstance(got.alpha, float) and got.eval_fraction == 0.0
    assert got.train.max_grad_norm is None and got.train.bf16 is False
    assert load_config(FinetuneConfig, write(tmp_path, "# only comments\n")) == FinetuneConfig()


def test_bad_files_are_one_line_errors(tmp_path):
    assert "not found" in one_line_error(lambda: load_config(FinetuneConfig, tmp_path / "missing.yaml"))
    assert "cannot be read" in one_line_error(lambda: load_config(FinetuneConfig, tmp_path))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00rank")
    assert "is not text" in one_line_error(lambda: load_config(FinetuneConfig, tmp_path / "binary.yaml"))
    assert "is not valid YAML at line 2" in one_line_error(
        lambda: load_config(FinetuneConfig, write(tmp_path, "rank: 4\n  seq_len: 5\n")))
    assert "at line 3, column 3: key 'lr' is given twice" in one_line_error(
        lambda: load_config(FinetuneConfig, write(tmp_path, "train:\n  lr: 1e-3\n  lr: 1e-4\n")))
    assert "a recipe is a mapping" in one_line_error(lambda: load_config(FinetuneConfig, write(tmp_path, "- 1\n")))


def test_python_overrides_are_checked_by_name_and_type():
    base = FinetuneConfig(rank=4)
    assert replace_checked(base, rank=8, train={"lr": 1e-3}) == FinetuneConfig(rank=8, train=TrainConfig(lr=1e-3))
    with pytest.raises(TypeError, match="unknown key 'rnak'.*allowed keys are alpha, curriculum, curriculum_buckets, dropout"):
        replace_checked(base, rnak=8)
    with pytest.raises(TypeError, match="rank must be an integer"):
        replace_checked(base, rank="8")
    assert make_config(FinetuneConfig, {"rank": 2}, rank=3).rank == 3
    with pytest.raises(TypeError, match="must be a FinetuneConfig, a YAML path or a mapping, not a TrainConfig"):
        make_config(FinetuneConfig, TrainConfig())


def test_library_verbs_check_settings_before_loading_anything(tmp_path):
    from slimlm.train.distill import distill
    from slimlm.train.finetune import finetune

    with pytest.raises(TypeError, match="finetune\\(\\): unknown key 'rnak'"):
        finetune("no-such-model", "no-such-data", tmp_path / "x", rnak=4)
    with pytest.raises(SlimlmError, match="only with --mode logit"):
        distill("no-teacher", "no-student", "no-data", tmp_path / "y", mode="sequence", on_policy=0.5)
    with pytest.raises(SlimlmError, match="unknown schedule"):
        finetune("no-such-model", "no-such-data", tmp_path / "z", {"train": {"schedule": "step"}})
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_validate_moves_the_settings_checks_into_the_config():
    for bad, match in [(FinetuneConfig(method="qlora"), "unknown method 'qlora'"),
                       (FinetuneConfig(method="full", merge=True), "--merge folds an adapter"),
                       (FinetuneConfig(method="dora", gguf=True), "which dora is not"),
                       (FinetuneConfig(eval_fraction=1.0), "--eval-fraction 1.0"),
                       (FinetuneConfig(train=TrainConfig(batch_size=0)), "batch-size"),
                       (DistillConfig(mode="token"), "unknown mode 'token'"),
                       (DistillConfig(loss="kl"), "unknown distillation loss 'kl'"),
                       (DistillConfig(on_policy=1.5), "must be in \\[0, 1\\]"),
                       (DistillConfig(method="lora", merge=False, mode="sequence", on_policy=0.2), "--mode logit")]:
        with pytest.raises(SlimlmError, match=match):
            bad.validate()
    assert DistillConfig(rank=8).adapter_alpha == 16 and DistillConfig(rank=8, lora_alpha=4).adapter_alpha == 4


def test_every_shipped_recipe_loads_and_validates():
    shipped = sorted(p.name for p in (ROOT / "examples" / "recipes").glob("*.yaml"))
    assert shipped == sorted(RECIPES), "a recipe in examples/recipes/ has no test here"
    finetune = load_config(FinetuneConfig, ROOT / "examples" / "recipes" / "lora-finetune.yaml").validate()
    assert finetune.method == "lora" and finetune.merge and finetune.train.max_steps == 200
    assert finetune.train.grad_accum == 2 and finetune.train.lr == 2e-4
    # README's prune-then-distill command: --seq-len 128 --max-steps 64 --lr 3e-4 --warmup-steps 6
    distill = load_config(DistillConfig, ROOT / "examples" / "recipes" / "distill-logit.yaml").validate()
    assert distill == DistillConfig(seq_len=128, train=TrainConfig(lr=3e-4, max_steps=64, warmup_steps=6))


@pytest.mark.parametrize("verb", ["finetune", "distill"])
def test_cli_defaults_are_the_config_defaults(verb):
    """The CLI applies only the options the user typed, so its --help defaults must be the config's."""
    import typer

    from slimlm.cli import app
    from slimlm.cli.distill import DISTILL_FLAGS
    from slimlm.cli.train import FINETUNE_FLAGS

    flags, config = (FINETUNE_FLAGS, FinetuneConfig()) if verb == "finetune" else (DISTILL_FLAGS, DistillConfig())
    command = typer.main.get_command(app).commands[verb]
    params = {p.name: p for p in command.params}
    for param, name in flags.items():
        section, _, key = name.rpartition(".")
        expected = getattr(getattr(config, section) if section else config, key)
        default = params[param].default
        assert default == expected or (default in (False, None, ()) and expected in (None, False)), (param, default)


def test_bad_config_on_the_cli_is_one_stderr_line(tmp_path, capfd):
    recipe = write(tmp_path, "rank: 8\ntrain:\n  lr: fast\n")
    for verb in (["finetune", "some-model"], ["distill", "--teacher", "t", "--student", "s"]):
        code, stdout, err = run_cli(capfd, *verb, "--data", "d.jsonl", "--out", tmp_path / "out", "--config", recipe)
        assert code == 1 and err == f"error: {recipe}: train.lr must be a number, not the string 'fast'\n", err
        assert "Traceback" not in err and not stdout
    code, _, err = run_cli(capfd, "finetune", "m", "--data", "d", "--out", tmp_path / "o", "--config",
                           write(tmp_path, "ranks: 8\n"))
    assert code == 1 and err.count("\n") == 1 and "unknown key 'ranks' at the top level" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
