"""Resumable checkpoints: model (safetensors), optimizer, scheduler, RNG, step and accounting, written atomically.

Layout: `<dir>/ckpt-<phase>-<step>/` holds `model.safetensors` (with LoRA: `trainable.safetensors`, the adapters
only) and `state.pt`; `<dir>/latest` names the newest.
Each checkpoint is written to a temporary folder and renamed, and `latest` is replaced atomically, so a kill
at any point leaves the previous checkpoint intact. The state of the step that ended a phase says so (`finished`):
a resume never trains that phase again.

Folders: rlscale never deletes a file it did not write. Each folder it writes carries a marker (MARKER: what wrote
it and which files); a folder is only replaced or cleared when it is missing, empty, or marked and holding nothing
else (no added file, no link). Anything else is refused with one line (ValueError) before anything is written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rlscale.rl import distributed
from rlscale.rl.accounting import Meter, merged

STOP = threading.Event()  # set by a signal handler: trainers checkpoint at the next step boundary and stop
MARKER = ".rlscale.json"  # in every folder rlscale writes: {"kind": ..., "files": [...]} and what it was made from
PARTIAL = "partial"  # the kind of a temporary folder being written
CKPT_ENTRY = re.compile(r"(ckpt-(sft|rl)-\d+|\.ckpt-(sft|rl)-\d+\.tmp|latest|\.latest\.tmp|\.rlscale\.json(\.tmp)?)")


def stop_if_requested(ckpt_dir: Path | None, phase: str, step: int, *state, finished: bool = False) -> None:
    """After a finished step: when a stop was requested (on any rank), checkpoint (if there is a folder), raise."""
    if distributed.any_rank(STOP.is_set()):
        if ckpt_dir:
            save_checkpoint(ckpt_dir, phase, step, *state, finished=finished)
        raise KeyboardInterrupt(f"stopped by request after {phase} step {step}")


# ---------------------------------------------------------------- folders rlscale owns
def _files(folder: Path) -> list[str]:
    """Relative paths of everything under `folder` but folders; links are listed, never followed."""
    found = []
    for root, dirs, names in os.walk(folder):
        found += [str((Path(root) / n).relative_to(folder)) for n in names]
        found += [str((Path(root) / d).relative_to(folder)) for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(found)


def _empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


def write_marker(folder: Path, kind: str, **info: str) -> None:
    """Mark `folder` as written by rlscale (its `kind` and every file now in it), atomically."""
    text = json.dumps({"kind": kind, "files": [f for f in _files(folder) if f != MARKER]} | info)
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def marker(folder: Path) -> dict | None:
    """The marker of `folder` (a real folder, not a link), or None when rlscale did not mark it."""
    path = folder / MARKER
    if folder.is_symlink() or path.is_symlink() or not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("kind"), str) and isinstance(m.get("files"), list)
    return m if ok else None


def owned(folder: Path, kind: str) -> dict | None:
    """`folder`'s marker when rlscale wrote it as `kind` and it holds just the files it wrote (no link), else None."""
    m = marker(folder)
    if m is None or m["kind"] != kind:
        return None
    found = _files(folder)
    if set(found) - {MARKER, f"{MARKER}.tmp"} != set(m["files"]) or any((folder / f).is_symlink() for f in found):
        return None
    return m


def check_replaceable(folder: Path, kind: str) -> None:
    """ValueError (one line) unless `folder` is missing, an empty folder, or rlscale's own `kind` folder."""
    if os.path.lexists(folder) and not _empty_dir(folder) and owned(folder, kind) is None:
        raise ValueError(f"{folder} holds files rlscale did not write (or a link): rlscale never replaces them; "
                         "move them away or choose another folder")


def _remove_leftover(path: Path) -> None:
    """Remove what a killed writer left at `path` (an empty or marked folder); refuse anything else."""
    if os.path.lexists(path):
        if not _empty_dir(path) and marker(path) is None:
            raise ValueError(f"{path} is in the way and rlscale did not write it: move it away")
        shutil.rmtree(path)


