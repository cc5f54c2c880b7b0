"""Distillation as a user meets it, on tiny random models: a 2-layer teacher and a 1-layer student
pruned from it (the prune-then-distill recipe), sharing a tokenizer; and a student with another
tokenizer, which only sequence-level distillation can teach."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.data import python_docs
from slimlm.errors import SlimlmError
from slimlm.models.loading import load_torch
from slimlm.runs import list_runs, read_manifest
from slimlm.train import TrainConfig, finetune
from slimlm.train.data import IGNORE, collate, load_data
from slimlm.train.distill import distill
from slimlm.train.losses import TopK, distill_loss
from slimlm.train.teacher_cache import TeacherCache
from tests.conftest import CHATML, build_tiny_model, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SEQ = 64
PAIRS = [("What is the capital of France?", "Paris."), ("Two plus two?", "Four."),
         ("Colour of the sky?", "Blue."), ("Opposite of hot?", "Cold."), ("A prime number?", "Seven.")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU its spin-waiting costs time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_models, tiny_tokenizer_dir, tmp_path_factory):
    """(teacher, student): the tiny llama, and another random tiny llama (other seed) with half its
    layers pruned away, so the student starts far from the teacher."""
    from slimlm.compress.prune import prune

    teacher, folder = tiny_models("llama"), tmp_path_factory.mktemp("student")
    other = build_tiny_model("llama", tiny_tokenizer_dir, folder / "other", seed=1)
    prune(other, folder / "half", method="layers", ratio=0.5, calib=python_docs()[:2], calib_samples=2,
          calib_seq_len=16, record=False, progress=False)
    return teacher, folder / "half"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "a.txt").write_text("\n\n".join(python_docs()[10:13]))
    (folder / "b.txt").write_text(python_docs()[20][:2000])  # ~12 blocks of 64 tokens
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS * 2))
    return folder


@pytest.fixture(scope="module")
def other_student(tmp_path_factory):
    """A tiny llama with its own, different tokenizer (a smaller BPE vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(python_docs()[:20], trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="</s>")
    fast.chat_template = CHATML
    tok_dir = tmp_path_factory.mktemp("other-tok")
    fast.save_pretrained(tok_dir)
    return build_tiny_model("llama", tok_dir, tmp_path_factory.mktemp("other") / "model", seed=3)


def quick(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"lr": 3e-3, "max_steps": steps, "batch_size": 8, "eval_every": 0, "save_every": 0, **kw})


