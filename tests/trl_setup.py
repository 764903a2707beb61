"""A real TRL GRPOTrainer on a tiny Llama (two-digit addition) with RLScaleCallback attached, for the TRL tests.

Imported by the tests, or run as a script (the kill tests): `python tests/trl_setup.py STORE OUT STEPS [SLEEP]`
trains with a reward that sleeps SLEEP seconds a call and prints `STEP n` after each step."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rlscale.experiments.trl_callback import RLScaleCallback
from rlscale.rl.model import ModelConfig, load_model, save_model
from rlscale.rl.tasks import ArithmeticParams, make_task

warnings.filterwarnings("ignore")
TASK = {"name": "arithmetic", "digits": 2}


def tiny_grpo(store: Path, out: Path, steps: int = 4, *, callback: RLScaleCallback | None = None,
              fail_at: int | None = None, sleep: float = 0.0, model=None,
              **config) -> tuple[GRPOTrainer, RLScaleCallback]:
    """A GRPOTrainer (4 prompts x 4 generations a step, 6 new tokens, eager attention) with the callback."""
    task = make_task(ArithmeticParams(digits=2))
    if model is None:  # saved and loaded back: TRL builds its reference model from the model's own folder
        folder = Path(out).parent / "nano"
        if not (folder / "config.json").is_file():
            save_model(*load_model(ModelConfig(size="nano"), seed=0), folder)
        model, tok = load_model(ModelConfig(path=str(folder), attn_implementation="eager"))
    else:
        model, tok = model
    problems = {tok.bos_token + p.prompt: p for p in task.problems(256, "train", seed=0)}
    calls = []

    def addition_reward(prompts, completions, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) >= fail_at:
            raise RuntimeError(f"reward server down at call {len(calls)}")
        time.sleep(sleep)
        return [task.reward(problems[p], c) for p, c in zip(prompts, completions)]

    args = GRPOConfig(**{
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 16, "num_generations": 4,
        "max_completion_length": 6, "learning_rate": 1e-3, "logging_steps": 1, "use_cpu": True, "bf16": False,
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "seed": 0, **config})
    callback = callback or RLScaleCallback(experiment="trl", root=store, task=TASK, eval_problems=16,
                                           eval_max_new_tokens=6, flush_seconds=0)
    prompts = list(problems)
    held_out = None if args.eval_strategy == "no" else Dataset.from_dict({"prompt": prompts[:8]})
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          eval_dataset=held_out, callbacks=[callback])
    return trainer, callback


def flop_counter():
    """torch's FlopCounterMode, also counting in-place `addmm_`: TRL's fused LM head accumulates its backward products
    with it, and the counter's registry knows only the out-of-place matmuls."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.addmm_: lambda acc, a, b, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]})


class Steps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)


if __name__ == "__main__":
    store, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    trainer, _ = tiny_grpo(store, out, steps, sleep=float(sys.argv[4]) if len(sys.argv) > 4 else 0.0,
                           save_strategy="steps", save_steps=1)
    trainer.add_callback(Steps())
    trainer.train()
    print("DONE", flush=True)
