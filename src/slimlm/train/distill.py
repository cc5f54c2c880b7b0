"""`slimlm distill`: a smaller student learns to do what a larger teacher does.

- logit (default): at every position of the training text the student matches the teacher's
  next-token distribution (forward/reverse KL, JSD, skew KL: losses.py), mixed with cross-entropy
  by `weight_ce`. A distribution carries far more per token than the one right answer, which is why
  distillation recovers a pruned model faster than training on the text alone. The teacher's top-k
  is computed once into an offline cache (teacher_cache.py) tied by hash to the exact training
  sequences, so the teacher is freed before training and the next student (or epoch) reuses the
  cache instead of running the teacher again. Needs one vocabulary (model widths may differ).
- sequence: the teacher answers the training prompts and the student is fine-tuned on the answers
  (distill_sequence.py); works across tokenizers.
- on-policy (`on_policy` > 0, with logit): on that fraction of steps the student samples a
  continuation of the prompt and learns the teacher's distribution on its own tokens (GKD, Agarwal
  et al. 2024): it is corrected where it actually goes, not only on text it would never write.

The output folder is finetune's: the student (dense, or a LoRA adapter), checkpoints/ for --resume,
train_log.jsonl, loss.png, and slimlm.json (written last) with the student as parent and the teacher
in its params. Held-out loss is always plain cross-entropy on real data, comparable across methods.
The settings are one `DistillConfig` (train/configs.py), which a YAML recipe can hold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from slimlm.config import make_config
from slimlm.errors import SlimlmError
from slimlm.train.configs import MODES, DistillConfig
from slimlm.train.core import Trainer, TrainResult, causal_lm_loss, process_state, token_count
from slimlm.train.data import TrainData, load_data
from slimlm.train.finetune import prepare_out

__all__ = ["MODES", "DistillConfig", "DistillResult", "LogitLoss", "default_cache_path", "distill", "ensure_cache"]
SETTINGS_FILE = "distill.json"
DISTILL_FILES = (SETTINGS_FILE, "teacher_answers.jsonl")  # what marks a folder as a distill run's


@dataclass
class DistillResult:
    out: Path
    mode: str
    kind: str
    method: str
    teacher: str
    student: str
    cache: Path | None  # the teacher top-k cache (logit) or the teacher's answers (sequence)
    cache_reused: bool  # True when nothing of the teacher had to be recomputed
    cache_bytes_per_token: float | None
    trainable_params: int
    total_params: int
    train: TrainResult
    data: dict = field(default_factory=dict)
    model: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return dict(d, out=str(self.out), cache=str(self.cache) if self.cache else None, train=self.train.to_dict())


class DistillExtension:
    """What a verb built on distillation adds to it (`moe train`: which parts of an MoE train, and
    the router losses). The default changes nothing."""

    settings: dict = {}  # recorded in distill.json (so --resume refuses a change) and the manifest

    def prepare(self, model) -> None:
        """Called on the student before training: e.g. freeze what must not train."""

    def wrap_loss(self, loss_fn, model):
        """The training loss to use instead of `loss_fn` (the distillation loss)."""
        return loss_fn


class LogitLoss:
    """The Trainer's loss_fn for logit mode: distill_loss against the cached teacher top-k of the
    batch's examples; with a live teacher and `on_policy`, sometimes on the student's own samples.
    The on/off-policy draw uses torch's global RNG, which checkpoints save, so resuming is exact."""

    def __init__(self, cache, vocab_size: int, kind: str, weight_ce: float, temperature: float, beta: float,
                 alpha: float, teacher=None, on_policy: float = 0.0, pad_id: int = 0, stop_ids=()):
        self.cache, self.vocab = cache, vocab_size
        self.kw = {"kind": kind, "temperature": temperature, "beta": beta, "alpha": alpha, "vocab_size": vocab_size}
        self.weight_ce, self.teacher, self.on_policy = weight_ce, teacher, on_policy
        self.pad_id, self.stop_ids = pad_id, tuple(stop_ids)
        self.on_policy_steps = 0

    def teacher_topk(self, index, width: int, device):
        """The cached TopK of each example, right-padded to the batch width (padding is masked)."""
        import torch

        from slimlm.train.losses import TopK

        ids = torch.zeros(len(index), width, self.cache.k, dtype=torch.long)
        lp = torch.zeros(len(index), width, self.cache.k)
        for row, i in enumerate(index.tolist()):
            top = self.cache.topk(i)
            ids[row, :len(top.ids)], lp[row, :len(top.ids)] = top.ids, top.logprobs
        return TopK(ids.to(device), lp.to(device))

    def __call__(self, model, batch: dict):
        import torch

        from slimlm.train.losses import distill_loss

        if self.teacher is not None and self.on_policy > 0 and float(torch.rand(())) < self.on_policy:
            return self.on_policy_loss(model, batch)
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        teacher = self.teacher_topk(batch["index"], ids.shape[1], ids.device)
        return distill_loss(logits, batch["labels"], teacher, weight_ce=self.weight_ce, **self.kw), token_count(batch)

    def on_policy_loss(self, model, batch: dict):
        """The divergence from the live teacher on the student's own sampled continuations (no
        cross-entropy: sampled tokens are not data)."""
        import torch

        from slimlm.train.distill_sequence import sample_continuations
        from slimlm.train.losses import distill_loss

        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        net = model.module if ddp else model  # generate lives on the model DDP wraps
        new = sample_continuations(net, batch, self.pad_id, self.stop_ids)
        if next(self.teacher.parameters()).device != new["input_ids"].device:
            self.teacher.to(new["input_ids"].device)
        inputs = {"input_ids": new["input_ids"], "attention_mask": new["attention_mask"], "use_cache": False}
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits
        s_logits = model(**inputs).logits
        self.on_policy_steps += 1
        loss = distill_loss(s_logits, new["labels"], t_logits, weight_ce=0.0, **self.kw)
        return loss, token_count(new)