def held_out_kl(teacher, student, blocks) -> float:
    """Mean KL(teacher || student) per labelled position of the held-out blocks, full vocabulary."""
    t, s = load_torch(teacher)[0], load_torch(student)[0]
    batch = collate(blocks)
    with torch.no_grad():
        lt = torch.log_softmax(t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        ls = torch.log_softmax(s(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    mask = batch["labels"][:, 1:] != IGNORE
    kl = (lt.exp() * (lt - ls)).sum(-1)[:, :-1]
    return float(kl[mask].mean())


def test_logit_distillation_beats_cross_entropy_on_fidelity(models, text, tmp_path):
    teacher, student = models
    data = text / "a.txt"
    kd = distill(teacher, student, data, tmp_path / "kd", train=quick(25, lr=1e-2), seq_len=SEQ, eval_fraction=0.2)
    ce = finetune(student, data, tmp_path / "ce", method="full", train=quick(25, lr=1e-2), seq_len=SEQ,
                  eval_fraction=0.2)
    assert kd.train.steps == ce.train.steps == 25 and kd.train.tokens == ce.train.tokens
    held = load_data(data, load_torch(student)[1], seq_len=SEQ, eval_fraction=0.2).eval
    before, after_kd, after_ce = (held_out_kl(teacher, m, held) for m in (student, tmp_path / "kd", tmp_path / "ce"))
    assert after_kd < 0.8 * min(before, after_ce), (before, after_kd, after_ce)  # measured: 3.2 vs 5.1 and 5.2
    assert kd.cache_bytes_per_token < 1024 and not kd.cache_reused
    manifest = read_manifest(tmp_path / "kd")
    assert manifest["operation"] == "distill" and manifest["parent"]["path"] == str(student)
    assert manifest["params"]["teacher"]["path"] == str(teacher) and manifest["params"]["kind"] == "forward_kl"
    assert {"config.json", "model.safetensors", "loss.png", "train_log.jsonl"} <= {p.name for p in kd.out.iterdir()}
    assert list_runs(command="distill")[0].artifact == str(tmp_path / "kd")


def test_training_loss_is_the_loss_from_the_cache(models, text, tmp_path):
    """Step 1's logged loss (one shuffled batch holding every example) equals distill_loss against the
    cache read back by index, and the cache holds the live teacher's top-k."""
    teacher, student = models
    data = text / "b.txt"
    tok = load_torch(student)[1]
    train = load_data(data, tok, seq_len=SEQ, eval_fraction=0).train
    kw = {"weight_ce": 0.3, "temperature": 2.0, "beta": 0.3}
    result = distill(teacher, student, data, tmp_path / "one", loss="jsd", top_k=16, eval_fraction=0, seq_len=SEQ,
                     train=quick(1, batch_size=len(train), lr=1e-9), **kw)
    logged = json.loads((tmp_path / "one" / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    cache = TeacherCache.open(result.cache)
    batch = collate([dict(ex, index=i) for i, ex in enumerate(train)])
    width = batch["input_ids"].shape[1]
    ids, lp = torch.zeros(len(train), width, 16, dtype=torch.long), torch.zeros(len(train), width, 16)
    teacher_model = load_torch(teacher)[0]
    for i, ex in enumerate(train):
        top = cache.topk(i)
        ids[i, :len(top.ids)], lp[i, :len(top.ids)] = top.ids, top.logprobs
        with torch.no_grad():
            live = torch.log_softmax(teacher_model(input_ids=torch.tensor([ex["input_ids"]])).logits[0], -1)
        assert torch.allclose(live.gather(-1, top.ids), top.logprobs, atol=2e-3)
    with torch.no_grad():
        logits = load_torch(student)[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    direct = distill_loss(logits, batch["labels"], TopK(ids, lp), vocab_size=len(tok), kind="jsd", alpha=0.1, **kw)
    assert logged == pytest.approx(float(direct), rel=1e-4)


def test_cache_is_reused_and_refused_for_other_data(models, text, tmp_path):
    teacher, student = models
    first = distill(teacher, student, text / "b.txt", tmp_path / "s1", train=quick(1), seq_len=SEQ)
    shards = {p: p.stat().st_mtime_ns for p in first.cache.glob("shard-*")}
    second = distill(teacher, tmp_path / "s1", text / "b.txt", tmp_path / "s2", train=quick(1), seq_len=SEQ)
    assert not first.cache_reused and second.cache_reused and second.cache == first.cache
    assert {p: p.stat().st_mtime_ns for p in first.cache.glob("shard-*")} == shards  # nothing recomputed
    with pytest.raises(SlimlmError, match="other training sequences"):
        distill(teacher, student, text / "a.txt", tmp_path / "s3", cache=first.cache, train=quick(1), seq_len=SEQ)


def test_vocabulary_mismatch_names_sequence_mode(models, other_student, text, tmp_path):
    with pytest.raises(SlimlmError, match="--mode sequence") as info:
        distill(models[0], other_student, text / "b.txt", tmp_path / "x", train=quick(1))
    assert "\n" not in str(info.value)


def test_sequence_mode_across_tokenizers_and_resume(models, other_student, text, tmp_path, monkeypatch):
    import slimlm.models.backends.batch as seq  # the torch backend's batched generation (generate_batch)

    teacher, answers = models[0], tmp_path / "answers.jsonl"
    calls = []
    real = seq.generate_batch
    monkeypatch.setattr(seq, "generate_batch", lambda m, prompts, *a, **k: calls.append(len(prompts)) or
                        real(m, prompts, *a, **k))
    opts = {"mode": "sequence", "cache": answers, "max_new_tokens": 6, "gen_batch_size": 3, "backend": "torch",
            "eval_fraction": 0.2, "seq_len": SEQ}
    result = distill(teacher, other_student, text / "pairs.jsonl", tmp_path / "seq", train=quick(3), **opts)
    lines = answers.read_text().splitlines()
    n = len(lines) - 1
    assert json.loads(lines[0])["teacher"] == str(teacher) and n == 8 and sum(calls) == n  # 10 pairs, 2 held out
    assert result.train.steps == 3 and result.data["train_examples"] == n and not result.cache_reused
    assert result.data["eval_examples"] == 2 and result.train.eval_loss is not None
    before = load_torch(other_student)[0].state_dict()
    after = load_torch(tmp_path / "seq")[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(x) for x in lines[1:]]
    assert all(r["prompt"][-1]["role"] == "user" for r in records)

    answers.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed while writing the third answer
    calls.clear()
    distill(teacher, other_student, text / "pairs.jsonl", tmp_path / "seq2", train=quick(1), **opts)
    assert sum(calls) == n - 2  # only the missing answers were generated
    assert [json.loads(x) for x in answers.read_text().splitlines()[1:]] == records  # greedy: the same answers
    with pytest.raises(SlimlmError, match="other settings"):
        distill(teacher, other_student, text / "pairs.jsonl", tmp_path / "seq3", train=quick(1),
                **dict(opts, max_new_tokens=7))
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(reversed((text / "pairs.jsonl").read_text().splitlines(keepends=True))))
    with pytest.raises(SlimlmError, match="another prompt"):
        distill(teacher, other_student, shuffled, tmp_path / "seq4", train=quick(1), **opts)


def test_on_policy_steps_sample_from_the_student(models, text, tmp_path):
    teacher, student = models
    result = distill(teacher, student, text / "pairs.jsonl", tmp_path / "gkd", on_policy=1.0, method="lora",
                     loss="jsd", seq_len=SEQ, eval_fraction=0, train=quick(2, batch_size=4))
    assert result.data["on_policy_steps"] == 2 and result.train.steps == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.train.history if "loss" in r)
    assert (tmp_path / "gkd" / "adapter_config.json").exists()
    with pytest.raises(SlimlmError, match="only with --mode logit"):
        distill(teacher, student, text / "pairs.jsonl", tmp_path / "x", mode="sequence", on_policy=0.5)


def test_resume_with_other_settings_is_refused(models, text, tmp_path):
    teacher, student = models
    out = tmp_path / "run"
    distill(teacher, student, text / "b.txt", out, train=quick(2, save_every=1), seq_len=SEQ)
    with pytest.raises(SlimlmError, match="kind 'forward_kl' -> 'jsd'"):
        distill(teacher, student, text / "b.txt", out, loss="jsd", train=quick(2, save_every=1), seq_len=SEQ,
                resume=True)
    with pytest.raises(SlimlmError, match="lr 0.003 -> 0.001"):
        distill(teacher, student, text / "b.txt", out, train=quick(2, save_every=1, lr=1e-3), seq_len=SEQ,
                resume=True)
    again = distill(teacher, student, text / "b.txt", out, train=quick(2, save_every=1), seq_len=SEQ, resume=True)
    assert again.train.steps == 2 and again.cache_reused
    with pytest.raises(SlimlmError, match="--resume"):
        distill(teacher, student, text / "b.txt", out, train=quick(2), seq_len=SEQ)


def test_cli_end_to_end(models, other_student, text, tmp_path, capfd):
    teacher, student = models
    out = tmp_path / "cli"
    code, stdout, err = run_cli(capfd, "distill", "--teacher", teacher, "--student", student, "--data",
                                text / "b.txt", "--out", out, "--max-steps", "2", "--seq-len", SEQ, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["mode"] == "logit" and result["train"]["steps"] == 2 and result["cache_bytes_per_token"] < 1024
    assert read_manifest(out)["operation"] == "distill" and (out / "model.safetensors").exists()
    code, stdout, err = run_cli(capfd, "distill", "--teacher", teacher, "--student", student, "--data",
                                text / "b.txt", "--out", tmp_path / "cli2", "--max-steps", "1", "--seq-len", SEQ,
                                "--loss", "skew_reverse_kl", "--weight-ce", "0.5")
    assert code == 0, err
    assert "reused" in stdout and "bytes/token" in stdout
    code, _, err = run_cli(capfd, "distill", "--teacher", teacher, "--student", other_student, "--data",
                           text / "b.txt", "--out", tmp_path / "cli3")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "--mode sequence" in err
    code, stdout, _ = run_cli(capfd, "distill", "--help")
    assert code == 0 and "--on-policy" in stdout and "--mode" in stdout


def test_cli_config_file_with_an_override_equals_the_flags(models, text, tmp_path, capfd):
    """`--config FILE` gives the settings and a typed option (--max-steps 2 over the file's 4) overrides
    them: the student and the losses equal those of the same settings given as flags."""
    from safetensors.torch import load_file

    teacher, student = models
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(f"loss: jsd\nbeta: 0.3\ntop_k: 16\nseq_len: {SEQ}\neval_fraction: 0.2\n"
                      "train:\n  lr: 1e-2\n  max_steps: 4\n  batch_size: 8\n")
    common = ["distill", "--teacher", teacher, "--student", student, "--data", text / "b.txt"]
    code, by_flags, err = run_cli(capfd, *common, "--out", tmp_path / "flags", "--loss", "jsd", "--beta", "0.3",
                                  "--top-k", "16", "--seq-len", SEQ, "--eval-fraction", "0.2", "--lr", "0.01",
                                  "--max-steps", "2", "--batch-size", "8", "--json")
    assert code == 0, err
    code, by_file, err = run_cli(capfd, *common, "--out", tmp_path / "file", "--config", recipe, "--max-steps", "2",
                                 "--json")
    assert code == 0, err
    a, b = json.loads(by_flags), json.loads(by_file)
    assert b["train"]["steps"] == 2 and b["kind"] == "jsd" and b["cache_reused"]  # the flags run built it
    assert {k: b["train"][k] for k in ("steps", "tokens", "train_loss", "eval_loss")} == \
           {k: a["train"][k] for k in ("steps", "tokens", "train_loss", "eval_loss")}
    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("flags", "file")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    settings = [json.loads((tmp_path / run / "distill.json").read_text()) for run in ("flags", "file")]
    assert settings[0] == settings[1] and settings[1]["beta"] == 0.3 and settings[1]["top_k"] == 16


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "phi3", "gemma2", "gemma3_text",
                                    "deepseek_v3"])
def test_matrix_distill(family, tiny_models, tiny_tokenizer_dir, text, tmp_path):
    """Logit distillation on each family: a second random model of the family (another seed)
    moves toward the tiny teacher on text it was trained on, and the student written reloads."""
    teacher = tiny_models(family)
    student = build_tiny_model(family, tiny_tokenizer_dir, tmp_path / "student", seed=1)
    data = text / "b.txt"
    result = distill(teacher, student, data, tmp_path / "kd", train=quick(6, lr=1e-2), seq_len=SEQ,
                     eval_fraction=0, record_run=False, progress=False)
    blocks = load_data(data, load_torch(student)[1], seq_len=SEQ, eval_fraction=0).train
    assert held_out_kl(teacher, tmp_path / "kd", blocks) < held_out_kl(teacher, student, blocks)
    assert result.train.steps == 6 and read_manifest(tmp_path / "kd")["operation"] == "distill"
