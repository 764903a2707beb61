"""Resumable checkpoints: model (safetensors), optimizer, scheduler, RNG, step and accounting, written atomically.

Layout: `<dir>/ckpt-<phase>-<step>/` holds `model.safetensors` (with LoRA: `trainable.safetensors`, the adapters
only) and `state.pt`; `<dir>/latest` names the newest.
Each checkpoint is written to a temporary folder and renamed, and `latest` is replaced atomically, so a kill
at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rlscale.rl import distributed
from rlscale.rl.accounting import Meter, merged

STOP = threading.Event()  # set by a signal handler: trainers checkpoint at the next step boundary and stop


def stop_if_requested(ckpt_dir: Path | None, phase: str, step: int, *state) -> None:
    """After a finished step: when a stop was requested (on any rank), checkpoint (if there is a folder), raise."""
    if distributed.any_rank(STOP.is_set()):
        if ckpt_dir:
            save_checkpoint(ckpt_dir, phase, step, *state)
        raise KeyboardInterrupt(f"stopped by request after {phase} step {step}")


def save_checkpoint(
    ckpt_dir: Path,
    phase: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    meter: Meter,
) -> Path:
    """Write a checkpoint and point `latest` at it; older checkpoints are removed.

    Under torchrun every rank calls it: rank 0 writes the (replicated) weights and optimizer, and every rank's
    sampling RNG and accounting, so each resumes exactly its own stream and no rank's compute is lost or doubled."""
    ranks = distributed.gather({"generator": generator.get_state(), "meter": meter.state_dict()})
    if distributed.rank() != 0:
        distributed.barrier()
        return Path(ckpt_dir) / f"ckpt-{phase}-{step}"
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{phase}-{step}"
    tmp = ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if any(not p.requires_grad for p in model.parameters()):  # LoRA: only the adapters change
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp / "trainable.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    state = {
        "phase": phase,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
        "meter": meter.state_dict(),
        "ranks": ranks,
    }
    torch.save(state, tmp / "state.pt")
    final = ckpt_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = ckpt_dir / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, ckpt_dir / "latest")
    for old in ckpt_dir.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def latest_checkpoint(ckpt_dir: Path) -> tuple[str, int, Path] | None:
    """(phase, step, path) of the newest complete checkpoint, or None."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = Path(ckpt_dir) / name
    if not (path / "state.pt").is_file():
        return None
    _, phase, step = name.split("-")
    return phase, int(step), path


def load_checkpoint(
    ckpt_dir: Path,
    phase: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    meter: Meter,
) -> dict | None:
    """Restore everything from the newest checkpoint of `phase`; None when there is none."""
    found = latest_checkpoint(ckpt_dir)
    if found is None or found[0] != phase:
        return None
    path = found[2]
    device = str(next(model.parameters()).device)
    if (path / "trainable.safetensors").is_file():  # LoRA: the adapters; the frozen weights are the model's own
        trained = load_file(str(path / "trainable.safetensors"), device=device)
        missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(trained)
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]})")
        model.load_state_dict(trained, strict=False)
    else:
        load_model(model, str(path / "model.safetensors"), device=device)
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][distributed.rank()] if len(state.get("ranks", [])) == distributed.world() else None
    generator.set_state(mine["generator"] if mine else state["generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    if mine:
        meter.load_state_dict(mine["meter"])
    elif distributed.rank() == 0:  # a checkpoint of another world size: every rank's total, counted once, on rank 0
        meter.load_state_dict(merged([r["meter"] for r in state["ranks"]] if state.get("ranks") else [state["meter"]]))
    return state
