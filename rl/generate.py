"""Batched sampling with a KV cache, and per-token log-probabilities of completions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Batch:
    """Left-padded prompts followed by right-padded completions (one row per sample)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded, includes the eos token when one was produced
    completion_mask: torch.Tensor  # (B, T) 1 for real completion tokens (eos included)
    texts: list[str]  # decoded completions, special tokens removed
    decode_context: int = 0  # sum over decode steps of (batch rows x keys attended), for the attention FLOP term

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise each distinct prompt once, prepend bos where the tokenizer has one, left-pad."""
    unique = list(dict.fromkeys(prompts))
    encoded = tokenizer(unique, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    by_prompt = {p: bos + ids for p, ids in zip(unique, encoded)}
    rows = [by_prompt[p] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def encode_completions(
    tokenizer: PreTrainedTokenizerBase, completions: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise target completions (eos appended), right-pad."""
    encoded = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = [ids + [tokenizer.eos_token_id] for ids in encoded]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Batch:
    """Sample one completion per prompt (repeat a prompt G times for a group); stops at eos."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    B, P = prompt_ids.shape
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_positions(prompt_mask), use_cache=True)
    cache, logits = out.cache, out.logits[:, -1, :]
    mask, pos = prompt_mask, _positions(prompt_mask)[:, -1:]
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    decode_context = 0
    for t in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = F.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens[:, t] = nxt
        done |= nxt == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1, :]
        decode_context += B * mask.shape[1]
    T = t + 1
    tokens = tokens[:, :T]
    # real tokens: everything up to and including the first eos
    is_eos = tokens == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    texts = tokenizer.batch_decode(tokens.masked_fill(~completion_mask.bool(), pad), skip_special_tokens=True)
    return Batch(prompt_ids, prompt_mask, tokens, completion_mask, texts, decode_context)


def completion_logprobs(
    model: PreTrainedModel, batch: Batch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log pi(y_t | x, y_<t) of the completion tokens, (B, T); optionally the per-token entropy."""
    ids, mask = batch.input_ids, batch.attention_mask
    T = batch.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=T + 1).logits
    logits = logits[:, :-1, :].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