def default_cache_path(teacher_folder: Path, sequences: list, k: int) -> Path:
    """Where a teacher cache lives unless --cache says: the slimlm cache folder, named by the teacher
    and the sequences' hash, so a second student on the same data finds it."""
    from slimlm.paths import cache_dir
    from slimlm.train.teacher_cache import as_ids, sequences_hash

    key = hashlib.sha256(f"{teacher_folder}|{sequences_hash([as_ids(s) for s in sequences])}|{k}".encode())
    return cache_dir() / "teacher-cache" / f"{teacher_folder.name}-{key.hexdigest()[:16]}"


def ensure_cache(teacher_folder: Path, sequences: list, path: Path, k: int, tokenizer, batch_size: int = 4,
                 progress: bool = True) -> tuple[dict, bool]:
    """Build the teacher cache at `path`, resume an unfinished one, or reuse a finished one of the same
    teacher, sequences and k (returns (index, reused)); a cache of anything else is refused."""
    from slimlm.train.teacher_cache import INDEX, as_ids, build_teacher_cache, sequences_hash, tokenizer_hash

    if (path / INDEX).exists():
        old = json.loads((path / INDEX).read_text())
        want = {"sequences_hash": sequences_hash([as_ids(s) for s in sequences]), "k": k,
                "tokenizer_hash": tokenizer_hash(tokenizer), "teacher": str(teacher_folder)}
        names = {"sequences_hash": "training sequences", "k": "top-k", "tokenizer_hash": "tokenizer"}
        differ = [names.get(key, key) for key, value in want.items() if old.get(key) != value]
        if differ:
            raise SlimlmError(f"{path} is a teacher cache of other {', '.join(differ)} than this run's: give another "
                              "--cache path, or delete it to rebuild")
        if old.get("complete"):
            return old, True
    elif path.exists() and any(path.iterdir()):
        raise SlimlmError(f"{path} exists and is not a teacher cache: give another --cache path")
    index = build_teacher_cache(str(teacher_folder), sequences, path, k=k, tokenizer=tokenizer,
                                batch_size=batch_size, progress=progress)
    return index, False


def _check_settings(out: Path, settings: dict, resume: bool) -> None:
    """The distillation settings (the Trainer checks its own): a resumed run must use the same."""
    path = out / SETTINGS_FILE
    if resume and path.exists():
        was = json.loads(path.read_text())
        diff = [f"{k} {was.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(was) | set(settings))
                if was.get(k) != settings.get(k)]
        if diff:
            raise SlimlmError(f"cannot resume {out}: distillation settings differ ({'; '.join(diff)}): rerun with the "
                              "same settings, or --force to start over")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, default=str))


