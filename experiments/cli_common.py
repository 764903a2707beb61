"""What the `rlscale` commands share: the error console, option types, safe printing, progress bars."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlscale.tracking.run import StoreError, safe_uri

console = Console(stderr=True)
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config field: key.sub=value.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
UriOpt = Annotated[str | None, typer.Option("--uri", help="Tracking URI (default: $MLFLOW_TRACKING_URI or mlruns/).")]
ExpOpt = Annotated[list[str] | None, typer.Option("--experiment", help="Experiment name (repeatable).")]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # terminal control bytes (ESC, CSI, BEL...); not \t \n


def plain(text: object) -> str:
    """Text from data (names, tags, messages) made safe to print: control bytes shown as '?', URL passwords masked."""
    return _CONTROL.sub("?", safe_uri(str(text)))


def term(text: object) -> str:
    """`plain` text for rich output (tables, progress, errors): its markup escaped, so '[/x]' prints as is."""
    return escape(plain(text))


def fail(message: str, debug: bool = False) -> None:
    """One clear error line and exit code 2 (the traceback only with --debug)."""
    if debug:
        console.print_exception()
    line = " ".join(str(message).split("\n"))
    console.print(f"[bold red]error:[/] {term(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def warn(message: str) -> None:
    """One warning line on stderr."""
    line = " ".join(str(message).split("\n"))
    console.print(f"[yellow]warning:[/] {term(line)}", highlight=False, soft_wrap=True)


class Quiet:
    """A callback that shows nothing (ranks other than 0 under torchrun)."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def new_progress() -> Progress:
    """A rich progress display on stderr: description, bar, m/n, elapsed and time left."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


class ProgressCallback:
    """Drives a rich progress bar from the trainer's metrics; the bar appears with the first metric.

    Given a running `progress` (a grid's, a sweep's), it adds its own line there and removes it on close."""

    def __init__(self, sft_steps: int, rl_steps: int, progress: Progress | None = None, label: str = ""):
        self.sft_steps = sft_steps  # SFT may stop early; RL steps are placed after the whole SFT budget
        self.total = sft_steps + rl_steps
        self.progress, self.owned, self.label, self.task = progress, progress is None, term(label), None

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None:
            self.progress = new_progress()
            self.progress.start()
        if self.task is None:
            self.task = self.progress.add_task(self.label, total=self.total)
        if "train/reward_mean" in metrics:
            verify = metrics.get("train/verify_reward_mean", 0.0)
            desc = f"GRPO reward {metrics['train/reward_mean']:.2f} verify {verify:.2f}"
        elif "sft/loss" in metrics:
            desc = f"SFT loss {metrics['sft/loss']:.3f}"
        else:
            desc = f"eval accuracy {metrics.get('eval/accuracy', float('nan')):.3f}"
        done = self.sft_steps + metrics["train/rl_step"] if "train/rl_step" in metrics else step
        self.progress.update(self.task, completed=done, description=f"{self.label} {desc}".strip())

    def close(self) -> None:
        if self.progress is not None and self.task is not None and not self.owned:
            self.progress.remove_task(self.task)
        if self.progress is not None and self.owned:
            self.progress.stop()


def store_client(uri: str | None):
    """A client of the store, or one error line within seconds when it does not answer."""
    from rlscale.tracking.run import open_client

    try:
        return open_client(uri, wait=5.0)
    except StoreError as e:
        fail(str(e))
