"""rlscale as the tracker of a Hugging Face TRL run (GRPOTrainer, or any transformers Trainer): `RLScaleCallback`.

    from rlscale.experiments.trl_callback import RLScaleCallback
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...,
                          callbacks=[RLScaleCallback(experiment="my-grpo")])

Nothing else in the training loop changes. The run lands in the same store as `rlscale train` ($MLFLOW_TRACKING_URI,
else the embedded `mlruns/`) with the same schema (tracking/SCHEMA.md): FLOPs counted as computed by observing the
model's forward calls with the FlopModel rlscale's own trainer uses (positions, keys attended, logits kept, grad on
or off, LoRA adapters on or off, gradient-checkpointing recomputation), device-seconds for the whole wall time,
dollars from the same price table, data volume that agrees with TRL's `num_tokens`, TRL's own metrics under their
names, a held-out score the reports can fit, and the run's fate. Where generation runs outside the model (vLLM), its
FLOPs come from the prompt and completion token counts of the batches trained on (tag `flops.rollout`); a model whose
config the FLOP model does not understand is counted at 2N per forward token and 6N per trained token (tag
`flops.model`), never silently zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from rlscale.experiments.config import describe_error
from rlscale.experiments.runner import dataset_fields, device_name, run_exists
from rlscale.rl.accounting import FlopModel, Meter, cpu_devices
from rlscale.rl.chat import ANSWER_RULE, for_model
from rlscale.rl.energy import GpuEnergy, gpu_uuid
from rlscale.rl.model import count_params
from rlscale.rl.pipeline import PipelineConfig
from rlscale.rl.tasks import Task, make_task
from rlscale.tracking.cost import device_key, load_price_table
from rlscale.tracking.run import TrackedRun, describe, flatten, git_info, open_client, safe_uri

log = logging.getLogger(__name__)
_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. :/]")  # what MLflow refuses in a metric name (transformers replaces it too)
# trainer args left out of a TRL run's recipe hash: budget, seed, names, logging, saving, evaluation, infrastructure
SCALE_KNOBS = ("output_dir", "run_name", "seed", "data_seed", "max_steps", "num_train_epochs", "resume_from_checkpoint",
               "overwrite_output_dir", "per_device_eval_batch_size", "num_generations_eval", "disable_tqdm",
               "local_rank", "use_cpu", "no_cuda", "ignore_data_skip", "restore_callback_states_from_checkpoint",
               "num_completions_to_print", "full_determinism")
SCALE_PREFIXES = ("logging_", "save_", "eval_", "hub_", "push_to_hub", "report_", "dataloader_", "ddp_", "log_",
                  "vllm_", "fsdp", "deepspeed", "accelerator_config", "wandb", "trackio", "include_", "torch_compile")


class TrackerError(ValueError):
    """Bad input to the callback (a score it cannot use, a task config that does not validate)."""


def trl_recipe(args: Any, trainer: str, model_name: str) -> str:
    """A 10-hex hash of the trainer class, the model and its args without the scale knobs: TRL runs that differ only in
    budget, seed or logging share it, and no rlscale run's recipe (a hash of another shape) can equal it."""
    data = {k: v for k, v in args.to_dict().items()
            if k not in SCALE_KNOBS and not k.startswith(SCALE_PREFIXES)}
    spec = {"trainer": trainer, "model": model_name, "args": data}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _find_trainer() -> Trainer | None:
    """The Trainer whose method is calling this callback (callbacks are not handed the trainer itself)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


def _resume_path() -> str | None:
    """The checkpoint `trainer.train(resume_from_checkpoint=...)` resumes from, read from the training loop's frame."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_locals.get("resume_from_checkpoint")
        if frame.f_code.co_name == "_inner_training_loop":
            return path if isinstance(path, str) else None
        frame = frame.f_back
    return None


