"""Compute and data accounting inside the trainer, and the callback interface metrics leave through.

FLOPs are counted analytically from what runs (padding included, as the hardware computes it): a forward pass
costs 2N per token (N: the transformer blocks' parameters, LoRA adapters included), 2H per position whose logits
are computed (H = vocab x width, the LM head: one per prompt in a prefill, every position of a completion pass),
and the attention term 4 * n_layers * d_attn * keys attended. Backward costs 2x forward for every trained
weight (input and weight gradients); a frozen weight (LoRA's base, the frozen LM head) costs 1x: input gradients
only. So a trained token is 6N with every weight trained, about 4N + 6N_adapters with LoRA.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import psutil
import torch
from transformers import PreTrainedModel

from rlscale.rl import distributed
from rlscale.rl.energy import GpuEnergy
from rlscale.rl.generate import Batch, distinct_rows, pack

PHASES = ("sft", "rollout", "verify_rollout", "policy", "reference", "eval")
COUNTERS = (
    "data/problems",
    "data/samples/solve",
    "data/samples/verify",
    "data/tokens/prompt",
    "data/tokens/generated",
    "data/tokens/trained",
)


class Callback(Protocol):
    """Receives metrics from the trainer; `rl/` knows nothing of where they go."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class FlopModel:
    """Analytic FLOP counts for one transformer."""

    n_params: int  # N: parameters of the transformer blocks (adapters included; embeddings and LM head not)
    n_head: int  # H: the LM head's vocab x width, paid per position whose logits are computed
    n_layers: int
    d_attn: int  # query/key width summed over heads
    n_frozen: int = 0  # of N, the weights that take no gradient (LoRA's base): backward = input gradients only
    n_adapter: int = 0  # of N, LoRA adapters (switched off for the reference log-probs)
    head_frozen: bool = False  # the LM head takes no gradient

    @classmethod
    def of(cls, model: PreTrainedModel) -> FlopModel:
        c = model.config
        d_attn = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        head = model.get_output_embeddings().weight
        tables = {id(model.get_input_embeddings().weight), id(head)}
        body = [(n, p) for n, p in model.named_parameters() if id(p) not in tables]
        return cls(
            n_params=sum(p.numel() for _, p in body), n_head=head.numel(), n_layers=c.num_hidden_layers,
            d_attn=d_attn * c.num_attention_heads, n_frozen=sum(p.numel() for _, p in body if not p.requires_grad),
            n_adapter=sum(p.numel() for n, p in body if "lora_" in n), head_frozen=not head.requires_grad,
        )

    def without_adapter(self) -> FlopModel:
        """The same model with its LoRA adapters switched off (the reference policy)."""
        return replace(self, n_params=self.n_params - self.n_adapter, n_frozen=self.n_params - self.n_adapter,
                       n_adapter=0)

    def forward(self, tokens: int, keys_attended: int, logits: int | None = None, train: bool = False) -> float:
        """FLOPs of a pass over `tokens` tokens whose attention rows span `keys_attended` keys in all, computing
        logits at `logits` positions (default: every token); with `train`, forward and backward."""
        logits = tokens if logits is None else logits
        attention = 4.0 * self.n_layers * self.d_attn * keys_attended
        if not train:
            return 2.0 * self.n_params * tokens + 2.0 * self.n_head * logits + attention
        body = (6.0 * self.n_params - 2.0 * self.n_frozen) * tokens  # frozen weights: no weight gradient
        head = (4.0 if self.head_frozen else 6.0) * self.n_head * logits
        return body + head + 3.0 * attention

    def sequences(self, rows: int, length: int, train: bool = False, logits_per_row: int | None = None) -> float:
        """FLOPs of a parallel pass over `rows` sequences of `length` (forward and backward with `train`), logits
        kept at the last `logits_per_row` positions of each (default: all)."""
        keep = length if logits_per_row is None else logits_per_row
        return self.forward(rows * length, rows * length * length, rows * keep, train)

    def generation(self, batch: Batch) -> float:
        """FLOPs of sampling `batch` (`sample`): one prefill per distinct prompt (logits at its last position), its
        shared head (`batch.head` tokens) once for all, plus each cached decode step (one token and its logits per
        row still decoding)."""
        P, H = batch.prompt_ids.shape[1], batch.head
        prompts = len(distinct_rows(batch.prompt_ids, batch.prompt_mask)[0])
        if H:  # the head once (one logit), then every prompt's P - H other columns attending to all P
            prefill = self.forward(H, H * H, 1) + self.forward(prompts * (P - H), prompts * (P - H) * P, prompts)
        else:
            prefill = self.sequences(prompts, P, logits_per_row=1)
        return prefill + self.forward(batch.decode_tokens, batch.decode_context)

    def logprobs(self, batch: Batch, train: bool = False, dedupe: bool = False) -> float:
        """FLOPs of `completion_logprobs(batch, dedupe=...)` (forward and backward with `train`): every row over
        prompt + completion with logits at the last T + 1 positions; deduplicated, one pass over `pack` of the
        distinct rows: a sequence per distinct prompt, its rows' completion tokens but the last end to end, every
        column attending to all S of its sequence (the block mask is applied, not skipped), logits from the prompt's
        last column on."""
        B, P = batch.prompt_ids.shape
        T = batch.completion_ids.shape[1]
        if not dedupe:
            return self.sequences(B, P + T, train, logits_per_row=T + 1)
        prompts, _, _, _, S = pack(batch.distinct()[0])
        return self.sequences(len(prompts), S, train, logits_per_row=S - P + 1)


