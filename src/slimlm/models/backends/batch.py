"""Batched generation with a Hugging Face causal LM: several prompts continued in one left-padded
batch through transformers' `generate`. The torch backend's `generate_batch` uses it to answer
many prompts at once (sequence-level distillation's teacher), and on-policy distillation samples
the student with it while training (train/distill_sequence.py), so it takes a plain model."""

from __future__ import annotations


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, stop_ids,
                   temperature: float = 0.0) -> list[tuple[list[int], bool]]:
    """Continue each prompt (token ids) with a Hugging Face causal LM, all in one left-padded batch.
    Returns (new tokens, stopped) per prompt; the stop token, when one came, ends the tokens.
    temperature 0 is greedy; above it, plain sampling from the full distribution (no top-k/top-p)."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every row's next token is at the same column
        ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    stops = sorted(set(stop_ids))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else 1.0, top_k=0, top_p=1.0,
                              pad_token_id=pad_id, eos_token_id=stops or None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)[:, width:].tolist()
    finally:
        model.train(was_training)
    out = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        out.append((row[:cut + 1], True) if cut is not None else (row, False))
    return out
