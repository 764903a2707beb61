"""Compute and data accounting inside the trainer, and the callback interface metrics leave through.

FLOPs are counted analytically from the tokens each phase processes (padding included, as the hardware
computes it): a forward pass costs 2N per token plus the attention term 4 * n_layers * d_attn * keys attended;
a trained token costs 3x its forward (forward + backward). N counts the parameters that take part in matmuls
(everything but an untied input embedding table).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from transformers import PreTrainedModel

from rl import distributed
from rl.generate import Batch, distinct_rows
from rl.model import count_params

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

    n_params: int  # N: parameters in matmuls
    n_layers: int
    d_attn: int  # query/key width summed over heads

    @classmethod
    def of(cls, model: PreTrainedModel) -> FlopModel:
        c = model.config
        d_attn = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(count_params(model, non_embedding=True), c.num_hidden_layers, d_attn * c.num_attention_heads)

    def forward(self, tokens: int, keys_attended: int) -> float:
        """FLOPs of a forward pass over `tokens` tokens whose attention rows span `keys_attended` keys in all."""
        return 2.0 * self.n_params * tokens + 4.0 * self.n_layers * self.d_attn * keys_attended

    def sequences(self, rows: int, length: int, train: bool = False) -> float:
        """FLOPs of a parallel forward (x3 with backward when `train`) over `rows` sequences of `length`."""
        return (3.0 if train else 1.0) * self.forward(rows * length, rows * length * length)

    def generation(self, batch: Batch) -> float:
        """FLOPs of sampling `batch` (`sample`): one prefill per distinct prompt plus each cached decode step."""
        B, P = batch.prompt_ids.shape
        prompts = len(distinct_rows(batch.prompt_ids, batch.prompt_mask)[0])
        decode_tokens = B * (batch.completion_ids.shape[1] - 1)
        return self.sequences(prompts, P) + self.forward(decode_tokens, batch.decode_context)

    def logprobs(self, batch: Batch, train: bool = False, dedupe: bool = False) -> float:
        """FLOPs of `completion_logprobs(batch, dedupe=...)` (x3 with backward when `train`): every row over
        prompt + completion; deduplicated, one prefill per distinct prompt and the completion tokens but the last
        of each distinct row, each attending to its prompt and the tokens before it."""
        B, P = batch.prompt_ids.shape
        T = batch.completion_ids.shape[1]
        if not dedupe:
            return self.sequences(B, P + T, train)
        prompts = len(distinct_rows(batch.prompt_ids, batch.prompt_mask)[0])
        rows = len(distinct_rows(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)[0])
        keys = rows * ((T - 1) * P + (T - 1) * T // 2)  # token t of the completion attends to P + t keys
        return (3.0 if train else 1.0) * (self.sequences(prompts, P) + self.forward(rows * (T - 1), keys))


class Meter:
    """Cumulative FLOPs and device-seconds by phase, and data-volume counters; checkpointable."""

    def __init__(self, flop_model: FlopModel, devices: int = 1):
        self.fm = flop_model
        self.devices = devices
        self.flops: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a block as `name` (wall seconds)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def add(self, phase: str, flops: float) -> None:
        self.flops[phase] += flops

    def count(self, **counts: int) -> None:
        """Add to data counters, e.g. count(problems=8); names map to `data/...` keys."""
        for k, v in counts.items():
            self.counts[_COUNTER_KEYS[k]] += int(v)

    def metrics(self) -> dict[str, float]:
        """Cumulative compute and data metrics under their schema names, summed over ranks under torchrun
        (a collective: every rank calls it at the same points)."""
        m: dict[str, float] = {}
        for p in PHASES:
            m[f"compute/flops/{p}"] = self.flops.get(p, 0.0)
            m[f"compute/device_seconds/{p}"] = self.seconds.get(p, 0.0) * self.devices
        m["compute/flops"] = sum(self.flops.values())
        m["compute/device_seconds"] = sum(self.seconds.values()) * self.devices
        m["compute/gpu_hours"] = m["compute/device_seconds"] / 3600.0
        for k in COUNTERS:
            m[k] = float(self.counts.get(k, 0))
        m["data/samples"] = m["data/samples/solve"] + m["data/samples/verify"]
        return dict(zip(m, distributed.all_sum(list(m.values()))))

    def state_dict(self) -> dict:
        return {"flops": dict(self.flops), "seconds": dict(self.seconds), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.flops = defaultdict(float, state["flops"])
        self.seconds = defaultdict(float, state["seconds"])
        self.counts = defaultdict(int, state["counts"])


_COUNTER_KEYS = {k.split("/", 1)[1].replace("/", "_"): k for k in COUNTERS}
