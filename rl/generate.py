"""Batched sampling with a KV cache, and per-token log-probabilities of completions."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer


@dataclass
class Batch:
    """Left-padded prompts followed by right-padded completions (one row per sample)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 for real prompt tokens
    completion_ids: torch.Tensor  # (B, T) right-padded, includes the eos token when one was produced
    completion_mask: torch.Tensor  # (B, T) 1 for real completion tokens (eos included)
    texts: list[str]  # decoded completions, special tokens removed
    decode_tokens: int = 0  # rows fed over the decode steps (rows that ended leave the batch), for FLOPs
    decode_context: int = 0  # sum over decode steps of (batch rows x keys attended), for the attention FLOP term
    cache: object = None  # the KV cache of prompt + every fed completion token (the last one is not), if kept;
    # valid through each row's eos (past it, rows that left the decode batch hold zeros)
    head: int = 0  # tokens every prompt starts with, prefilled once for all (0: none)
    entropy: torch.Tensor | None = None  # `sample(with_entropy=True)`: (B, T) entropy of each token's distribution

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: torch.Tensor) -> Batch:
        """Rows `rows` (a 1-D index) with the completion columns trimmed to their longest."""
        T = int(self.completion_mask[rows].sum(1).max())
        return Batch(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows, :T],
                     self.completion_mask[rows, :T], [self.texts[i] for i in rows.tolist()])

    def distinct(self) -> tuple[Batch, torch.Tensor]:
        """Its distinct rows (the same prompt and completion once; no texts), and each row's distinct row."""
        rep, row_of = distinct_rows(self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask)
        return Batch(self.prompt_ids[rep], self.prompt_mask[rep], self.completion_ids[rep], self.completion_mask[rep],
                     []), row_of


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to the longest: ids and the mask of real tokens."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return ids, mask


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise each distinct prompt once, prepend bos where the tokenizer has one, left-pad."""
    index: dict[str, int] = {}
    which = [index.setdefault(p, len(index)) for p in prompts]  # row -> its distinct prompt
    encoded = tokenizer(list(index), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids, mask = left_pad([bos + e for e in encoded], tokenizer.pad_token_id)
    rows_of = torch.tensor(which)  # one padded copy per distinct prompt, gathered to the rows in one go
    return ids[rows_of].to(device), mask[rows_of].to(device)


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


def keep_last(n: int) -> torch.Tensor:
    """`logits_to_keep` for the last n positions, as indices: the model then takes its hidden states with an index,
    which copies them into one contiguous block, where a slice leaves them strided; a strided (B, n, d) input to a
    frozen LM head (LoRA, a sampling copy) does not fold into one matrix product in torch's matmul but runs as a
    batched one that copies the head's weight once per row: 9.6 GB for 85 SmolLM2 prompts (0.29 s against 0.02 s
    in fp32, half a bf16 evaluation's time)."""
    return torch.arange(-n, 0)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def distinct_rows(*parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the rows of `parts` side by side: one representative row index per distinct row, and for each row the
    index of its distinct row (so `x[rep][row_of]` equals `x`)."""
    index: dict[tuple, int] = {}  # a dict of row tuples: torch.unique(dim=0) sorts, 250 us for 64 short rows
    rep, row_of = [], []
    for i, r in enumerate(torch.cat(parts, dim=1).tolist()):
        k = index.setdefault(tuple(r), len(index))
        if k == len(rep):  # its first appearance
            rep.append(i)
        row_of.append(k)
    device = parts[0].device
    return torch.tensor(rep, device=device), torch.tensor(row_of, device=device)


SHARED_HEAD = 8  # tokens a head all distinct prompts share needs to run once (shorter, the extra pass costs more)


def _shared_head(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Length of the head every left-padded row starts with (a chat template's system turn), short of each row's
    last token; 0 when under SHARED_HEAD tokens or one row."""
    lengths = mask.sum(1)
    width = int(lengths.min()) - 1
    if len(ids) < 2 or width < SHARED_HEAD:
        return 0
    first = ids.gather(1, (ids.shape[1] - lengths)[:, None] + torch.arange(width, device=ids.device))
    return int((first == first[:1]).all(0).cumprod(0).sum())


def _prefill_head(model, ids: torch.Tensor, mask: torch.Tensor, head: int):
    """The prefill of left-padded rows that share their first `head` tokens: the head runs once, the rest of each
    row continues its KV cache, and the cache is laid out as a plain prefill's (each row's head moved to where its
    tokens start). Returns the cache and the logits of the token after each row, (D, 1, V)."""
    D, P = ids.shape
    start = P - mask.sum(1)  # the column of each row's first token
    s = int(start[0])
    cache = model(input_ids=ids[:1, s : s + head], use_cache=True, logits_to_keep=keep_last(1)).cache
    cache.reorder_cache(torch.zeros(D, dtype=torch.long, device=ids.device))
    # column j of the rest is column head + j of the rows: each row's tokens after its head, masked before them
    rest_mask = mask[:, : P - head]
    full = torch.cat([torch.ones_like(mask[:, :head]), rest_mask], dim=1)
    out = model(input_ids=ids[:, head:], attention_mask=full, position_ids=_positions(rest_mask) + head, cache=cache,
                use_cache=True, logits_to_keep=keep_last(1))
    col = torch.arange(P, device=ids.device)[None, :]
    moved = (col >= start[:, None]) & (col < start[:, None] + head)  # where a row's head goes: from columns 0..head
    where = torch.where(moved, col - start[:, None], col)[:, None, :, None]
    for layer in out.cache.layers:
        layer.keys = layer.keys.gather(2, where.expand_as(layer.keys))
        layer.values = layer.values.gather(2, where.expand_as(layer.values))
    return out.cache, out.logits[:, -1:, :]


def _prefill_distinct(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Run each distinct prompt once (a group of G samples shares one prompt), and a head every distinct prompt
    starts with once too (`_prefill_head`). Returns their KV cache and the logits of the token after each, (D, 1, V),
    the head's length (0: none) and each row's distinct prompt (None: the rows are distinct, run as they are)."""
    rep, row_of = distinct_rows(prompt_ids, prompt_mask)
    fan_out = len(rep) < len(row_of)  # else nothing repeats (an eval batch): the rows run as they are
    ids, mask = (prompt_ids[rep], prompt_mask[rep]) if fan_out else (prompt_ids, prompt_mask)
    head = _shared_head(ids, mask)
    if head:
        cache, logits = _prefill_head(model, ids, mask, head)
    else:
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                    logits_to_keep=keep_last(1))
        cache, logits = out.cache, out.logits[:, -1:, :]
    return cache, logits, head, row_of if fan_out else None


def cache_copy(cache, fn):
    """A copy of `cache` whose layers hold fn(keys) and fn(values) (the cache itself left as it is), e.g. some of its
    rows."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
    return out


PACK_WIDTH = 1024  # a packed sequence's width, past which its prompt's next rows start a new one (attention is S^2)


def pack(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The layout of `_packed_logits`: sequences each holding a distinct prompt of `batch` followed end to end by the
    completion tokens but the last of rows that share it, at most PACK_WIDTH wide (or one row's width). Returns
    each sequence's prompt (a row of the batch), each row's sequence, the column where its tokens start and how
    many it feeds, and the sequences' width."""
    P = batch.prompt_ids.shape[1]
    width = max(PACK_WIDTH, P + batch.completion_ids.shape[1])
    rep, prompt_of = distinct_rows(batch.prompt_ids, batch.prompt_mask)
    fed = (batch.completion_mask.sum(1) - 1).clamp(min=0)
    first, end, seq, start = [], [], [], []  # each sequence's first row and width; each row's sequence and start
    last = {}  # distinct prompt -> its sequence being filled
    for r, (q, f) in enumerate(zip(prompt_of.tolist(), fed.tolist())):
        if q not in last or end[last[q]] + f > width:
            last[q] = len(first)
            first.append(r)
            end.append(P)
        seq.append(last[q])
        start.append(end[last[q]])
        end[last[q]] += f
    device = fed.device
    return (torch.tensor(first, device=device), torch.tensor(seq, device=device), torch.tensor(start, device=device),
            fed, max(end))


def _packed_logits(model, batch: Batch) -> torch.Tensor:
    """Logits at the completion positions, (B, T, V), from one pass over `pack(batch)`: each distinct prompt runs
    once (per PACK_WIDTH tokens of its rows), each completion token attends to its prompt and its own row's tokens
    before it (a block mask, which transformers takes as given), so every row gets the values of its own pass up to
    float rounding; the last completion token is not fed (it predicts nothing). One pass, where running the prompts
    and then the completions from their KV cache takes two (a tiny GRPO step's model calls are mostly per-op
    overhead)."""
    rep, seq_of, start, fed, S = pack(batch)
    (B, T), P, device = batch.completion_ids.shape, batch.prompt_ids.shape[1], batch.completion_ids.device
    row = torch.arange(B, device=device).repeat_interleave(fed)  # the row of each fed completion token
    t = torch.arange(len(row), device=device) - (fed.cumsum(0) - fed).repeat_interleave(fed)  # its place in the row
    q, col = seq_of[row], start[row] + t
    prompt_mask = batch.prompt_mask[rep]
    ids = batch.prompt_ids.new_zeros((len(rep), S))
    ids[:, :P], ids[q, col] = batch.prompt_ids[rep], batch.completion_ids[row, t]
    pos = torch.zeros_like(ids)
    pos[:, :P], pos[q, col] = _positions(prompt_mask), prompt_mask.sum(1)[q] + t
    seg = torch.full_like(ids, -1)  # the row whose completion a column holds (-1: none)
    seg[q, col] = row
    seen = torch.zeros_like(ids, dtype=torch.bool)  # the prompts' real tokens: every later column attends to them
    seen[:, :P] = prompt_mask.bool()
    cols = torch.arange(S, device=device)
    mask = (seen[:, None, :] | (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)) & (cols[:, None] >= cols)
    mask |= torch.eye(S, dtype=torch.bool, device=device)  # padding attends to itself: no empty softmax row
    bare = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if bare.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=bare.dtype, device=device).masked_fill_(~mask, torch.finfo(bare.dtype).min)
    logits = model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos,
                   logits_to_keep=keep_last(S - P + 1)).logits  # columns P - 1 (the prompt's last) to S - 1
    # a row's completion token 0 is predicted at its prompt's last column, token j >= 1 at the column of token j - 1
    j = torch.arange(T, device=device)
    at = torch.where((j >= 1) & (j <= fed[:, None]), start[:, None] + j - 1, P - 1) - (P - 1)
    return logits.reshape(-1, logits.shape[-1])[seq_of[:, None] * (S - P + 1) + at]


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32; at temperature 1 the logits themselves (x / 1 is x bit for bit: no pass over
    and copy of every vocabulary entry, 150 MB for a SmolLM2 policy pass of 32 rows x 24 tokens)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def draw(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
         u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of (B, V) logits from softmax(logits / temperature), by inverse CDF: one uniform a row
    (`u`, (B, 1) float64 in [0, 1), drawn here when not given). torch.multinomial draws an exponential per
    vocabulary entry instead, 35 ms a token for 32 rows of SmolLM2's 49k (17% of its decoding on a CPU). Summed in
    float64, so a token keeps its probability to ~1e-16."""
    cdf = F.softmax(tempered(logits, temperature), dim=-1).double().cumsum_(-1)
    if u is None:
        u = torch.rand((len(cdf), 1), generator=generator, dtype=cdf.dtype, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


class _Room(DynamicLayer):
    """A DynamicLayer whose keys and values are the start of buffers `end` tokens long: a decode step writes its token
    in place, where DynamicLayer's torch.cat copies the whole cache every step (255 SmolLM2 rows of 80 tokens: 70 ms a
    step in fp32, a sixth of it). Keys set from outside (a reorder, rows dropped) move to a new buffer at the next
    update; past `end` it grows as it needs. Under no_grad only: writing in place would change what autograd saved."""

    def __init__(self, layer: DynamicLayer, end: int):
        super().__init__()
        self.__dict__.update(layer.__dict__)
        self.end, self.room = end, (None, None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        k_buf, v_buf = self.room
        if k_buf is None or self.keys._base is not k_buf or n + m > k_buf.shape[-2]:  # into a new buffer
            k, v = self.keys, self.values
            k_buf = k.new_empty(*k.shape[:2], max(n + m, self.end), k.shape[-1])
            v_buf = v.new_empty(*v.shape[:2], max(n + m, self.end), v.shape[-1])
            k_buf[:, :, :n], v_buf[:, :, :n] = k, v
            self.room = k_buf, v_buf
        k_buf[:, :, n : n + m], v_buf[:, :, n : n + m] = key_states, value_states
        self.keys, self.values = k_buf[:, :, : n + m], v_buf[:, :, : n + m]
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Rows `beam_idx` of the cache (repeats allowed), copied once: the buffers' rows are taken whole."""
        k_buf, v_buf = self.room
        if k_buf is None or self.keys._base is not k_buf:
            return super().reorder_cache(beam_idx)
        n = self.keys.shape[-2]
        k_buf, v_buf = k_buf.index_select(0, beam_idx), v_buf.index_select(0, beam_idx)
        self.room = k_buf, v_buf
        self.keys, self.values = k_buf[:, :, :n], v_buf[:, :, :n]


def _with_room(cache, end: int):
    """`cache` with its DynamicLayers made `_Room`s `end` tokens long (for a decode loop under no_grad)."""
    cache.layers = [_Room(layer, end) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _top(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row, the first on ties, as argmax; max's indices take a third of argmax's
    time on a CPU (255 rows of SmolLM2's 49k: 4 ms against 15)."""
    return logits.max(-1).indices


COMPACT = 0.25  # a decode batch drops its finished rows once they are this share of it (0: at once, >1: never)
SHARE = 0.5  # rows repeating a prefix feed it once while the distinct prefixes are at most this share of the rows


def _restore(cache, active: torch.Tensor, dropped: list[tuple[torch.Tensor, list]], B: int) -> None:
    """Put the rows that left the decode batch (`dropped`: their rows and each layer's keys and values, shorter
    than the cache's) back into `cache`, which holds rows `active`: one row per sample again, zeros past a row's
    end."""
    rows = torch.cat([active] + [r for r, _ in dropped])
    order = torch.empty_like(rows).scatter_(0, rows, torch.arange(B, device=rows.device))
    for i, layer in enumerate(cache.layers):
        L = layer.keys.shape[-2]
        grown = [[F.pad(x, (0, 0, 0, L - x.shape[-2])) for x in kv[i]] for _, kv in dropped]
        layer.keys = torch.cat([layer.keys] + [k for k, _ in grown]).index_select(0, order)
        layer.values = torch.cat([layer.values] + [v for _, v in grown]).index_select(0, order)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool | torch.Tensor = False,
    generator: torch.Generator | None = None,
    dedupe: bool = True,
    keep_cache: bool = False,
    with_entropy: bool = False,
) -> Batch:
    """Sample one completion per prompt (repeat a prompt G times for a group); stops at eos. `greedy`: every row
    takes the most likely token, or none does, or a (B,) bool tensor says which rows do (a problem's greedy answer
    and its samples in one batch share one prefill; the sampled rows draw as they would alone).

    With `dedupe`, each distinct prompt is prefilled once, and a head all prompts share (a chat template's system
    turn, SHARED_HEAD tokens or more) once for all; then rows that drew the same tokens so far share one KV cache row
    and feed their next token once (a group's rows often agree on their first tokens: 43 rows fed instead of 192 in a
    tiny GRPO step), until the distinct prefixes are more than `SHARE` of the rows or a row ends, when each row gets
    its own cache row for good: the same samples up to float rounding for fewer FLOPs (a group of G pays one
    prefill), as `FlopModel.generation` counts them. Rows that have ended leave the decode batch (once they are
    `COMPACT` of it); every sampled row draws its uniform at every step, so the draws do not depend on when other
    rows end; each fed token is written into the KV cache in place (`_Room`). With `keep_cache`, the batch keeps the
    KV cache, valid through each row's eos, for a continuation (`self_verify.p_yes_from_cache`). With
    `with_entropy`, `Batch.entropy` holds the entropy of softmax(logits / temperature) at each token."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    B, P = prompt_ids.shape
    drawn = ~greedy.to(device) if isinstance(greedy, torch.Tensor) else torch.full((B,), not greedy, device=device)
    slot = drawn.cumsum(0) - 1  # a sampled row's uniform among the step's draws
    n_drawn = int(drawn.sum())
    mixed = 0 < n_drawn < B  # else every row draws, or none does, whichever rows are left
    head = 0
    if dedupe:
        cache, logits, head, row_of = _prefill_distinct(model, prompt_ids, prompt_mask)
        node_of = row_of  # while rows repeat a prefix: each row's node, the cache row of its prompt + tokens so far
        logits = logits[:, -1, :]
    else:
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_positions(prompt_mask),
                    use_cache=True, logits_to_keep=keep_last(1))
        cache, logits, node_of = out.cache, out.logits[:, -1, :], None
    cache = _with_room(cache, P + max_new_tokens - 1)  # every token fed below is written in place
    mask, pos = prompt_mask, _positions(prompt_mask)[:, -1:]
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    entropy = torch.zeros((B, max_new_tokens), device=device) if with_entropy else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.arange(B, device=device)  # the rows in the decode batch (and the cache), in its order
    dropped = []  # rows that left it, with their KV cache (kept only for keep_cache)
    decode_tokens = decode_context = 0
    for t in range(max_new_tokens):
        u = torch.rand((n_drawn, 1), generator=generator, dtype=torch.float64, device=device) if n_drawn else None
        row_logits = logits if node_of is None else logits.index_select(0, node_of)
        if mixed:
            sel = drawn[active]
            nxt = torch.empty(len(active), dtype=torch.long, device=device)
            nxt[~sel] = _top(row_logits[~sel])
            nxt[sel] = draw(row_logits[sel], temperature, u=u[slot[active[sel]]])
        else:
            nxt = draw(row_logits, temperature, u=u[slot[active]]) if n_drawn else _top(row_logits)
        if with_entropy:  # H = -sum_v p_v log p_v of the distribution each token is drawn from
            logp = F.log_softmax(tempered(row_logits, temperature), dim=-1)
            entropy[active, t] = -(logp.exp() * logp).sum(-1)
        ended = done[active]  # rows whose eos is already in the cache
        nxt = torch.where(ended, torch.full_like(nxt, pad), nxt)
        tokens[active, t] = nxt
        done[active] |= nxt == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if node_of is not None:  # shared prefixes: the rows' next ones are (node, token) pairs, each fed once
            V = logits.shape[-1]
            key, child_of = torch.unique(node_of * V + nxt, return_inverse=True)
            if bool(done.any()) or len(key) > SHARE * B:  # back to one cache row per sample, for good
                cache.reorder_cache(node_of)
                node_of = None
            else:
                parent, nxt, node_of = key // V, key % V, child_of
                if not torch.equal(parent, torch.arange(len(logits), device=device)):
                    cache.reorder_cache(parent)  # a node that splits: a cache row for each child
                rep = torch.empty_like(parent).scatter_(0, node_of, torch.arange(B, device=device))  # one of its rows
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
                pos = pos + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask[rep], position_ids=pos[rep], cache=cache,
                            use_cache=True)
                cache, logits = out.cache, out.logits[:, -1, :]
                decode_tokens += len(rep)
                decode_context += len(rep) * mask.shape[1]
                continue
        if int(ended.sum()) >= max(1, COMPACT * len(active)):  # drop them from the decode batch
            keep, kv = ~ended, []
            for layer in cache.layers:  # a layer at a time: the memory of one layer's copy at most
                if keep_cache:
                    kv.append((layer.keys[ended], layer.values[ended]))
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            if keep_cache:
                dropped.append((active[ended], kv))
            active, mask, pos, nxt = active[keep], mask[keep], pos[keep], nxt[keep]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1, :]
        decode_tokens += len(active)
        decode_context += len(active) * mask.shape[1]
    if keep_cache and node_of is not None:
        cache.reorder_cache(node_of)
    if keep_cache and dropped:
        _restore(cache, active, dropped, B)
    T = t + 1
    tokens = tokens[:, :T]
    # real tokens: everything up to and including the first eos
    is_eos = tokens == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    texts = tokenizer.batch_decode(tokens.masked_fill(~completion_mask.bool(), pad), skip_special_tokens=True)
    return Batch(prompt_ids, prompt_mask, tokens, completion_mask, texts, decode_tokens, decode_context,
                 cache if keep_cache else None, head, entropy[:, :T] if with_entropy else None)


def completion_logprobs(
    model: PreTrainedModel,
    batch: Batch,
    temperature: float = 1.0,
    dedupe: bool = False,
) -> torch.Tensor:
    """Per-token log pi(y_t | x, y_<t) of the completion tokens, (B, T).

    With `dedupe`, identical rows (the same prompt and completion, common within a group) are computed once, in one
    pass where each distinct prompt is followed by the completions that share it (`_packed_logits`), and the last
    completion token, which predicts nothing, is not fed: the same values and gradients (copies sum through
    index_select) for a fraction of the FLOPs (`FlopModel.logprobs(batch, dedupe=True)`). Worth it where rows repeat
    a prompt (GRPO groups); plain batches of distinct rows (SFT) run faster without."""
    T = batch.completion_ids.shape[1]
    row_of = None
    if dedupe:
        batch, row_of = batch.distinct()
        logits = tempered(_packed_logits(model, batch), temperature)
    else:
        ids, mask = batch.input_ids, batch.attention_mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                       logits_to_keep=keep_last(T + 1)).logits
        logits = tempered(logits[:, :-1, :], temperature)
    logp = F.log_softmax(logits, dim=-1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    return logp.index_select(0, row_of) if row_of is not None else logp  # back to one row per sample
