"""The faster sampling paths draw what the slow ones drew: tokens by inverse CDF from the same distribution, and a
LoRA model's rollouts and evals from a copy with its adapters folded in."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from torch.utils.flop_counter import FlopCounterMode

from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.evaluate import EvalConfig, evaluate
from rlscale.rl.generate import draw
from rlscale.rl.grpo import GRPOConfig, train_grpo
from rlscale.rl.model import LoraConfig, ModelConfig, add_lora, load_model, merged_copy, sync_merged
from rlscale.rl.tasks import ArithmeticParams, make_task


def test_draw_follows_the_softmax_and_never_picks_an_impossible_token():
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0, -30.0]] * 2000)
    temperature = 0.7
    counts = torch.zeros(6)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        counts += torch.bincount(draw(logits, temperature, g), minlength=6)
    assert counts[3] == 0 and counts[5] == 0  # -inf never; e^-30 not in 20,000 draws (p ~ 1e-13)
    p = torch.softmax(logits[0] / temperature, -1).double()
    seen = [0, 1, 2, 4]
    assert chisquare(counts[seen].numpy(), p[seen].numpy() / p[seen].sum().item() * counts.sum().item()).pvalue > 1e-3
    # a distribution with one sure token draws it every time; rows are drawn independently
    sure = torch.full((4, 6), -1e4).index_fill_(1, torch.tensor([4]), 0.0)
    assert draw(sure, 1.0, g).tolist() == [4, 4, 4, 4]


def _lora_nano(seed: int = 0):
    base, tok = load_model(ModelConfig(size="nano"), seed=0)
    model = add_lora(base, LoraConfig(rank=4), seed=0)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # adapters that change the model (fresh ones have B = 0)
    return model, tok


def test_merged_copy_computes_what_the_adapters_compute_and_follows_them():
    model, _ = _lora_nano()
    copy = merged_copy(model)
    ids = torch.randint(4, 90, (3, 12))
    with torch.no_grad():
        assert torch.allclose(copy(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        with model.disable_adapter():  # the adapters matter: the copy is not the base model
            assert not torch.allclose(copy(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.mul_(-1.5)  # the adapters train on
        assert not torch.allclose(copy(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)  # stale
        flops = sync_merged(copy, model)
        assert torch.allclose(copy(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert not any(p.requires_grad for p in copy.parameters())
    assert not any("lora_" in n for n, _ in copy.named_parameters())
    # the copy owns its weights: the model's frozen base is untouched by the sync
    now = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    fresh, _ = load_model(ModelConfig(size="nano"), seed=0)
    assert all(torch.equal(now[n], p) for n, p in fresh.named_parameters())
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert flops == sum(2 * 4 * m.get_base_layer().weight.numel() for m in adapted) > 0


def test_eval_statistics_are_the_same_from_the_merged_copy():
    """Every eval number (greedy, sampled, pass@k, majority, checks' P(yes)) from the copy equals the adapters'
    to 1e-6: the same tokens are drawn (same generator), the logits differ only by float rounding."""
    model, tok = _lora_nano(seed=1)
    task = make_task(ArithmeticParams(digits=2))
    problems = task.problems(24, "eval", seed=0)
    cfg = EvalConfig(problems=24, samples=4, max_new_tokens=4, verify_max_new_tokens=12)
    slow = evaluate(model, tok, task, problems, cfg, Meter(FlopModel.of(model)), torch.Generator().manual_seed(5))
    copy = merged_copy(model)
    fast = evaluate(copy, tok, task, problems, cfg, Meter(FlopModel.of(copy)), torch.Generator().manual_seed(5))
    assert slow[0].keys() == fast[0].keys()
    for k, v in slow[0].items():
        assert fast[0][k] == pytest.approx(v, abs=1e-6), k
    assert [r["answer"] for r in slow[1]] == [r["answer"] for r in fast[1]]
    assert [r["p_yes"] for r in slow[1]] == pytest.approx([r["p_yes"] for r in fast[1]], abs=1e-4)


def test_grpo_samples_from_the_synced_copy_and_counts_what_ran():
    """Rollouts come from the copy, refreshed each step (so the same answers as from the adapters themselves), and
    the rollout FLOPs are the copy's (no adapter work) plus the folds, as torch counts them."""
    task = make_task(ArithmeticParams(digits=1))
    cfg = GRPOConfig(steps=3, prompts_per_step=4, num_generations=4, max_new_tokens=3, learning_rate=1e-2,
                     self_verify=False)

    class Log:
        def __init__(self):
            self.logs = []

        def on_log(self, step, metrics):
            self.logs.append(metrics)

    runs = {}
    for merged in (False, True):
        model, tok = _lora_nano()
        model.config._attn_implementation = "eager"  # every matmul visible to the counter
        copy = merged_copy(model) if merged else None
        meter, log = Meter(FlopModel.of(model)), Log()
        with FlopCounterMode(display=False) as fc:
            train_grpo(model, tok, task, cfg, seed=0, meter=meter, callback=log, sampler=copy)
        runs[merged] = (log.logs, meter, fc.get_total_flops())
    (slow, _, _), (fast, meter, counted) = runs[False], runs[True]
    assert [m["train/reward_mean"] for m in slow] == [m["train/reward_mean"] for m in fast]
    assert [m["train/loss"] for m in slow] == pytest.approx([m["train/loss"] for m in fast], abs=1e-5)
    # the same tokens ran either way: the FLOPs counted differ as torch saw them differ (the copy samples without
    # adapter work and pays the folds; the adapters sampling themselves run the prompts once for sampling and update)
    # (to 2% of the run: FlopModel counts a backward's input gradient through layer 0's frozen weights, which torch
    # skips as the embeddings need none; 4% of this 2-layer model's prompt backward, a 30th of that on SmolLM2)
    delta = sum(runs[False][1].flops.values()) - sum(meter.flops.values())
    assert delta == pytest.approx(runs[False][2] - counted, abs=0.02 * counted)
    for _, m, ran in runs.values():
        assert sum(m.flops.values()) == pytest.approx(ran, rel=0.05)


def test_rows_that_end_leave_the_decode_batch_with_the_same_samples_cache_and_counted_flops(smollm2_dir, monkeypatch):
    """sample() drops rows that ended from its decode batch: the same answers as when every row decodes to the end
    (greedy and sampled rows of one batch, fixed generator), fewer rows fed, the FLOPs it counts within 5% of
    torch's FlopCounter, and a KV cache that still gives each answer's verdict P(yes) as the definition does."""
    from torch.utils.flop_counter import FlopCounterMode

    from rlscale.rl import generate

    model, tok, task, problems, prompts, mixed = _chat_groups(smollm2_dir, 4, 3)  # a greedy answer, two samples

    def run(compact: float, greedy: bool | torch.Tensor = mixed):
        monkeypatch.setattr(generate, "COMPACT", compact)
        return generate.sample(model, tok, prompts, 40, 1.0, greedy=greedy,
                               generator=torch.Generator().manual_seed(0), keep_cache=True)

    assert run(0.0, False).texts == run(2.0, False).texts  # every row sampled (a rollout)
    full, dropped = run(2.0), run(0.0)  # never / as soon as a row's eos is in the cache
    assert dropped.texts == full.texts and torch.equal(dropped.completion_ids, full.completion_ids)
    lengths = full.completion_mask.sum(1)
    assert lengths.min() < lengths.max() - 2  # rows ended at different steps: the drop was exercised
    assert dropped.decode_tokens < full.decode_tokens == 12 * (full.completion_ids.shape[1] - 1)
    fm = FlopModel.of(model)
    with FlopCounterMode(display=False) as fc:
        run(0.0)
    assert fc.get_total_flops() == pytest.approx(fm.generation(dropped), rel=0.05)
    _verdicts_read_from_the_cache_as_defined(model, tok, task, problems, dropped, [j for j in range(12) if j % 3])


def _chat_groups(smollm2_dir, n: int, per: int):
    """SmolLM2, its chat arithmetic task with verdict checks, n problems' prompts `per` times each, and which rows
    answer greedily (each problem's first)."""
    from rlscale.rl.chat import for_model

    model, tok = load_model(ModelConfig(path=str(smollm2_dir)))
    model.eval()
    task = for_model(make_task(ArithmeticParams(digits=2, prompt_format="chat", check="verdict")), tok)
    problems = task.problems(n, "eval", seed=2)
    prompts = [p.prompt for p in problems for _ in range(per)]
    return model, tok, task, problems, prompts, torch.arange(n * per) % per == 0


def _verdicts_read_from_the_cache_as_defined(model, tok, task, problems, batch, rows: list[int]) -> None:
    """P(yes) of the verdicts on rows `rows` of a batch sampled with keep_cache equals `p_yes` without a cache."""
    from rlscale.rl.self_verify import p_yes, p_yes_from_cache, verify_prompt

    per = len(batch.texts) // len(problems)
    verdicts = [verify_prompt(task, problems[j // per], batch.texts[j]) for j in rows]
    fast, _ = p_yes_from_cache(model, tok, batch, verdicts, [""] * len(rows), rows)
    plain, _ = p_yes(model, tok, verdicts, [""] * len(rows))
    assert torch.allclose(fast, plain, atol=1e-4), (fast, plain)


def test_rows_that_repeat_a_prefix_feed_it_once_with_the_same_samples_cache_and_counted_flops(smollm2_dir,
                                                                                              monkeypatch):
    """A group's rows share their prompt and, while they draw the same tokens, the prefix after it: sample() feeds
    each distinct prefix once (a node splits when its rows draw different tokens) until the distinct prefixes pass
    SHARE of the rows or a row ends. The same tokens and entropies as one cache row per sample from the first token
    (SHARE = 0), fewer rows fed, the FLOPs it counts within 5% of torch's FlopCounter, and a kept KV cache that gives
    each answer's verdict P(yes) as the definition does."""
    from rlscale.rl import generate

    model, tok, task, problems, prompts, mixed = _chat_groups(smollm2_dir, 3, 8)  # a greedy answer, seven samples

    def run(share: float):
        monkeypatch.setattr(generate, "SHARE", share)
        return generate.sample(model, tok, prompts, 24, 1.0, greedy=mixed, generator=torch.Generator().manual_seed(0),
                               keep_cache=True, with_entropy=True)

    alone, shared = run(0.0), run(1.0)  # from the first token / until a row ends
    assert shared.texts == alone.texts and torch.equal(shared.completion_ids, alone.completion_ids)
    assert torch.allclose(shared.entropy, alone.entropy, atol=1e-4)
    assert shared.decode_tokens < alone.decode_tokens  # prefixes were shared past the prompt
    with FlopCounterMode(display=False) as fc:
        run(1.0)
    assert fc.get_total_flops() == pytest.approx(FlopModel.of(model).generation(shared), rel=0.05)
    _verdicts_read_from_the_cache_as_defined(model, tok, task, problems, shared, [j for j in range(24) if j % 4])


def test_a_cache_row_taken_twice_keeps_its_room():
    """`_Room.reorder_cache` with repeated rows (a prefix that splits) is DynamicLayer's, copied once into new
    buffers that the next steps write into in place."""
    from transformers.cache_utils import DynamicLayer

    from rlscale.rl.generate import _Room

    g = torch.Generator().manual_seed(0)
    kv = lambda rows, n: (torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g))  # noqa
    ref = DynamicLayer()
    ref.update(*kv(3, 5))
    room = _Room(ref, end=9)
    ref = DynamicLayer()
    ref.update(room.keys, room.values)
    rows = torch.tensor([2, 0, 0, 2, 1])
    room.reorder_cache(rows)  # before any step: the prefill's tensors, DynamicLayer's own path
    ref.reorder_cache(rows)
    new = kv(5, 1)
    room.update(*new), ref.update(*new)
    buffer = room.room[0]
    room.reorder_cache(rows[:4])
    ref.reorder_cache(rows[:4])
    assert room.room[0] is not buffer and room.keys._base is room.room[0]
    for _ in range(2):
        new = kv(4, 1)
        got, want = room.update(*new), ref.update(*new)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert room.keys.shape[-2] == 8 and room.keys._base is room.room[0]


def test_a_frozen_lm_head_gets_its_rows_as_one_contiguous_block(nano):
    """Where only the last positions' logits are kept, the LM head sees a contiguous block: a strided one with a
    frozen head (LoRA, the sampling copy) runs as a batched product copying the head once per row (3.3x slower
    bf16 evaluation, benchmarks/results/eval_time.json keep_last_*)."""
    from rlscale.rl.generate import completion_logprobs, sample
    from rlscale.rl.self_verify import p_yes

    model, tok = nano
    model.eval().requires_grad_(False)
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    try:
        task = make_task(ArithmeticParams(digits=2))
        prompts = [p.prompt for p in task.problems(4, "eval", seed=0)]
        batch = sample(model, tok, prompts * 2, 4, generator=torch.Generator().manual_seed(0))
        completion_logprobs(model, batch)
        p_yes(model, tok, prompts, ["12= yes"] * 4)
    finally:
        hook.remove()
        model.requires_grad_(True)
    assert len(seen) > 4 and all(seen)


def test_a_decode_step_writes_its_token_into_the_cache_in_place():
    """`_Room` holds what DynamicLayer's torch.cat builds, step by step, through rows dropped from outside and past
    its room; while it has room, every step writes into the same buffer (no copy of the whole cache)."""
    from transformers.cache_utils import DynamicLayer

    from rlscale.rl.generate import _Room

    g = torch.Generator().manual_seed(0)
    kv = lambda rows, n: (torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g))  # noqa
    ref = DynamicLayer()
    ref.update(*kv(6, 5))  # a prefill
    room = _Room(ref, end=8)
    ref = DynamicLayer()
    ref.update(room.keys, room.values)
    buffers = []
    for step in range(6):
        if step == 1:  # rows leave, as sample() drops them
            keep = torch.tensor([True, False, True, True, False, True])
            room.keys, room.values = room.keys[keep], room.values[keep]
            ref.keys, ref.values = ref.keys[keep], ref.values[keep]
        new = kv(len(ref.keys), 1)
        got, want = room.update(*new), ref.update(*new)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        buffers.append(room.room[0])
    # lengths 6 to 11, room for 8: a new buffer after the drop, that one to the room's end, then one a step
    assert buffers[1] is not buffers[0] and buffers[1] is buffers[2]
    assert buffers[3] is not buffers[2] and buffers[4] is not buffers[3]
    assert room.keys.shape[-2] == 11 and room.keys._base is buffers[-1]


def test_a_shared_chat_head_is_prefilled_once_into_the_plain_prefills_cache(smollm2_dir, monkeypatch):
    """Chat prompts share their template's head (bos, system turn): it runs once, the rest of each prompt continues
    it, and the KV cache is laid out as a plain prefill's. The same cache and next-token logits up to float rounding
    (the head's GEMM has one row, not one per prompt), the same answers here, and the FLOPs `FlopModel.generation`
    counts within 2% of torch's FlopCounter, less than the plain prefill's by the head run only once."""
    from rlscale.rl import generate
    from rlscale.rl.chat import for_model

    model, tok = load_model(ModelConfig(path=str(smollm2_dir)))
    model.eval()
    task = for_model(make_task(ArithmeticParams(digits=2, prompt_format="chat")), tok)
    prompts = [p.prompt for p in task.problems(5, "eval", seed=3) for _ in range(3)]
    ids, mask = generate.encode_prompts(tok, prompts, torch.device("cpu"))
    shared = generate._prefill_distinct(model, ids, mask)
    monkeypatch.setattr(generate, "SHARED_HEAD", 10**6)
    plain = generate._prefill_distinct(model, ids, mask)
    assert shared[2] >= 8 and plain[2] == 0 and torch.equal(shared[3], plain[3])
    assert torch.allclose(shared[1], plain[1], atol=1e-3)
    real = mask[::3].bool()[:, None, :, None]  # the distinct prompts' rows; pad columns hold what nobody attends to
    for a, b in zip(shared[0].layers, plain[0].layers):
        assert torch.allclose(a.keys * real, b.keys * real, atol=1e-4)
        assert torch.allclose(a.values * real, b.values * real, atol=1e-4)

    def run(head: int, new_tokens: int):
        monkeypatch.setattr(generate, "SHARED_HEAD", head)
        fm = FlopModel.of(model)
        with FlopCounterMode(display=False) as fc:
            b = generate.sample(model, tok, prompts, new_tokens, 1.0, greedy=torch.arange(15) % 3 == 0,
                                generator=torch.Generator().manual_seed(0))
        return b, fc.get_total_flops(), fm.generation(b)

    (b1, ran1, counted1), (_, ran2, counted2) = run(8, 1), run(10**6, 1)  # one new token: the prefill alone
    assert b1.head >= 8
    assert ran1 == pytest.approx(counted1, rel=0.02) and ran2 == pytest.approx(counted2, rel=0.02)
    distinct = len(set(prompts))
    assert counted2 - counted1 == pytest.approx((distinct - 1) * FlopModel.of(model).forward(b1.head, 0, 0), rel=0.1)
    assert run(8, 16)[0].texts == run(10**6, 16)[0].texts
