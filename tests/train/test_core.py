"""The training loop: its loss, gradient accumulation, exact resume, early stop and records.

Everything runs on the tiny random llama from conftest (two layers, width 64), for a few steps,
so the checks are about the loop's arithmetic and bookkeeping, not about learning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.models.loading import load_torch
from slimlm.train import TrainConfig, Trainer, causal_lm_loss
from slimlm.train.data import IGNORE, collate
from slimlm.train.finetune import add_adapter


def examples(n: int, seed: int = 0, lengths: tuple[int, int] = (12, 24), masked: bool = True) -> list[dict]:
    """Random token sequences of varying length; the first few labels masked like a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        ids = torch.randint(5, 380, (length,), generator=g).tolist()
        labels = [IGNORE] * 4 + ids[4:] if masked else list(ids)
        out.append({"input_ids": ids, "labels": labels})
    return out


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_default_loss_is_transformers_loss(tiny_models):
    model, _ = load_torch(tiny_models("llama"))
    batch = collate(examples(3))  # padded, with masked prompt positions
    ours, n = causal_lm_loss(model, batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert n == (batch["labels"][:, 1:] != IGNORE).sum()


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one precision per process; a test that asks for another (fp32 on a CPU
    whose default is bf16) gets a fresh state and leaves one behind, as accelerate's own tests do."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_gradient_accumulation_equals_one_big_batch(tiny_models, tmp_path, monkeypatch, fresh_accelerator_state):
    """Batch 4 x 1 and batch 2 x 2 give the same step, though the examples differ in length.

    SGD stands in for AdamW here: Adam's first step is about lr * sign(gradient), which would
    hide a wrongly weighted gradient; with SGD the update is the gradient itself.
    """
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    data = examples(8, seed=1)
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model, _ = load_torch(tiny_models("llama"))
        # fp32: bf16 autocast (the default on CPUs with native bf16) rounds the two splits apart
        cfg = TrainConfig(lr=0.5, max_steps=1, batch_size=batch_size, grad_accum=accum, schedule="constant",
                          max_grad_norm=None, eval_every=0, save_every=0, out=str(tmp_path / f"b{batch_size}"),
                          bf16=False)
        before = weights(model)
        Trainer(model, cfg, data).train()
        results.append({k: v - before[k] for k, v in weights(model).items()})
    assert any(d.abs().max() > 1e-4 for d in results[0].values())  # the step did move the weights
    for name, delta in results[0].items():
        assert torch.allclose(delta, results[1][name], atol=1e-6), name


def _lora_run(folder: Path, out: Path, **overrides):
    """A LoRA model (dropout on, so resuming must restore the RNG) and a trainer over 14 examples:
    batch 2 x accumulation 2 gives 4 steps an epoch, the last one a single micro-batch."""
    from accelerate.utils import set_seed

    model, _ = load_torch(folder)
    set_seed(0)
    model = add_adapter(model, "lora", rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    cfg = TrainConfig(**{**dict(lr=5e-3, max_steps=6, batch_size=2, grad_accum=2, warmup_steps=1, eval_every=2,
                                save_every=0, out=str(out)), **overrides})
    return model, Trainer(model, cfg, examples(14, seed=2), examples(4, seed=3))


def test_resume_continues_exactly(tiny_models, tmp_path):
    folder = tiny_models("llama")
    straight_model, straight = _lora_run(folder, tmp_path / "straight")
    full = straight.train()
    assert full.steps == 6 and full.stopped == "done"

    _, first = _lora_run(folder, tmp_path / "split")
    paused = first.train(until_step=3)  # mid-epoch: the rest of the epoch must come from the data position
    assert paused.stopped == "paused"
    assert (tmp_path / "split" / "checkpoints" / "step-3" / "trainer_state.json").exists()
    resumed_model, second = _lora_run(folder, tmp_path / "split")
    rest = second.train(resume=True)
    assert rest.steps == 6 and rest.stopped == "done"

    def losses(history):
        return [(r["step"], r["loss"]) for r in history if "loss" in r]

    assert [s for s, _ in losses(rest.history)] == [1, 2, 3, 4, 5, 6]  # the log keeps the first slice's rows
    for (s1, a), (s2, b) in zip(losses(full.history), losses(rest.history)):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5), s1
    w1, w2 = weights(straight_model), weights(resumed_model)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    assert rest.eval_loss == pytest.approx(full.eval_loss, rel=1e-5)


def test_resume_refuses_other_settings(tiny_models, tmp_path):
    folder = tiny_models("llama")
    _, trainer = _lora_run(folder, tmp_path, max_steps=4)
    trainer.train(until_step=1)
    _, changed = _lora_run(folder, tmp_path, max_steps=4, lr=1e-3, grad_accum=1, eval_every=1)  # eval_every may change
    with pytest.raises(SlimlmError) as info:
        changed.train(resume=True)
    message = str(info.value)
    assert "grad_accum 2 -> 1" in message and "lr 0.005 -> 0.001" in message and "eval_every" not in message
    with pytest.raises(SlimlmError, match="no checkpoint"):
        _lora_run(folder, tmp_path / "fresh")[1].train(resume=True)


def test_early_stop_and_records(tiny_models, tmp_path):
    """A held-out loss that never improves stops the run after `patience` evaluations."""
    model, _ = load_torch(tiny_models("llama"))
    flat = lambda model, batch: (torch.tensor(2.0), torch.tensor(10))  # noqa: E731
    cfg = TrainConfig(lr=1e-3, max_steps=50, batch_size=2, eval_every=1, early_stop_patience=2, save_every=0,
                      out=str(tmp_path))
    result = Trainer(model, cfg, examples(8), examples(2), eval_loss_fn=flat).train()
    assert result.stopped == "early_stop" and result.steps == 3  # best at step 1, no better at 2 and 3
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r["perplexity"] == pytest.approx(7.389, rel=1e-3) for r in rows if "eval_loss" in r)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_budget_and_checkpoint_pruning(tiny_models, tmp_path):
    model, _ = load_torch(tiny_models("llama"))
    data = examples(16, lengths=(16, 16))
    cfg = TrainConfig(max_steps=100, batch_size=2, max_tokens=100, save_every=1, keep_checkpoints=2, eval_every=0,
                      out=str(tmp_path))
    result = Trainer(model, cfg, data).train()
    assert result.stopped == "max_tokens" and result.steps == 4 and result.tokens == 128  # 32 tokens a step
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(SlimlmError, match="unknown schedule"):
        TrainConfig(schedule="step", out=str(tmp_path)).validate()
    with pytest.raises(SlimlmError, match="batch-size"):
        TrainConfig(batch_size=0, out=str(tmp_path)).validate()


