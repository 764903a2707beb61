"""Self-verification: the model is shown its own answer ("problem answer ok?"), writes a short check
(by default it redoes the problem) and ends with a verdict, yes or no.

The verdict is rewarded by agreement with the program verifier (RISE-style), so the model learns to check
its own homework; at test time the same verdicts pick among sampled answers (self-verified best-of-N).
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlscale.rl.generate import Batch, cache_copy, keep_last, left_pad
from rlscale.rl.tasks import Problem, Task

YES, NO = "yes", "no"


def verify_prompt(task: Task, problem: Problem, completion: str) -> str:
    """The prompt asking the model to judge one of its answers (the task's format: compact or chat)."""
    return task.verify_prompt(problem, completion)


def check_trace(task: Task, problem: Problem, completion: str) -> str:
    """The program's check written before the verdict: the task's worked check, or nothing (`task.check =
    "verdict"`: the verdict alone)."""
    return "" if task.params.check == "verdict" else task.check_trace(problem, completion)


def check_target(task: Task, problem: Problem, completion: str, truth: bool) -> str:
    """What the model is taught to write when checking `completion`: the program's check, then the verdict word."""
    return f"{check_trace(task, problem, completion)} {YES if truth else NO}"


def parse_verdict(text: str) -> bool | None:
    """True for yes, False for no (the last word, trailing punctuation and markup ignored), None when malformed."""
    words = text.split()
    last = words[-1].lower().strip(".!*_`'\"") if words else ""
    return True if last == YES else False if last == NO else None


def split_trace(text: str) -> str:
    """The check written before the verdict word ('' when the model wrote only a verdict)."""
    words = text.rsplit(maxsplit=1)
    if words and parse_verdict(words[-1]) is not None:
        return words[0] if len(words) == 2 else ""
    return text.strip()


def verdict_reward(verdict_text: str, truth: bool) -> float:
    """1 when the model's verdict agrees with the program verifier, else 0."""
    return 1.0 if parse_verdict(verdict_text) == truth else 0.0


def corrupt(text: str, rng: random.Random) -> str:
    """A wrong answer: each digit changed with odds 0.6 (at least one), or (1 in 5) a character dropped or added."""
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    if not digits or rng.random() < 0.2:
        if len(text) < 2 or rng.random() < 0.5:
            i = rng.randrange(len(text) + 1)
            return text[:i] + rng.choice("0123456789") + text[i:]
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1 :]
    chars = list(text)
    changed = [i for i in digits if rng.random() < 0.6] or [rng.choice(digits)]  # most digits: no "all equal" prior
    for i in changed:
        chars[i] = rng.choice([d for d in "0123456789" if d != chars[i]])
    return "".join(chars)


def balanced_own(correct: list[bool], rng: random.Random) -> list[int]:
    """Indices of the model's own answers to check, classes balanced: all of the rarer class (right or wrong by the
    program verifier) and as many of the other, drawn at random; in their original order."""
    right = [i for i, ok in enumerate(correct) if ok]
    wrong = [i for i, ok in enumerate(correct) if not ok]
    k = min(len(right), len(wrong))
    return sorted(rng.sample(right, k) + rng.sample(wrong, k))