def cpu_devices(threads: int | None = None, share: float | None = None, cgroup: str = "/sys/fs/cgroup") -> float:
    """vCPUs a CPU run holds, the unit clouds bill, at most the CPUs it may use: its affinity mask and its
    container's CPU limit (quota / period of cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, in its own cgroup and
    those above it, under the `cgroup` mount). Alone, a run holds its torch threads (one per physical core by
    default) times the hardware threads of a core (SMT siblings sit idle but are rented too); one of k sweep workers
    holds `share` of the usable CPUs (default: the environment's RLSCALE_CPU_SHARE, which a sweep worker sets)."""

    def limit(folder: str) -> float:
        """The CPU limit of one cgroup folder in CPUs (v2 `cpu.max` "<quota|max> <period>", v1 quota -1 when
        unlimited), inf without one."""

        def read(name: str) -> str:
            with open(os.path.join(folder, name)) as f:
                return f.read().strip()

        try:
            v2 = os.path.isfile(os.path.join(folder, "cpu.max"))
            quota, period = read("cpu.max").split()[:2] if v2 else (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"))
            return float("inf") if quota in ("max", "-1") else int(quota) / int(period)
        except (OSError, ValueError):
            return float("inf")

    threads = threads or torch.get_num_threads()
    usable = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else psutil.cpu_count() or 1)
    try:
        with open("/proc/self/cgroup") as f:  # "0::/path" (v2), "4:cpu,cpuacct:/path" (v1)
            own = {c: path.strip() for _, cs, path in (line.split(":", 2) for line in f) for c in cs.split(",")}
    except (OSError, ValueError):
        own = {}
    for sub, key in (("", ""), ("cpu", "cpu"), ("cpu,cpuacct", "cpu")):  # the v2 mount, v1's cpu controller
        mount = os.path.normpath(os.path.join(cgroup, sub))
        folder = os.path.normpath(os.path.join(mount, own.get(key, "/").lstrip("/")))
        while folder == mount or folder.startswith(mount + os.sep):  # a container sees its own cgroup as the root
            usable = min(usable, limit(folder))
            folder = os.path.dirname(folder)
    share = share if share is not None else float(os.environ.get("RLSCALE_CPU_SHARE") or 0) or None
    if share:
        return usable * share
    smt = max(1, (psutil.cpu_count() or 1) // (psutil.cpu_count(logical=False) or psutil.cpu_count() or 1))
    return min(usable, threads * smt)


def merged(states: list[dict]) -> dict:
    """One meter state holding the sum of several (every rank's, when a run resumes with fewer ranks)."""
    out: dict = {"flops": defaultdict(float), "seconds": defaultdict(float), "counts": defaultdict(int),
                 "wall": 0.0, "kwh": 0.0}
    for st in states:
        for part in ("flops", "seconds", "counts"):
            for k, v in st[part].items():
                out[part][k] += v
        out["wall"] += st.get("wall", sum(st["seconds"].values()))
        out["kwh"] += st.get("kwh", 0.0)
    return out


class Meter:
    """Cumulative FLOPs and device-seconds by phase, the run's whole held time, GPU energy and data-volume
    counters; checkpointable.

    `devices` is what the run holds while it runs: vCPUs on a CPU (`cpu_devices`), its share of a GPU on a GPU (1
    alone, 1/k when k runs share it). Every second from `started` (default: now) is billed: the timed phases
    are the breakdown and the rest (model loading, setup, saving) is the phase `other`. `energy` reads this
    rank's GPU; its kWh count at the same share."""

    def __init__(self, flop_model: FlopModel, devices: float = 1, started: float | None = None,
                 energy: GpuEnergy | None = None):
        self.fm = flop_model
        self.devices = devices
        self.started = time.perf_counter() if started is None else started
        self.energy = energy
        self.flops: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)  # device-seconds by phase
        self.counts: dict[str, int] = defaultdict(int)
        self.wall_before = 0.0  # device-seconds held by a resumed run's earlier attempts (from its checkpoint)
        self.kwh_before = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block as `name` (wall seconds x devices)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += (time.perf_counter() - t0) * self.devices

    @contextmanager
    def counting(self, flop_model: FlopModel) -> Iterator[None]:
        """Count FLOPs with `flop_model` inside the block (a merged copy of a LoRA model runs no adapters)."""
        saved, self.fm = self.fm, flop_model
        try:
            yield
        finally:
            self.fm = saved

    def add(self, phase: str, flops: float) -> None:
        self.flops[phase] += flops

    def count(self, **counts: int) -> None:
        """Add to data counters, e.g. count(problems=8); names map to `data/...` keys."""
        for k, v in counts.items():
            self.counts[_COUNTER_KEYS[k]] += int(v)

    def held(self) -> float:
        """Device-seconds held so far: the whole wall time x devices, never less than the phases' sum."""
        wall = self.wall_before + (time.perf_counter() - self.started) * self.devices
        return max(wall, sum(self.seconds.values()))

    def kwh(self) -> float | None:
        """This rank's GPU energy at its share (earlier attempts included); None without NVML."""
        now = self.energy.kwh() if self.energy is not None else None
        return None if now is None else self.kwh_before + now * self.devices

    def metrics(self) -> dict[str, float]:
        """Cumulative compute and data metrics under their schema names, summed over ranks under torchrun
        (a collective: every rank calls it at the same points)."""
        m: dict[str, float] = {}
        for p in PHASES:
            m[f"compute/flops/{p}"] = self.flops.get(p, 0.0)
            m[f"compute/device_seconds/{p}"] = self.seconds.get(p, 0.0)
        m["compute/flops"] = sum(self.flops.values())
        m["compute/device_seconds"] = self.held()
        m["compute/device_seconds/other"] = m["compute/device_seconds"] - sum(self.seconds.values())
        for k in COUNTERS:
            m[k] = float(self.counts.get(k, 0))
        m["data/samples"] = m["data/samples/solve"] + m["data/samples/verify"]
        kwh = self.kwh()
        m["energy/gpu_kwh"], m["energy/ranks"] = (0.0, 0.0) if kwh is None else (kwh, 1.0)
        m = dict(zip(m, distributed.all_sum(list(m.values()))))
        m["compute/gpu_hours"] = m["compute/device_seconds"] / 3600.0
        if not m.pop("energy/ranks"):  # no rank could read its GPU's energy: none recorded, not zero
            del m["energy/gpu_kwh"]
        return m

    def state_dict(self) -> dict:
        return {"flops": dict(self.flops), "seconds": dict(self.seconds), "counts": dict(self.counts),
                "wall": self.held(), "kwh": self.kwh_before if (k := self.kwh()) is None else k}

    def load_state_dict(self, state: dict) -> None:
        self.flops = defaultdict(float, state["flops"])
        self.seconds = defaultdict(float, state["seconds"])
        self.counts = defaultdict(int, state["counts"])
        self.wall_before = state.get("wall", sum(state["seconds"].values()))
        self.kwh_before = state.get("kwh", 0.0)


_COUNTER_KEYS = {k.split("/", 1)[1].replace("/", "_"): k for k in COUNTERS}