def test_bf16_only_where_the_hardware_has_it():
    from slimlm.hardware import cpu_info
    from slimlm.train.core import mixed_precision

    if not torch.cuda.is_available():
        assert mixed_precision("auto") == ("bf16" if cpu_info().native_bf16 else "no")
    assert mixed_precision(False) == "no" and mixed_precision(True) == "bf16"


SCRIPT = """
import json, sys
from pathlib import Path
from slimlm.models.loading import load_torch
from slimlm.train import TrainConfig, Trainer

folder, out = sys.argv[1], Path(sys.argv[2])
model, _ = load_torch(folder)
data = [{"input_ids": list(range(i, i + 16))} for i in range(1, 17)]
cfg = TrainConfig(max_steps=2, batch_size=2, save_every=2, eval_every=0, lr=1e-3, out=str(out))
trainer = Trainer(model, cfg, data, data[:4])
result = trainer.train()
acc = trainer.accelerator
total = sum(p.double().sum().item() for p in trainer.unwrapped_model.parameters())
(out / f"rank-{acc.process_index}.json").write_text(json.dumps(
    {"world": acc.num_processes, "steps": result.steps, "tokens": result.tokens, "weights": total}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_with_accelerate_launch(tiny_models, tmp_path):
    """The same Trainer under `accelerate launch` on two CPU processes (gloo): both run, gradients
    are averaged (identical weights after the step), and one checkpoint holds both RNG states.

    accelerate's `--cpu` launcher starts several processes only through MPI; `--multi_gpu` uses
    torchrun, and the Trainer asks for CPU processes itself when there is no GPU."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(script), str(tiny_models("llama")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    assert ranks[0]["tokens"] == 2 * 2 * 2 * 16  # steps x processes x batch x length
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], abs=1e-9)
    checkpoint = out / "checkpoints" / "step-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= files
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