def _vocab(teacher_tok, student_tok) -> int:
    from slimlm.train.losses import check_vocab_compat

    try:
        return check_vocab_compat(teacher_tok, student_tok)
    except SlimlmError as exc:
        raise SlimlmError(f"{str(exc).split(': token-level')[0]}: logit distillation needs one vocabulary; use "
                          "--mode sequence (the student learns the teacher's generated answers) instead") from exc


def distill(teacher, student, data, out, config: DistillConfig | str | Path | dict | None = None, *,
            resume: bool = False, force: bool = False, record_run: bool = True, progress: bool = True,
            extension: DistillExtension | None = None, **overrides) -> DistillResult:
    """Distill `teacher` into `student` (model references) on `data` (as finetune takes, or a TrainData)
    and write the trained student to `out`.

    config: a DistillConfig, a YAML recipe's path or a mapping (None: the defaults); `overrides` are
    DistillConfig fields set on top of it (`loss="jsd"`, `train=TrainConfig(...)`), checked by name
    and type. Its `cache`: the teacher top-k cache folder (logit) or the teacher's answers JSONL
    (sequence) to build or reuse; by default a per-data path in slimlm's cache (logit) or
    OUT/teacher_answers.jsonl (sequence). `extension`: what a caller such as `moe train` adds (which
    parameters train, extra loss terms, its settings for --resume and the manifest)."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from slimlm.models.loading import dense_folder, load_torch
    from slimlm.models.reference import resolve
    from slimlm.runs import record, write_manifest
    from slimlm.train.finetune import add_adapter, resolve_targets, write_result

    out = Path(out)
    cfg = make_config(DistillConfig, config, "distill()", **overrides)
    cfg = replace(cfg, train=replace(cfg.train, out=str(out))).validate()
    tc, mode, kind, on_policy, method, merge = cfg.train, cfg.mode, cfg.loss, cfg.on_policy, cfg.method, cfg.merge
    if cfg.curriculum:
        if mode != "logit":
            raise SlimlmError("--curriculum orders the examples of logit distillation; sequence distillation trains "
                              "on the teacher's answers: order those with slimlm curate instead")
        tc = replace(tc, shuffle=False)  # a curriculum is an order
    top_k, eval_fraction, train_on_prompt, pack = cfg.top_k, cfg.eval_fraction, cfg.train_on_prompt, cfg.pack
    state = process_state()
    seq_len = data.seq_len if isinstance(data, TrainData) else cfg.seq_len  # tokenized data brings its own
    t_ref, s_ref = resolve(teacher), resolve(student)
    t_folder = dense_folder(t_ref)
    model, s_tok = load_torch(s_ref)
    # Everything that can be wrong with the input is checked before OUT is touched.
    if mode == "logit":
        t_tok = AutoTokenizer.from_pretrained(t_folder, local_files_only=True)
        vocab = _vocab(t_tok, s_tok)  # a mismatch is a one-line error naming --mode sequence
        train_data = data if isinstance(data, TrainData) else load_data(
            data, s_tok, seq_len=seq_len, eval_fraction=eval_fraction, seed=tc.seed,
            train_on_prompt=train_on_prompt, pack_examples=pack, skip_bad_lines=cfg.skip_bad_lines,
            curriculum=cfg.curriculum, buckets=cfg.curriculum_buckets)
        cache = Path(cfg.cache) if cfg.cache else default_cache_path(t_folder, train_data.train, top_k)
    else:
        from slimlm.train.distill_sequence import answered, generate_answers, student_data, teacher_prompts

        prompts, held, data_kind = teacher_prompts(data, s_tok, seq_len, eval_fraction, tc.seed,
                                                   cfg.prompt_tokens, cfg.skip_bad_lines)
        cache = Path(cfg.cache) if cfg.cache else out / "teacher_answers.jsonl"
    # distill.json's keys (checked on --resume) and the manifest's: the library's names, kind and alpha
    settings = {"mode": mode, "kind": kind, "weight_ce": cfg.weight_ce, "temperature": cfg.temperature,
                "beta": cfg.beta, "alpha": cfg.skew, "top_k": top_k, "on_policy": on_policy, "method": method,
                "rank": cfg.rank, "lora_alpha": cfg.adapter_alpha, "merged": merge, "teacher": str(t_ref.path),
                "student": str(s_ref.path), "data": "TrainData" if isinstance(data, TrainData) else str(data),
                "seq_len": seq_len, "eval_fraction": eval_fraction, "train_on_prompt": train_on_prompt}
    if extension is not None:
        settings.update(extension.settings)
    if mode == "sequence":
        settings.update(prompt_tokens=cfg.prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                        gen_temperature=cfg.gen_temperature)
    if state.is_main_process:
        prepare_out(out, resume, force, own=DISTILL_FILES, resumable=("checkpoints", *DISTILL_FILES))
        _check_settings(out, settings, resume)
    state.wait_for_everyone()
    loss_fn, reused, bytes_per_token = None, False, None
    if mode == "logit":
        if state.is_main_process:  # the teacher is loaded inside, and freed before training starts
            reused = ensure_cache(t_folder, train_data.train, cache, top_k, t_tok, cfg.cache_batch_size, progress)[1]
        state.wait_for_everyone()
        from slimlm.train.teacher_cache import TeacherCache

        reader = TeacherCache.open(cache)
        reader.check_tokenizer(s_tok)
        bytes_per_token = reader.bytes_per_token
        live = load_torch(t_folder)[0].requires_grad_(False) if on_policy else None
        loss_fn = LogitLoss(reader, vocab, kind, cfg.weight_ce, cfg.temperature, cfg.beta, cfg.skew, live, on_policy,
                            s_tok.pad_token_id or 0, {s_tok.eos_token_id} - {None})
    else:
        reused = answered(cache) >= len(prompts)
        if state.is_main_process:
            generate_answers(t_ref, prompts, cache, cfg.max_new_tokens, cfg.gen_temperature, cfg.gen_batch_size,
                             cfg.backend, tc.seed, progress)
        state.wait_for_everyone()
        answers = generate_answers(t_ref, prompts, cache, cfg.max_new_tokens, cfg.gen_temperature, seed=tc.seed,
                                   progress=False)  # all there now: read back, nothing generated
        train_data = student_data(answers, held, s_tok, seq_len, data_kind, train_on_prompt, pack, settings["data"])
    total = sum(p.numel() for p in model.parameters())
    set_seed(tc.seed)
    targets = [] if method == "full" else resolve_targets(model, cfg.target_modules)
    trained = model if method == "full" else add_adapter(model, method, cfg.rank, cfg.adapter_alpha,
                                                         cfg.lora_dropout, targets)
    if extension is not None:
        extension.prepare(trained)
        loss_fn = extension.wrap_loss(loss_fn or causal_lm_loss, trained)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    trainer = Trainer(trained, tc, train_data, loss_fn=loss_fn)
    result = trainer.train(resume=resume and bool(trainer.checkpoints()))  # killed before a checkpoint: start
    info = {"kind": train_data.kind, "train_examples": len(train_data.train), "eval_examples": len(train_data.eval),
            "train_tokens": train_data.train_tokens, "packed": train_data.packed, "targets": targets,
            "on_policy_steps": getattr(loss_fn, "on_policy_steps", 0)}
    final = DistillResult(out, mode, kind, method, str(t_ref.path), str(s_ref.path), cache, reused, bytes_per_token,
                          trainable, total, result, info, trainer.unwrapped_model)
    if state.is_main_process:
        params = dict(settings, teacher={"spec": t_ref.spec, "path": str(t_ref.path)}, cache=str(cache),
                      train=tc.to_dict(), data_info=info)
        metrics = dict(result.to_dict(), cache_bytes_per_token=bytes_per_token, cache_reused=reused)
        metrics.pop("out")
        # finetune's layout and atomic write; then the manifests say what was done: distillation
        final.model = write_result(trainer.unwrapped_model, s_tok, s_ref, out, method, merge, params, metrics,
                                   dense_folder(s_ref), False)
        for folder in [out, out / "adapter"] if merge else [out]:
            write_manifest(folder, parent=s_ref, operation="distill", params=params, metrics=metrics)
        if record_run:
            record("distill", model=s_ref, params=params, metrics=metrics, artifact=out)
    state.wait_for_everyone()
    return final
