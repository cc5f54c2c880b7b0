"""Sequence-level distillation: the teacher writes the answers, the student learns them.

Token-level (logit) distillation needs the teacher's and student's distributions over one
vocabulary. Sequence-level distillation (Kim & Rush 2016) needs only text: the teacher answers
the training prompts (greedy by default, its most likely answer), and the student is fine-tuned
on (prompt, teacher answer) pairs with its own tokenizer and chat template, so any teacher can
teach any student. Plain-text data has no prompts: the first `prompt_tokens` tokens of each
training block are the prompt and the teacher continues them.

Generating is the slow part (the teacher decodes every token), so answers go to a JSONL file as
each batch finishes, and a rerun skips the prompts already answered: a killed run loses at most
one batch. The file's first line records the teacher and the generation settings, and every line
its prompt, so answers are never reused for other prompts or settings.

`generate_batch` is also what on-policy distillation samples the student with (distill.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from slimlm.data import read_records
from slimlm.errors import SlimlmError
from slimlm.models.backends.batch import generate_batch  # moved there: the torch backend batches with it too
from slimlm.train.data import IGNORE, TrainData, encode_chat, load_data, pack, split

FORMAT = "slimlm-teacher-generations/1"

__all__ = ["answered", "generate_answers", "generate_batch", "sample_continuations", "student_data",
           "teacher_prompts"]


def sample_continuations(model, batch: dict, pad_id: int, stop_ids) -> dict:
    """On-policy data (GKD): each example's prompt (the tokens before its first label; the first half
    of plain text) continued by sampling from `model`, as many tokens as the example had, so an
    on-policy step costs what an off-policy one does. Labels only on the sampled tokens."""
    import torch

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prompts, budgets = [], []
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        labelled = (labels[row, :n] != IGNORE).nonzero().flatten().tolist()
        p = labelled[0] if labelled and 0 < labelled[0] < n else max(1, n // 2)
        prompts.append(ids[row, :p].tolist())
        budgets.append(max(1, n - p))
    samples = generate_batch(model, prompts, max(budgets), pad_id, stop_ids, temperature=1.0)
    rows = [p + new[:b] for p, (new, _), b in zip(prompts, samples, budgets)]
    out = {"input_ids": torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)}
    out["attention_mask"] = torch.zeros_like(out["input_ids"])
    out["labels"] = torch.full_like(out["input_ids"], IGNORE)
    for r, (seq, p) in enumerate(zip(rows, prompts)):
        out["input_ids"][r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        out["attention_mask"][r, :len(seq)] = 1
        out["labels"][r, len(p):len(seq)] = out["input_ids"][r, len(p):len(seq)]
    return {k: v.to(ids.device) for k, v in out.items()}


def teacher_prompts(data, tokenizer, seq_len: int, eval_fraction: float, seed: int, prompt_tokens: int,
                    skip_bad_lines: bool = False) -> tuple[list, list[dict], str]:
    """(prompts for the teacher, held-out examples for the student, kind). A prompt is a list of chat
    messages (instruction data: the conversation before its last assistant turn) or a string (plain
    text: the first `prompt_tokens` tokens of a training block). The held-out examples are the real
    data, tokenized for the student, so held-out loss measures the task, not the teacher's answers."""
    if isinstance(data, TrainData) and data.kind != "text":
        raise SlimlmError("sequence mode takes tokenized data (TrainData) only as plain text: give instruction "
                          "data as a file, so the teacher sees each prompt in its own chat template")
    records = None if isinstance(data, TrainData) else read_records(data, skip_bad_lines=skip_bad_lines)
    if records is None or all(isinstance(r, str) for r in records):
        blocks = data if records is None else load_data(data, tokenizer, seq_len, eval_fraction, seed)
        if prompt_tokens < 1 or prompt_tokens >= seq_len:
            raise SlimlmError(f"prompt tokens {prompt_tokens} must be in [1, seq-len {seq_len}): the teacher "
                              "continues the first prompt-tokens of each training block")
        texts = [tokenizer.decode(ex["input_ids"][:prompt_tokens], skip_special_tokens=True) for ex in blocks.train]
        return [t for t in texts if t.strip()], blocks.eval, "text"
    train, held = split(records, eval_fraction, seed)
    prompts = []
    for messages in train:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last > 0:
            prompts.append(messages[:last])
    held_out = [{k: v[:seq_len] for k, v in encode_chat(tokenizer, m).items()} for m in held]
    if not prompts:
        raise SlimlmError(f"{data}: no training conversation has a prompt before its last assistant turn")
    return prompts, [ex for ex in held_out if any(t != IGNORE for t in ex["labels"][1:])], "instruction"


def answered(path: Path) -> int:
    """How many answers a generations file holds (0 if there is none)."""
    return max(0, len(Path(path).read_text(encoding="utf-8").splitlines()) - 1) if Path(path).exists() else 0