class RLScaleCallback(TrainerCallback, ExportableState):
    """One MLflow run per `trainer.train()` with rlscale's compute, data, cost, score and fate.

    Every option has a default. `task` (an rlscale task config, e.g. `{"name": "dataset", "path": "w.jsonl",
    "verifier": "numeric"}`) or `eval_dataset` with `score` (a TRL-style reward function: `score(prompts=...,
    completions=..., **columns) -> list[float]`, 1.0 for correct) give a held-out greedy accuracy at the start
    (`eval/sft_accuracy`), every `eval_every` steps and at the end (`eval/accuracy`, `eval/rl_gain`); `score_metric`
    instead maps one of the trainer's own logged metrics (e.g. `eval_reward`) onto `eval/accuracy`. `model_name` is the
    `model.name` tag (default: the model folder's name); `phase` and `recipe` override the run's tags of those names."""

    _live: ClassVar[weakref.ref | None] = None  # the instance the user made: a checkpoint's state restores into it

    def __new__(cls, *args: Any, _restore: bool = False, **kwargs: Any) -> RLScaleCallback:
        # transformers restores an ExportableState callback as `type(cb)(**state["args"])`: hand back the user's own
        # instance (its score function and eval set cannot be stored in a checkpoint), then set the saved attributes
        live = cls._live() if (_restore and cls._live is not None) else None
        return live if live is not None else super().__new__(cls)

    def __init__(self, experiment: str | None = None, run_name: str | None = None, *, uri: str | None = None,
                 root: str | Path = "mlruns", phase: str | None = None, recipe: str | None = None,
                 prices: str | None = None, price_key: str | None = None, model_name: str | None = None,
                 task: dict | Any = None,
                 eval_dataset: Any = None, score: Callable[..., list[float]] | None = None,
                 score_metric: str | None = None, eval_problems: int = 100, eval_seed: int = 12345,
                 eval_every: int = 0, eval_max_new_tokens: int | None = None, eval_batch_size: int = 64,
                 flush_seconds: float = 10.0, _restore: bool = False):
        if _restore and getattr(self, "_made", False):
            return
        if sum(x is not None for x in (task, score_metric, score)) > 1:
            raise TrackerError("RLScaleCallback: give one of task=, score= (with eval_dataset=) or score_metric=")
        if (score is None) != (eval_dataset is None):
            raise TrackerError("RLScaleCallback: score= and eval_dataset= go together (held-out set and verifier)")
        if score is not None and not callable(score):
            raise TrackerError(f"RLScaleCallback: score must be a function, not {type(score).__name__}")
        if eval_problems < 1 or eval_every < 0 or eval_batch_size < 1 or flush_seconds < 0:
            raise TrackerError("RLScaleCallback: eval_problems and eval_batch_size must be >= 1, eval_every and "
                               "flush_seconds >= 0")
        self.task: Task | None = None
        if task is not None:
            try:
                self.task = make_task(PipelineConfig(task=task).task)
                self.task.problems(eval_problems, "eval", seed=eval_seed)
            except ValidationError as e:
                raise TrackerError(describe_error(e, "RLScaleCallback")) from None
            except (ValueError, OSError) as e:
                raise TrackerError(f"RLScaleCallback: task: {str(e).splitlines()[0][:300]}") from None
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "trl"
        self.run_name, self.uri, self.root, self.phase = run_name, uri, Path(root), phase
        self.recipe, self.prices, self.price_key, self.model_name = recipe, prices, price_key, model_name
        self.eval_dataset, self.score, self.score_metric = eval_dataset, score, score_metric
        self.eval_problems, self.eval_seed, self.eval_every = eval_problems, eval_seed, eval_every
        self.eval_max_new_tokens, self.eval_batch_size, self.flush_seconds = (eval_max_new_tokens, eval_batch_size,
                                                                              flush_seconds)
        self.created = time.perf_counter()  # the bill starts here: the trainer's construction is held time too
        self._resumed: dict | None = None  # set from a checkpoint's state (ExportableState)
        self._trainer: Trainer | None = None
        self._made = True
        type(self)._live = weakref.ref(self)

    # ------------------------------------------------------------------ checkpointed state
    def state(self) -> dict:
        """What a checkpoint keeps (ExportableState): the run and its totals summed over ranks at the last step."""
        return {"args": {"_restore": True},
                "attributes": {"_resumed": {"run_id": getattr(self, "run_id", None),
                                            "totals": getattr(self, "_totals", {}),
                                            "start_score": getattr(self, "_start_score", None)}}}

    # ------------------------------------------------------------------ before training
    def on_init_end(self, args, state, control, **kwargs):
        """Checks that need no training (an unknown GPU, an unreachable store) fail here, in the trainer's
        constructor; the callback moves first in the trainer's list (so its run is active before transformers'
        MLflowCallback looks for one) and wraps `trainer.train` to record a failure or Ctrl-C as the run's fate."""
        self._trainer = _find_trainer()
        if self._trainer is not None:
            handler = self._trainer.callback_handler
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
            self._wrap_train(self._trainer)
        self._check(args, state)

    def _check(self, args, state) -> None:
        device = args.device
        self.table = load_price_table(self.prices)
        self.device_type = device.type
        self.device_name = device_name(device)
        self.key = device_key(device.type, self.device_name, self.table, self.price_key)  # unknown GPU: PriceError
        self.per_rank = 1.0 if device.type == "cuda" else float(cpu_devices())
        self.world = args.world_size
        if state.is_world_process_zero:
            self.client = open_client(self.uri, self.root)  # unreachable: StoreError

    def _wrap_train(self, trainer: Trainer) -> None:
        if getattr(trainer.train, "_rlscale", False):
            return
        train = trainer.train

        def tracked_train(*a: Any, **kw: Any) -> Any:
            try:
                out = train(*a, **kw)
            except BaseException as e:
                live = next((c for c in trainer.callback_handler.callbacks if isinstance(c, RLScaleCallback)), self)
                live._end_on_exception(e)
                raise
            killed = next((c for c in trainer.callback_handler.callbacks
                           if isinstance(c, RLScaleCallback) and c._sigterm), None)
            if killed is not None:  # stopped by SIGTERM after a checkpoint: now die of it, as the sender meant
                signal.signal(signal.SIGTERM, killed._old_handler or signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        tracked_train._rlscale = True  # type: ignore[attr-defined]
        trainer.train = tracked_train  # type: ignore[method-assign]

    # ------------------------------------------------------------------ training begins
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs):
        trainer = self._trainer or _find_trainer()
        if not hasattr(self, "key"):  # added with trainer.add_callback: no on_init_end
            self._check(args, state)
        if trainer is not None and not getattr(trainer.train, "_rlscale", False):
            log.warning("RLScaleCallback was added after the trainer was built: pass it in callbacks=[...] so that an "
                        "exception marks the run FAILED (until then `rlscale runs reconcile` marks it KILLED)")
        self._trainer = trainer
        model = getattr(trainer, "model", None) or model  # the object TRL trains and generates with (PEFT-wrapped)
        self.model, self.tokenizer, self.args = model, processing_class, args
        self.lead = state.is_world_process_zero
        self._sigterm, self._old_handler, self.tracked, self._ended = False, None, None, False
        self._span: tuple[float, float] | None = None  # (start, seconds excluded) of the open policy span
        self._busy = 0  # inside a timed block (generate, our eval): its forward calls are not timed again
        self._in_eval = self._cached = False
        self._step_data: dict[str, float] = {}
        self.mu = int(getattr(args, "num_iterations", 1) or 1)
        self.groups = int(getattr(args, "num_generations", 1) or 1)
        self.vllm = bool(getattr(args, "use_vllm", False))
        self.grad_phase = "sft" if "SFT" in type(trainer).__name__ else "policy"
        try:
            self.fm = FlopModel.of(model)
            self.flops_model = "analytic"
        except Exception as e:  # a config the FLOP model does not read: 2N per forward token, 6N per trained token
            body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
            self.fm = FlopModel(n_params=body, n_head=0, n_layers=0, d_attn=0,
                                n_frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad))
            self.flops_model = "6N"
            log.warning("FLOP model cannot read %s (%s): FLOPs counted at 2N per token forward, 6N trained",
                        type(model).__name__, str(e).splitlines()[0][:200])
        self.recompute = recomputed(model, self.fm)
        cuda = args.device.type == "cuda"
        self.meter = Meter(self.fm, devices=self.per_rank, started=self.created,
                           energy=GpuEnergy([gpu_uuid(args.device)]) if cuda else None)
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._lora = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]  # LoRA layers: adapters on or off
        # the causal LM itself: a PEFT wrapper's generate() calls it directly, past the wrapper's own forward
        self._hooks = self._observe(model.get_base_model() if hasattr(model, "get_base_model") else model)
        ref = getattr(trainer, "ref_model", None)
        if isinstance(ref, torch.nn.Module):
            try:
                ref_fm = FlopModel.of(ref)
            except Exception:
                ref_fm = self.fm.without_adapter()
            self._hooks += self._observe(ref, reference=ref_fm)
        self._wrap_generate(model)
        saved, self._resumed = self._resumed or self._checkpoint_state(_resume_path()), None
        self._totals: dict[str, float] = dict(saved["totals"]) if saved else {}
        self._start_score = saved.get("start_score") if saved else None
        self.redone: dict[str, float] = {}
        if self.lead:
            self._open_run(trainer, args, state, model, train_dataloader, saved)
        elif saved:  # rank 0 carries the summed totals of every rank; the others start from zero
            self._totals = {}
        self._load_totals()
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self._has_eval() and saved is None:
            self._log_eval(state.global_step, start=True)

    def _checkpoint_state(self, path: str | None) -> dict | None:
        """This callback's saved state in a checkpoint's trainer_state.json (when transformers did not restore it)."""
        if not path:
            return None
        try:
            data = json.loads((Path(path) / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return None
        saved = data.get("stateful_callbacks", {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        return (saved or {}).get("attributes", {}).get("_resumed")

    def _open_run(self, trainer, args, state, model, train_dataloader, saved: dict | None) -> None:
        import mlflow

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        model_name = self.model_name or Path(str(getattr(base.config, "_name_or_path", "") or "")).name or type(
            base).__name__
        trainer_class = type(trainer).__name__ if trainer is not None else "Trainer"
        commit, _ = git_info()
        held = self.per_rank * self.world
        unit = self.table[self.key].unit
        tags = {
            "mlflow.source.name": safe_uri(shlex.join(sys.argv))[:500], "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": commit, "trainer": "trl", "trainer.class": trainer_class,
            "phase": self.phase or ("sft" if self.grad_phase == "sft" else "rl"),
            "recipe": self.recipe or trl_recipe(args, trainer_class, model_name),
            "task": self.task.name if self.task is not None else "custom", "model.name": model_name,
            "model.params": str(count_params(model)), "model.trainable_params": str(count_params(model, True)),
            "device.type": self.device_type, "device.name": self.device_name, "device.unit": unit,
            "device.count": f"{held:g}", "device.share": "1", "world_size": str(self.world), "seed": str(args.seed),
            "device.dtype": "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32",
            "device.threads_vcpus": "1" if self.device_type == "cuda" else f"{cpu_devices(share=0.0):g}",  # MFU's peak
            "rlscale.version": version("rlscale"), "flops.model": self.flops_model,
            "flops.rollout": "token_counts" if self.vllm else ("observed" if self.grad_phase != "sft" else "none"),
        }
        params = flatten({f"args.{k}": v for k, v in args.to_dict().items()}) | {"model.name": model_name}
        prices = {k: e.usd_per_hour for k, e in self.table.items()}
        run_id = saved.get("run_id") if saved else None
        if run_id and not run_exists(self.client, run_id):  # the store was switched since: a new run here
            log.warning("the checkpoint belongs to run %s, which is not in the store %s: recorded as a new run",
                        run_id, safe_uri(self.client.tracking_uri))
            run_id, self._totals = None, {}
        active = mlflow.active_run()
        joined = active is not None and run_id is None
        if joined:  # the user opened a run around trainer.train(): log into it, leave its end to them
            run_id = active.info.run_id
        self.tracked = TrackedRun(self.client, self.experiment, self.run_name or f"{model_name}-{trainer_class}",
                                  tags, params, self.key, prices, self.flush_seconds, self.root,
                                  resume_run_id=run_id, devices=held, joined=joined)
        self.run_id = self.tracked.run_id
        self.joined = joined
        self.tracked.summary = f"{trainer_class} on {model_name}"
        if joined or run_id:  # a joined or resumed run: the tags of this attempt too
            for k, v in tags.items():
                self.tracked.set_tag(k, v)
        if saved and run_id:  # work done after the checkpoint by the attempt that died was paid for: keep it
            last = self.client.get_run(run_id).data.metrics
            for k, v in self._totals.items():
                if k.startswith("compute/") and last.get(k, 0.0) > v:
                    self.redone[k] = last[k] - v
                    self._totals[k] = last[k]
        self._mlflow_cb = trainer is not None and any(
            type(c).__name__ == "MLflowCallback" for c in trainer.callback_handler.callbacks)
        self._uri_before: str | None | bool = False  # False: the fluent API's tracking URI was left alone
        if self._mlflow_cb and not joined:  # transformers' MLflowCallback (report_to="mlflow") logs into the run
            self._uri_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # that is active
            mlflow.set_tracking_uri(self.client.tracking_uri)
            if active is None:
                mlflow.start_run(run_id=self.run_id)
        if train_dataloader is not None and getattr(train_dataloader, "dataset", None) is not None:
            self._log_dataset(train_dataloader.dataset, "train")
        eval_set = self.eval_dataset if self.eval_dataset is not None else getattr(trainer, "eval_dataset", None)
        if self.task is not None:
            eval_set = [{"question": self.task.question(p), "answer": self.task.answer(p)} for p in self._problems()]
        if eval_set is not None and not isinstance(eval_set, dict):
            self._log_dataset(eval_set, "eval")

    def _log_dataset(self, data: Any, context: str) -> None:
        try:
            self.tracked.log_dataset(dataset_fields(data, f"{self.experiment}-{context}"), context)
        except Exception as e:  # a dataset MLflow cannot describe does not stop the run
            log.warning("dataset not recorded (%s): %s", context, str(e).splitlines()[0][:200] if str(e) else e)

    def _load_totals(self) -> None:
        t = self._totals
        def by_phase(prefix: str) -> dict[str, float]:
            return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix) and k[len(prefix):] != "other"}

        self.meter.load_state_dict({
            "flops": by_phase("compute/flops/"), "seconds": by_phase("compute/device_seconds/"),
            "counts": {k: int(v) for k, v in t.items() if k.startswith("data/") and k != "data/samples"},
            "wall": t.get("compute/device_seconds", 0.0), "kwh": t.get("energy/gpu_kwh", 0.0)})

    # ------------------------------------------------------------------ observing the model
    def _phase(self, module: torch.nn.Module, reference: bool) -> str:
        if self._in_eval or (not module.training and not reference):
            return "eval"
        if reference or (self._lora and (self._lora[0].disable_adapters or self._lora[0].active_adapters == ["ref"])):
            return "reference"
        if self._busy or self._cached:
            return "rollout"
        return self.grad_phase if torch.is_grad_enabled() else "policy"

    def _observe(self, module: torch.nn.Module, reference: FlopModel | None = None) -> list:
        """Forward hooks that count each call's FLOPs (and time it, outside a timed block) by phase."""
        calls: list[tuple[str, float]] = []

        def before(mod, args, kwargs):  # a no-grad call with a KV cache is a generation step, whoever calls it
            self._cached = not torch.is_grad_enabled() and (kwargs.get("use_cache") is True or any(
                kwargs.get(k) is not None for k in ("past_key_values", "cache")))
            phase = self._phase(mod, reference is not None)
            now = time.perf_counter()
            if phase in ("policy", "sft") and torch.is_grad_enabled() and self._span is None:
                self._span = (now, 0.0)  # forward, loss and backward: until the micro-step ends
            calls.append((phase, now))

        def after(mod, args, kwargs, output):
            phase, t0 = calls.pop()
            fm = reference or self.fm
            if phase == "reference" and reference is None:
                fm = fm.without_adapter() if self._lora and self._lora[0].disable_adapters else fm
            self._count(mod, fm, phase, args, kwargs, output)
            if self._busy or (phase in ("policy", "sft") and torch.is_grad_enabled()):
                return
            dt = time.perf_counter() - t0
            self.meter.seconds[phase] += dt * self.meter.devices
            if self._span is not None:
                self._span = (self._span[0], self._span[1] + dt)

        return [module.register_forward_pre_hook(before, with_kwargs=True),
                module.register_forward_hook(after, with_kwargs=True)]

    def _count(self, mod, fm: FlopModel, phase: str, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            return
        B, T = x.shape[0], x.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            K = mask.shape[1]
        else:
            cache = kwargs.get("past_key_values") or kwargs.get("cache")
            K = T + (cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0)
        logits = getattr(output, "logits", None)
        kept = logits.shape[1] if logits is not None and logits.dim() == 3 else T  # logits per row
        labels, shifted = kwargs.get("labels"), kwargs.get("shift_labels")
        targets = (shifted != -100) if shifted is not None else (labels[:, 1:] != -100) if labels is not None else None
        positions, fused = B * kept, bool(kwargs.get("fused_lm_head")) and targets is not None
        if fused:  # TRL's fused head: every position but the last, or (Triton on a GPU) the scored ones only
            positions = int(targets.sum()) if _scores_valid_only(x.device) else B * (T - 1)
        train = torch.is_grad_enabled() and phase in ("policy", "sft")
        flops = fm.forward(B * T, B * T * K, positions, train=train)
        if train and fused:
            flops += 2.0 * fm.n_head * positions  # its backward projects each chunk again before the two gradients
        if train and self.recompute is not None:
            flops += self.recompute.forward(B * T, B * T * K, 0)  # checkpointed blocks run forward again in backward
        self.meter.add(phase, flops)
        if not train or mask is None or mask.dim() != 2:
            return
        if targets is not None:  # the completion tokens: those with a label
            completion = targets.sum(1).double()
        else:  # logits kept for the completion and the position before it
            completion = mask[:, T - kept + 1 :].sum(1).double() if kept < T else mask[:, 1:].sum(1).double()
        self.meter.count(tokens_trained=int(completion.sum()))
        if self.grad_phase == "sft":  # supervised rows: each is a problem seen once per pass
            self.meter.count(problems=B)
        if self.vllm and self.grad_phase == "policy":  # generation unseen: count it from the batch trained on
            prompt = mask.sum(1).double() - completion
            steps = (completion - 1).clamp(min=0)  # decode steps after the prefill's first token
            gen = fm.forward(int(prompt.sum()), int((prompt * prompt).sum()), B) + fm.forward(
                int(steps.sum()), int((steps * (prompt + (completion + 2) / 2)).sum()))
            self.meter.add("rollout", gen / self.mu)
            self._add_data(B / self.mu, float(prompt.sum()) / self.mu, float(completion.sum()) / self.mu)

    def _add_data(self, samples: float, prompt: float, generated: float) -> None:
        d = self._step_data
        for k, v in (("samples", samples), ("prompt", prompt), ("generated", generated)):
            d[k] = d.get(k, 0.0) + v

    def _wrap_generate(self, model: torch.nn.Module) -> None:
        generate = model.generate
        eos = getattr(self._trainer, "eos_token_ids", None) or [
            t for t in ([getattr(self.tokenizer, "eos_token_id", None)]
                        + list(_as_list(model.generation_config.eos_token_id))) if t is not None]

        def observed_generate(*a: Any, **kw: Any) -> Any:
            phase = "eval" if (self._in_eval or not model.training) else "rollout"
            self._busy += 1
            t0 = time.perf_counter()
            try:
                out = generate(*a, **kw)
            finally:
                self._busy -= 1
                dt = time.perf_counter() - t0
                self.meter.seconds[phase] += dt * self.meter.devices
                if self._span is not None:
                    self._span = (self._span[0], self._span[1] + dt)
            ids = kw.get("input_ids", a[0] if a else None)
            seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
            if phase == "rollout" and ids is not None and seqs is not None:
                mask = kw.get("attention_mask")
                prompt = int(mask.sum()) if mask is not None else ids.numel()
                completion = seqs[:, ids.shape[1] :]
                is_eos = torch.isin(completion, torch.tensor(eos, device=completion.device))
                ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion.shape[1])
                self._add_data(ids.shape[0], prompt, float(ends.sum()))
            return out

        model.generate = observed_generate

    def _close_span(self) -> None:
        if self._span is not None:
            start, excluded = self._span
            self.meter.seconds[self.grad_phase] += (time.perf_counter() - start - excluded) * self.meter.devices
            self._span = None

    def on_substep_end(self, args, state, control, **kwargs):
        self._close_span()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._close_span()
        self._span = (time.perf_counter(), 0.0)  # the optimizer step is the policy update's too

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._close_span()

    # ------------------------------------------------------------------ per step
    def on_step_end(self, args, state, control, **kwargs):
        self._close_span()
        self._flush_step_data()
        m = self._metrics()
        if self.lead:
            self.tracked.on_log(state.global_step, m)
        if (self._has_eval() and self.eval_every and state.global_step % self.eval_every == 0
                and state.global_step < state.max_steps):
            self._log_eval(state.global_step)
        if self._sigterm:  # checkpoint now, then stop; train() then re-raises the signal
            control.should_save = True
            control.should_training_stop = True
        return control

    def _flush_step_data(self) -> None:
        d, self._step_data = self._step_data, {}
        if d:
            self._frac = getattr(self, "_frac", {})
            for k, key in (("samples", "samples_solve"), ("prompt", "tokens_prompt"),
                           ("generated", "tokens_generated")):
                whole = d.get(k, 0.0) + self._frac.get(k, 0.0)
                self.meter.count(**{key: int(whole)})
                self._frac[k] = whole - int(whole)
            problems = d.get("samples", 0.0) / self.groups + self._frac.get("problems", 0.0)
            self.meter.count(problems=int(problems))
            self._frac["problems"] = problems - int(problems)

    def _metrics(self) -> dict[str, float]:
        """The run's cumulative compute and data metrics, summed over ranks (a collective: every rank calls it)."""
        m = self.meter.metrics()
        if self.redone:
            m |= {f"{k.replace('compute/', 'compute/redone/', 1)}": v for k, v in self.redone.items()
                  if k in ("compute/flops", "compute/device_seconds")}
        self._totals = m
        return m

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.lead or self.tracked is None or not logs:
            return
        numbers = {_METRIC_NAME.sub("_", k): float(v) for k, v in logs.items()  # names as MLflow takes them
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        out: dict[str, float] = {}
        if not self._mlflow_cb:  # transformers' MLflowCallback logs them itself (into this run)
            out |= numbers
        if self.score_metric and self.score_metric in numbers:
            value = numbers[self.score_metric]
            if self._start_score is None:
                self._start_score = value
                out["eval/sft_accuracy"] = value
            out["eval/accuracy"] = value
        if out:
            self.tracked.on_log(state.global_step, out)

    # ------------------------------------------------------------------ held-out score
    def _has_eval(self) -> bool:
        return self.task is not None or self.score is not None

    def _problems(self):
        return self.task.problems(self.eval_problems, "eval", seed=self.eval_seed)

    def _eval_set(self) -> tuple[list, Callable[[list, list], list[float]]]:
        """Held-out prompts (text or chat messages, as TRL takes them) and a scorer of their completions."""
        if self.task is not None:
            task = for_model(self.task, self.tokenizer)
            problems = self._problems()
            chat = task is not self.task
            bos = getattr(self.tokenizer, "bos_token", None) or ""
            prompts = ([[{"role": "user", "content": f"{self.task.question(p)}\n{ANSWER_RULE}"}] for p in problems]
                       if chat else [bos + p.prompt for p in problems])
            return prompts, lambda ps, texts: [float(task.is_correct(p, t)) for p, t in zip(problems, texts)]
        rows = [dict(r) for r in self.eval_dataset][: self.eval_problems]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}

        def scorer(prompts: list, texts: list) -> list[float]:
            completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                           for p, t in zip(prompts, texts)]
            name = getattr(self.score, "__name__", type(self.score).__name__)
            try:
                values = self.score(prompts=prompts, completions=completions, **columns)
            except Exception as e:
                raise TrackerError(f"score function {name} raised {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
            if not isinstance(values, list | tuple) or len(values) != len(texts):
                raise TrackerError(f"score function {name} must return one number per completion ({len(texts)})")
            return [float(v) if v is not None else 0.0 for v in values]

        return [r["prompt"] for r in rows], scorer

    @torch.no_grad()
    def _accuracy(self) -> float:
        prompts, scorer = self._eval_set()
        model, tok = self.model, self.tokenizer
        tok = getattr(tok, "tokenizer", tok)  # a processor: its tokenizer
        texts_in = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list)
                    else p for p in prompts]
        max_new = self.eval_max_new_tokens or getattr(self.args, "max_completion_length", None) or 256
        was_training = model.training
        model.eval()
        self._in_eval = True
        device = next(model.parameters()).device
        texts: list[str] = []
        try:
            for i in range(0, len(texts_in), self.eval_batch_size):
                enc = tok(texts_in[i : i + self.eval_batch_size], add_special_tokens=False, padding=True,
                          padding_side="left", return_tensors="pt").to(device)
                out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                     temperature=None, top_p=None, top_k=None)
                texts += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        finally:
            self._in_eval = False
            model.train(was_training)
        scores = scorer(prompts, texts)
        return sum(scores) / len(scores)

    def _log_eval(self, step: int, start: bool = False, end: bool = False) -> dict[str, float]:
        """Held-out greedy accuracy on rank 0, logged with the compute that includes it."""
        m: dict[str, float] = {}
        if self.lead:
            m["eval/accuracy"] = self._accuracy()
            if start:
                self._start_score = m["eval/accuracy"]
                m["eval/sft_accuracy"] = m["eval/accuracy"]
            if end and self._start_score is not None:
                m["eval/sft_accuracy"] = self._start_score
                m["eval/rl_gain"] = m["eval/accuracy"] - self._start_score
        m |= self._metrics()
        if self.lead:
            self.tracked.on_log(step, m)
        return m

    # ------------------------------------------------------------------ the end
    def on_train_end(self, args, state, control, **kwargs):
        if self._has_eval():
            self._log_eval(state.global_step, end=True)
        else:
            m = self._metrics()
            if self.lead:
                if self.score_metric and self._start_score is not None and "eval/accuracy" in self.tracked.last:
                    m["eval/rl_gain"] = self.tracked.last["eval/accuracy"] - self._start_score
                    m["eval/sft_accuracy"] = self._start_score
                self.tracked.on_log(state.global_step, m)
        if self._sigterm:
            self._finish("KILLED", {"killed_by": "SIGTERM"})
        else:
            self._finish("FINISHED")

    def _end_on_exception(self, exc: BaseException) -> None:
        if getattr(self, "meter", None) is None or getattr(self, "_ended", True):
            return
        self._close_span()
        try:
            m = self._metrics() if not torch.distributed.is_initialized() else self._totals
        except Exception:
            m = self._totals
        if self.lead and self.tracked is not None and m:
            self.tracked.on_log(int(getattr(self._trainer.state, "global_step", 0)) if self._trainer else 0, m)
        if isinstance(exc, KeyboardInterrupt):
            self._finish("KILLED", {"killed_by": "KeyboardInterrupt"})
        else:
            self._finish("FAILED", {"error.class": type(exc).__name__, "error.message": safe_uri(str(exc))[:5000]})

    def _finish(self, status: str, tags: dict[str, str] | None = None) -> None:
        for h in self._hooks:
            h.remove()
        self.model.__dict__.pop("generate", None)  # the model's own generate again
        if self._old_handler is not None and threading.current_thread() is threading.main_thread():
            if not self._sigterm:
                signal.signal(signal.SIGTERM, self._old_handler)
        self._ended = True
        if not self.lead or self.tracked is None:
            return
        import mlflow

        tracked = self.tracked
        if self.joined and status == "FINISHED":  # the user's own run: they end it
            tracked.flush()
            return
        tracked.summary = tracked.summary or "TRL run"
        for k, v in (tags or {}).items():
            tracked.set_tag(k, v)
        tracked._bill_to_end()
        tracked.finish(status, {"mlflow.note.content": describe(tracked.summary, tracked.last, status, tracked.unit)})
        active = mlflow.active_run()
        if active is not None and active.info.run_id == tracked.run_id:
            mlflow.end_run(status)
        if self._uri_before is not False:  # the fluent API's tracking URI (and $MLFLOW_TRACKING_URI) as they were
            mlflow.set_tracking_uri(self._uri_before)

    def _on_sigterm(self, signum, frame) -> None:
        if self._sigterm:  # a second SIGTERM: stop now
            signal.signal(signal.SIGTERM, self._old_handler or signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._sigterm = True
        log.warning("SIGTERM: stopping after this step with a checkpoint; the run is recorded KILLED")


def recomputed(model: torch.nn.Module, fm: FlopModel) -> FlopModel | None:
    """What gradient checkpointing runs again in backward, as a FlopModel without LM head (None when it is off): each
    checkpointed block's forward, less its last matmul when checkpointing is non-reentrant (PyTorch stops recomputing
    once the tensors backward needs exist, and the block's output is not one of them)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        return None
    params = 0
    for layer in layers:
        params += sum(p.numel() for p in layer.parameters())
        ckpt = getattr(layer, "_gradient_checkpointing_func", None)
        if not getattr(ckpt, "keywords", {}).get("use_reentrant", False):
            last = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1:]
            params -= sum(p.numel() for m in last for p in m.parameters())
    return FlopModel(n_params=params, n_head=0, n_layers=len(layers), d_attn=fm.d_attn)


def _scores_valid_only(device: torch.device) -> bool:
    """Whether TRL's fused LM head projects only the scored positions on `device` (Triton), not every position."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:
        return device.type == "cuda"
    return bool(_use_triton(device))


def _as_list(x: Any) -> list:
    return [] if x is None else list(x) if isinstance(x, list | tuple) else [x]
