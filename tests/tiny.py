"""The tiny experiment most tests train: a nano model on 1-digit addition, a few steps of each phase, recorded in a
store under the test's temp dir. Tables the caller appends ([sweep], [grid.axes], ...) follow [tracking]. Also
`fake_runs()`, the store writer of benchmarks/fake_runs.py."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

TINY = """
name = "{name}"
output_dir = "{tmp}/out"
[model]
size = "nano"
[task]
digits = 1
eval_percent = 30
[sft]
steps = {sft_steps}
[grpo]
steps = 3
prompts_per_step = 2
num_generations = 2
max_new_tokens = 3
verify_max_new_tokens = 12
eval_every = 1
eval_problems = 4
[eval]
problems = 4
samples = 2
max_new_tokens = 3
verify_max_new_tokens = 12
[tracking]
root = "{tmp}/mlruns"
"""


def tiny_toml(tmp: Path, name: str = "exp", text: str = "", *, sft_steps: int = 4, tracking: str = "") -> str:
    """The tiny config as TOML text: `tracking` lines go into [tracking], `text` (more tables) after it."""
    return TINY.format(name=name, tmp=Path(tmp).as_posix(), sft_steps=sft_steps) + tracking + text


def write_tiny(tmp: Path, name: str = "exp", text: str = "", **kwargs) -> str:
    """Write the tiny config to `<tmp>/<name>.toml`; returns its path."""
    path = Path(tmp) / f"{name}.toml"
    path.write_text(tiny_toml(tmp, name, text, **kwargs))
    return str(path)


def fake_runs():
    """benchmarks/fake_runs.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fake_runs.py"
    spec = importlib.util.spec_from_file_location("fake_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CoinKey:
    """A task graded against another answer key: each (problem, completion) is right with odds `share`, by a seeded
    coin, whatever the answer column holds (an untrained model's answers then fall in both classes)."""

    def __init__(self, task, share: float = 0.5):
        self.task, self.share = task, share

    def __getattr__(self, name):
        return getattr(self.task, name)

    def is_correct(self, problem, completion) -> bool:
        return random.Random(f"{problem.key}:{completion}").random() < self.share

    def reward(self, problem, completion) -> float:
        return 1.0 if self.is_correct(problem, completion) else 0.0