def fresh_tmp(folder: Path) -> Path:
    """A new empty temporary folder `.<name>.tmp` beside `folder`, marked partial (the caller is its only writer:
    one left by a killed writer is removed first)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    _remove_leftover(tmp)
    tmp.mkdir(parents=True)
    write_marker(tmp, PARTIAL)
    return tmp


def publish(tmp: Path, folder: Path, kind: str, **info: str) -> None:
    """Mark the finished folder `tmp` as `kind` and rename it to `folder`, replacing only a missing, empty or
    rlscale-written `kind` folder (else ValueError); `folder` is never a half-written folder."""
    check_replaceable(folder, kind)
    write_marker(tmp, kind, **info)
    old = folder.with_name(f".{folder.name}.old")
    if os.path.lexists(folder) and not _empty_dir(folder):  # rlscale's own: moved aside, removed once replaced
        _remove_leftover(old)
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        if os.path.lexists(old) and not os.path.lexists(folder):
            os.replace(old, folder)
        raise
    if os.path.lexists(old):
        shutil.rmtree(old)


def check_checkpoints(ckpt_dir: Path) -> None:
    """ValueError (one line) unless `ckpt_dir` is missing, empty, or a marked folder of rlscale checkpoints only."""
    ckpt_dir = Path(ckpt_dir)
    if not os.path.lexists(ckpt_dir) or _empty_dir(ckpt_dir):
        return
    m = marker(ckpt_dir)
    if (m is None or m["kind"] != "checkpoints"
            or any(not CKPT_ENTRY.fullmatch(p.name) or p.is_symlink() for p in ckpt_dir.iterdir())):
        raise ValueError(f"{ckpt_dir} holds files rlscale did not write (or a link): rlscale keeps checkpoints only "
                         "in a folder of its own; move them away or choose another output_dir")


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove every checkpoint in `ckpt_dir` (a start without resume), after `check_checkpoints`."""
    ckpt_dir = Path(ckpt_dir)
    check_checkpoints(ckpt_dir)
    (ckpt_dir / "latest").unlink(missing_ok=True)
    for p in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # under torchrun every rank clears
        elif p.name != MARKER:
            p.unlink(missing_ok=True)


def save_checkpoint(
    ckpt_dir: Path,
    phase: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    meter: Meter,
    *,
    finished: bool = False,
    loop: dict | None = None,
) -> Path:
    """Write a checkpoint and point `latest` at it; older checkpoints are removed. `finished`: the phase ended at
    this step (a resume does not train it again). `loop`: this rank's own loop state (plain lists, strings, numbers),
    returned by `load_checkpoint` as `state["loop"]`.

    Under torchrun every rank calls it: rank 0 writes the (replicated) weights and optimizer, and every rank's
    sampling RNG and accounting, so each resumes exactly its own stream and no rank's compute is lost or doubled."""
    ranks = distributed.gather({"generator": generator.get_state(), "meter": meter.state_dict(), "loop": loop or {}})
    if distributed.rank() != 0:
        distributed.barrier()
        return Path(ckpt_dir) / f"ckpt-{phase}-{step}"
    ckpt_dir = Path(ckpt_dir)
    check_checkpoints(ckpt_dir)
    if marker(ckpt_dir) is None:  # missing or empty: made rlscale's
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_marker(ckpt_dir, "checkpoints")
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
        "finished": finished,
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
        if old.name != name and CKPT_ENTRY.fullmatch(old.name) and not old.is_symlink():
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
    state["loop"] = mine.get("loop", {}) if mine else {}  # another world size: each rank's loop starts afresh
    if mine:
        meter.load_state_dict(mine["meter"])
    elif distributed.rank() == 0:  # a checkpoint of another world size: every rank's total, counted once, on rank 0
        meter.load_state_dict(merged([r["meter"] for r in state["ranks"]] if state.get("ranks") else [state["meter"]]))
    return state