def sft_examples(
    task: Task, problems: list[Problem], rng: random.Random, verify_fraction: float, correct_share: float = 0.5
) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: solutions, and verification examples of reference or corrupted answers.

    Mostly-corrupted verification examples (`correct_share` < 0.5) keep the model from learning to copy the
    answer it is shown into its check instead of redoing the problem."""
    out = []
    for p in problems:
        if rng.random() >= verify_fraction:
            out.append((p.prompt, p.solution))
            continue
        answer = p.solution if rng.random() < correct_share else corrupt(p.solution, rng)
        out.append((verify_prompt(task, p, answer), check_target(task, p, answer, task.is_correct(p, answer))))
    return out


def _common(a: list[int], b: list[int]) -> int:
    """Length of the start two token lists share."""
    return next((j for j, (x, z) in enumerate(zip(a, b)) if x != z), min(len(a), len(b)))


def _teacher_forced(tokenizer: PreTrainedTokenizerBase, prompts: list[str], traces: list[str]
                    ) -> list[tuple[list[int], list[int], list[int]]]:
    """Each prompt followed by "{trace} yes" + eos and by "{trace} no" + eos, as tokens: the start both read (bos,
    prompt, check) and the two tails where they differ, each at least one token long (the tokens scored)."""
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    yes_ids = tokenizer([f"{t} {YES}" for t in traces], add_special_tokens=False)["input_ids"]
    no_ids = tokenizer([f"{t} {NO}" for t in traces], add_special_tokens=False)["input_ids"]
    out = []
    for p, y, n in zip(prompt_ids, yes_ids, no_ids):
        y, n = bos + p + y + [eos], bos + p + n + [eos]
        k = min(_common(y, n), len(y) - 1, len(n) - 1)
        out.append((y[:k], y[k:], n[k:]))
    return out


def _verdicts(model, out, mask: torch.Tensor, tails: list[tuple[list[int], list[int]]], pad: int
              ) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """P(yes) after a pass over each row's shared tokens (`out`: its KV cache and the logits of its last token;
    `mask`: the attention mask so far): the two verdict tails of a row, where "yes" and "no" differ, continue from
    the one cache, one after the other (not a copy of the cache for each), and only they are scored. Returns P(yes)
    and the tail passes, if they ran."""
    device, B, L = mask.device, len(tails), mask.shape[1]
    T = max(len(t) for pair in tails for t in pair)
    tail_ids = torch.full((2 * B, T), pad, dtype=torch.long)
    tail_mask = torch.zeros((2 * B, T), dtype=torch.long)
    for i, (y, n) in enumerate(tails):
        for j, t in ((i, y), (B + i, n)):  # yes rows first, then no rows
            tail_ids[j, : len(t)], tail_mask[j, : len(t)] = torch.tensor(t), 1
    tail_ids, tail_mask = tail_ids.to(device), tail_mask.to(device)
    cache, first = out.cache, out.logits[:, -1:, :]
    logits = torch.cat([first, first])
    passes = []
    if T > 1:  # the verdict tails from the one cached prefix: the yes tails, the cache cut back to it, the no tails
        rest = []
        for half in (slice(0, B), slice(B, 2 * B)):
            if rest:  # back to the shared tokens: a view, so a decode cache (`generate._Room`) writes in place
                cache.crop(-(T - 1))
            full = torch.cat([mask, tail_mask[half, :-1]], dim=1)
            rest.append(model(input_ids=tail_ids[half, :-1], attention_mask=full, cache=cache, use_cache=True,
                              position_ids=(full.cumsum(-1) - 1)[:, L:]).logits)
        logits = torch.cat([logits, torch.cat(rest)], dim=1)
        passes.append((2 * B * (T - 1), 2 * B * ((T - 1) * L + (T - 1) * T // 2), 2 * B * (T - 1)))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tail_ids[..., None]).squeeze(-1)
    seq = (logp * tail_mask).sum(-1)
    return torch.sigmoid(seq[:B] - seq[B:]), passes


@torch.no_grad()
def p_yes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], traces: list[str],
    heads: list[str] | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """P(yes) / (P(yes) + P(no)) after each prompt and its check: log pi("{trace} yes" + eos) - log pi("{trace} no"
    + eos), teacher-forced, through a sigmoid.

    The tokens the two verdicts share (the prompt, the check) run once with logits at their last position only, and
    the two verdicts continue from that KV cache; the shared tokens cancel in the difference, so only the tokens
    where the two differ are scored. With `heads` (each prompt's start, e.g. the problem's own prompt before the
    model's reply), prompts with the same head run it once and continue its KV cache, so judging N answers to one
    problem reads the problem once; a head that does not tokenise as the start of its prompt turns this off. Returns
    P(yes) and the passes run, (tokens, keys attended, logits) each, for `FlopModel.forward`."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    forced = _teacher_forced(tokenizer, prompts, traces)
    prefixes, tails = [f[0] for f in forced], [f[1:] for f in forced]
    B = len(prefixes)
    head_rows = [bos + h for h in tokenizer(heads, add_special_tokens=False)["input_ids"]] if heads else []
    if not all(0 < len(h) < len(row) and row[: len(h)] == h for h, row in zip(head_rows, prefixes)):
        head_rows = []  # nothing shared: a head tokenised apart from its prompt's start
    passes = []
    if head_rows:  # each distinct head once, its KV cache fanned out to its rows, then each row's rest
        distinct = {h: i for i, h in enumerate(dict.fromkeys(map(tuple, head_rows)))}  # head -> its index
        h_ids, h_mask = left_pad([list(h) for h in distinct], pad)
        row_of = torch.tensor([distinct[tuple(h)] for h in head_rows], device=device)
        out = model(input_ids=h_ids.to(device), attention_mask=h_mask.to(device), use_cache=True,
                    position_ids=(h_mask.cumsum(-1) - 1).clamp(min=0).to(device), logits_to_keep=keep_last(1))
        cache = out.cache
        cache.reorder_cache(row_of)
        ids, body_mask = left_pad([row[len(h) :] for h, row in zip(head_rows, prefixes)], pad)
        H, Lh, Lb = len(distinct), h_ids.shape[1], ids.shape[1]
        mask = torch.cat([h_mask.to(device).index_select(0, row_of), body_mask.to(device)], dim=1)
        out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, Lh:],
                    cache=cache, use_cache=True, logits_to_keep=keep_last(1))
        passes += [(H * Lh, H * Lh * Lh, H), (B * Lb, B * (Lb * Lh + Lb * (Lb + 1) // 2), B)]
    else:
        ids, mask = left_pad(prefixes, pad)
        ids, mask = ids.to(device), mask.to(device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=keep_last(1))
        passes.append((B * ids.shape[1], B * ids.shape[1] ** 2, B))
    p, tail_pass = _verdicts(model, out, mask, tails, pad)
    return p, passes + tail_pass


@torch.no_grad()
def p_yes_from_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sampled: Batch, prompts: list[str],
    traces: list[str], rows: list[int] | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """`p_yes(prompts, traces)` for `rows` of a `sample(..., keep_cache=True)` batch (default: all, in order),
    continuing its KV cache instead of running again what it holds: the tokens of a row's prompt and what it
    generated that agree with the start of the teacher-forced sequence stay (masked beyond), the rest runs once a
    row and the two verdict tails continue from it. Written checks: the check prompts and the checks just written;
    a verdict after the answer (`task.check = "verdict"`): the problems' prompts and their answers, which the verdict
    prompt repeats. The same values as `p_yes` up to float rounding. Returns P(yes) and the passes run, (tokens,
    keys attended, logits) each, for `FlopModel.forward`."""
    device = sampled.prompt_ids.device
    pad = tokenizer.pad_token_id
    rows = list(range(len(prompts))) if rows is None else rows
    B, (_, P) = len(rows), sampled.prompt_ids.shape
    fed_gen = sampled.completion_ids.shape[1] - 1  # the last sampled token was never fed: the cache stops before it
    C = P + fed_gen
    lengths = sampled.prompt_mask.sum(1).tolist()
    valid = (sampled.prompt_mask.sum(1) + sampled.completion_mask.sum(1)).tolist()  # a row's cache: through its eos
    held = torch.cat([sampled.prompt_ids, sampled.completion_ids[:, :fed_gen]], 1).tolist()  # the cached tokens
    cache_mask = torch.cat([sampled.prompt_mask, torch.ones((len(held), fed_gen), dtype=torch.long, device=device)], 1)
    cache_mask = cache_mask[rows]
    bodies, tails = [], []
    for i, (row, (shared, y, n)) in enumerate(zip(rows, _teacher_forced(tokenizer, prompts, traces))):
        r = _common(shared, held[row][P - lengths[row] :])  # what both verdicts read vs the row's real cached tokens
        # keep the r cached tokens both read, but feed at least the last shared token (its logits predict the
        # verdict and were not kept), never past the row's eos (rows that ended early hold zeros there)
        keep = min(r, len(shared) - 1, valid[row])
        cache_mask[i, P - lengths[row] + keep :] = 0
        bodies.append(shared[keep:])
        tails.append((y, n))
    # the rest of each row's shared tokens, left-padded after the cache (the pads masked), logits at the last only;
    # rows grouped by that length, so a few long ones (an answer that re-tokenises apart) do not pad all the others
    p, passes = torch.empty(B, device=device), []
    for group in length_groups([len(b) for b in bodies]):
        idx = torch.tensor(group, device=device)
        body, body_mask = left_pad([bodies[i] for i in group], pad)
        body, body_mask = body.to(device), body_mask.to(device)
        kept = torch.tensor([rows[i] for i in group], device=device)
        cache = cache_copy(sampled.cache, lambda x, kept=kept: x.index_select(0, kept))  # the group's rows
        mask = torch.cat([cache_mask[idx], body_mask], dim=1)
        out = model(input_ids=body, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, C:].clamp(min=0),
                    cache=cache, use_cache=True, logits_to_keep=keep_last(1))
        Bg, Lb = len(group), body.shape[1]
        passes.append((Bg * Lb, Bg * (Lb * C + Lb * (Lb + 1) // 2), Bg))
        p[idx], tail_pass = _verdicts(model, out, mask, [tails[i] for i in group], pad)
        passes += tail_pass
    return p, passes


PASS_TOKENS = 32  # what one more pass costs, in padded tokens (its per-layer calls), when `length_groups` cuts


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Rows (indices) grouped by length for passes that pad each group to its longest: sorted by length and cut
    where the least padded tokens plus PASS_TOKENS a pass (dynamic programming over the distinct lengths)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ends = [j for j in range(1, len(order) + 1) if j == len(order) or lengths[order[j]] != lengths[order[j - 1]]]
    best = {0: (0, [])}  # rows so far (a group boundary) -> (cost, the groups' ends)
    for j in ends:
        best[j] = min((cost + (j - i) * lengths[order[j - 1]] + PASS_TOKENS, cuts + [j])
                      for i, (cost, cuts) in best.items())
    cuts = best[len(order)][1]
    return [order[i:j] for i, j in zip([0] + cuts, cuts)]