def _read_done(path: Path, header: dict, prompts: list) -> dict[int, dict]:
    """Answers already in `path` (index -> record), checked against this run's header and prompts.
    A last line cut short by a kill is dropped (and the file rewritten without it)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    complete, tail = lines[:-1], lines[-1]
    if not complete:
        return {}
    try:
        old = json.loads(complete[0])
    except ValueError:
        old = {}
    differ = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in header.items() if old.get(k) != v]
    if differ:
        raise SlimlmError(f"{path} holds teacher answers made with other settings ({'; '.join(differ)}): "
                          "give another generations path, or delete it to start over")
    done = {}
    for number, line in enumerate(complete[1:], start=2):
        rec = json.loads(line)
        i = rec["index"]
        if i >= len(prompts) or rec["prompt"] != prompts[i]:
            raise SlimlmError(f"{path}: line {number} answers another prompt than this data's #{i}: the file was "
                              "made from other data; give another generations path, or delete it")
        done[i] = rec
    if tail:  # a line cut short by a kill: drop it so appending starts on a clean line
        path.write_text("\n".join(complete) + "\n", encoding="utf-8")
    return done


def generate_answers(teacher, prompts: list, path: str | Path, max_new_tokens: int = 256, temperature: float = 0.0,
                     batch_size: int = 8, backend: str = "auto", seed: int = 0, progress: bool = True) -> list[dict]:
    """The teacher's answer to every prompt, generated in batches and appended to the JSONL `path`
    as each batch finishes; prompts already answered there are skipped. Returns the records in
    prompt order: {"index", "prompt", "completion", "stopped"}. The torch backend generates a batch
    at once; llama.cpp answers one prompt at a time."""
    import contextlib

    from slimlm.models.backends import BACKENDS, GenerationParams, open_backend, pick_backend
    from slimlm.models.reference import resolve
    from slimlm.progress import progress_bar

    path = Path(path)
    ref = resolve(teacher)
    header = {"format": FORMAT, "teacher": str(ref.path), "max_new_tokens": max_new_tokens,
              "temperature": temperature, "seed": seed}
    done = _read_done(path, header, prompts) if path.exists() else {}
    todo = [i for i in range(len(prompts)) if i not in done]
    if todo:
        batched = BACKENDS[pick_backend(ref, backend)].supports("batch")
        # one fp32 model, batched (no separate bf16 decode copy)
        engine = open_backend(ref, backend, **({"dtype": "float32"} if batched else {}))
        if not done:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n", encoding="utf-8")
        bar = progress_bar("teacher answers", len(todo)) if progress else contextlib.nullcontext(lambda n=1: None)
        with bar as advance, path.open("a", encoding="utf-8") as fh:
            for at in range(0, len(todo), batch_size):
                part = todo[at:at + batch_size]
                if batched:
                    ids = [engine.tokenize(engine.prompt_text(prompts[i], raw=isinstance(prompts[i], str)))
                           for i in part]
                    texts = engine.generate_batch(ids, max_new_tokens, temperature)
                else:
                    params = GenerationParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
                    texts = []
                    for i in part:
                        c = engine.generate(prompts[i], params, raw=isinstance(prompts[i], str))
                        texts.append((c.text, c.timings.finish_reason == "stop"))
                for i, (text, stopped) in zip(part, texts):
                    done[i] = {"index": i, "prompt": prompts[i], "completion": text, "stopped": stopped}
                    fh.write(json.dumps(done[i]) + "\n")
                fh.flush()
                advance(len(part))
        engine.close()
    return [done[i] for i in range(len(prompts))]


def student_data(answers: list[dict], held_out: list[dict], tokenizer, seq_len: int, kind: str,
                 train_on_prompt: bool = False, pack_examples: bool | None = None, source: str = "") -> TrainData:
    """The student's training examples: each prompt with the teacher's answer, in the student's own
    tokenization (its chat template for conversations). Loss only on the answer unless
    train_on_prompt. Text examples are packed into seq_len blocks (masks kept) unless pack_examples
    is False; conversations only when it is True."""
    examples = []
    for a in answers:
        if kind == "instruction":
            messages = a["prompt"] + [{"role": "assistant", "content": a["completion"]}]
            examples.append(encode_chat(tokenizer, messages, train_on_prompt))
            continue
        p = tokenizer(a["prompt"], verbose=False)["input_ids"]
        c = tokenizer(a["completion"], add_special_tokens=False, verbose=False)["input_ids"]
        if a["stopped"] and tokenizer.eos_token_id is not None:
            c = c + [tokenizer.eos_token_id]  # the teacher ended its text: the student learns to stop
        examples.append({"input_ids": p + c, "labels": (p if train_on_prompt else [IGNORE] * len(p)) + c})
    packed = pack_examples if pack_examples is not None else kind == "text"
    train = pack(examples, seq_len) if packed else [{k: v[:seq_len] for k, v in ex.items()} for ex in examples]
    train = [ex for ex in train if any(t != IGNORE for t in ex["labels"][1:])]
    if not train:
        raise SlimlmError("the teacher's answers left nothing to learn (all empty?): raise --max-new-tokens "
                          "or check the teacher with `slimlm generate`")
    return TrainData(train, held_out, kind, source, seq_len, packed)
