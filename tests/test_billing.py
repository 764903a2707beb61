"""What a run is billed for on real hardware: every rank's compute, the right device's price, shares of a shared
GPU, each rank's GPU energy, the unit a CPU is rented in, and the whole time the machine is held."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rlscale.analysis.cost import cost_table, project_cost
from rlscale.experiments import runner, sweep
from rlscale.experiments.cli import app
from rlscale.experiments.config import TrackingConfig, load_config
from rlscale.experiments.runner import run_experiment
from rlscale.rl import accounting, distributed
from rlscale.rl.accounting import FlopModel, Meter, cpu_devices
from rlscale.rl.checkpoint import load_checkpoint, save_checkpoint
from rlscale.rl.energy import GpuEnergy, gpu_uuid
from rlscale.rl.model import ModelConfig, load_model
from rlscale.rl.self_verify import split_trace
from rlscale.tracking.cost import DEFAULT_PRICES, PriceError, device_key, load_price_table
from rlscale.tracking.run import tracking_uri

FM = FlopModel(n_params=1000, n_head=100, n_layers=2, d_attn=8)


def _meter(flops: float, seconds: float, samples: int) -> Meter:
    m = Meter(FM)
    m.add("policy", flops)
    m.seconds["policy"] += seconds
    m.count(samples_solve=samples)
    m.wall_before, m.started = seconds, time.perf_counter()  # held exactly as long as the phases
    return m


# 1. a checkpoint of 2 ranks resumed in 1 process keeps both ranks' compute
def test_resume_with_fewer_ranks_keeps_every_ranks_compute(tmp_path, monkeypatch):
    model, _ = load_model(ModelConfig(size="nano"), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(0)
    rank0, rank1 = _meter(100.0, 10.0, 3), _meter(200.0, 10.0, 5)
    monkeypatch.setattr(distributed, "gather", lambda obj: [obj, {"generator": gen.get_state(),
                                                                  "meter": rank1.state_dict()}])
    save_checkpoint(tmp_path, "rl", 4, model, opt, sched, gen, rank0)  # as rank 0 of a 2-rank run writes it
    monkeypatch.undo()
    resumed = Meter(FM)
    load_checkpoint(tmp_path, "rl", model, opt, sched, gen, resumed)  # one process (world 1)
    m = resumed.metrics()
    assert m["compute/flops"] == 300.0 and m["data/samples/solve"] == 8.0
    assert m["compute/device_seconds/policy"] == pytest.approx(20.0)
    assert 20.0 <= m["compute/device_seconds"] < 21.0


# 2. GPUs priced by exact (normalised) name; an unknown one is an error that says what to do
@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("NVIDIA A10G", "a10g"), ("NVIDIA A10", "a10"),
    ("NVIDIA GeForce RTX 4090", "rtx_4090"), ("Tesla V100-SXM2-16GB", "v100_16gb"), ("Tesla T4", "t4"),
    ("NVIDIA H100 80GB HBM3", "h100_sxm"), ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H100 NVL", "h100_nvl"),
    ("nvidia  h100-pcie", "h100_pcie"), ("NVIDIA A100-SXM4-80GB", "a100_80gb"), ("NVIDIA H200", "h200"),
])
def test_gpu_names_are_priced_exactly(name, key):
    assert device_key("cuda", name, load_price_table()) == key


def test_shipped_prices_are_sourced_and_dated_and_unknown_devices_refused():
    table = load_price_table()
    for e in table.values():
        assert e.usd_per_hour > 0 and e.source and re.fullmatch(r"\d{4}-\d{2}-\d{2}", e.date), e.key
    prices = {e.key: e.usd_per_hour for e in table.values()}
    assert prices["l40s"] != prices["l4"] and len({prices["h100_sxm"], prices["h100_pcie"], prices["h100_nvl"]}) == 3
    for unknown in ("NVIDIA B300", "NVIDIA H100", "AMD Instinct MI300X", "NVIDIA L40S-ish"):
        with pytest.raises(PriceError, match="tracking.price_key"):
            device_key("cuda", unknown, table)
    assert device_key("cuda", "NVIDIA B300", table, price_key="h100_sxm") == "h100_sxm"
    assert device_key("cpu", "x86_64", table) == "vcpu"
    with pytest.raises(PriceError, match="'b300' is not in the price table"):
        device_key("cuda", "NVIDIA B300", table, price_key="b300")


def test_price_table_names_one_device_once(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[devices.a]\nusd_per_hour = 1\nnames = ["NVIDIA L4"]\n'
                   '[devices.b]\nusd_per_hour = 2\nnames = ["nvidia l4"]\n')
    with pytest.raises(PriceError, match="named by both devices.a and devices.b"):
        load_price_table(bad)


def test_unknown_gpu_stops_before_a_run_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(runner, "pick_device", lambda _name: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "NVIDIA B300")
    (tmp_path / "c.toml").write_text('name = "b300"\n[model]\nsize = "nano"\n')
    res = CliRunner().invoke(app, ["train", str(tmp_path / "c.toml"), "--set", f"output_dir={tmp_path / 'out'}",
                                   "--set", f"tracking.root={tmp_path / 'mlruns'}"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "no price for device 'NVIDIA B300'" in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "out").exists()


def test_prices_command():
    res = CliRunner().invoke(app, ["prices"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "l40s" in res.output and "NVIDIA L40S" in res.output and "vCPU" in res.output
    res = CliRunner().invoke(app, ["prices", "--device", "NVIDIA L40S"])
    assert res.exit_code == 0 and res.output.startswith("l40s  $1.9512 per GPU-hour")
    res = CliRunner().invoke(app, ["prices", "--device", "NVIDIA B300"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "tracking.price_key" in res.output


# 3. sweep workers spread over the GPUs; k workers on one GPU are billed 1/k each (energy too)
def test_sweep_workers_spread_over_gpus_and_share_the_bill(monkeypatch):
    assert sweep.gpu_slots(4, 1) == [(0, 0.25)] * 4
    assert sweep.gpu_slots(2, 2) == [(0, 1.0), (1, 1.0)]
    assert sweep.gpu_slots(3, 2) == [(0, 0.5), (1, 1.0), (0, 0.5)]
    assert sweep.gpu_slots(2, 0) == [(None, 0.5)] * 2  # no GPU: the workers share the CPUs
    assert sweep.gpu_slots(0, 0) == [] and sweep.worker_slots("cuda:1", 0) == []  # a resumed, full study
    for workers, gpus in ((4, 1), (3, 2), (5, 3), (8, 8)):
        billed = sum(s for _, s in sweep.gpu_slots(workers, gpus))  # the rent of the GPUs in use, never K times
        assert billed == pytest.approx(min(workers, gpus))
    assert sweep.worker_slots("cuda:1", 4) == [(None, 0.25)] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sweep.worker_slots("auto", 3) == [(0, 0.5), (1, 1.0), (0, 0.5)]
    assert sweep.worker_slots("cpu", 2) == [(None, 0.5)] * 2


def test_a_worker_whose_siblings_finished_holds_the_whole_device(tmp_path, monkeypatch):
    """Each trial is billed 1/k of its device for the k workers left on it when it starts: after its sibling's
    last trial, the survivor is billed all of the GPU (or CPUs)."""
    seen = []
    live = multiprocessing.get_context("spawn").Array("i", [2])  # two workers on one device

    def fake_run(cfg, progress, **kw):
        seen.append((kw["device_share"], float(os.environ["RLSCALE_CPU_SHARE"])))
        live[0] = 1  # the sibling finishes its last trial meanwhile
        return types.SimpleNamespace(metrics={"eval/accuracy": 0.5})

    monkeypatch.setattr(sweep, "run_experiment", fake_run)
    monkeypatch.setenv("RLSCALE_CPU_SHARE", "1")  # restored after the test
    (tmp_path / "s.toml").write_text('name = "s"\n[sweep.space."grpo.learning_rate"]\nlow = 1e-4\nhigh = 1e-3\n')
    spec = sweep.SweepSpec(str(tmp_path / "s.toml"), [], str(tmp_path / "j.log"), "s", 2)
    sweep._worker(spec, "parent", 2, 0, torch.get_num_threads(), None, live, 0)
    assert seen == [(0.5, 0.5), (1.0, 1.0)] and live[0] == 0  # this worker has left the device too


def test_sweep_trial_runs_on_its_gpu_billed_for_its_share(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cfg, progress, **kw):
        seen.update(device=cfg.model.device, share=kw["device_share"])
        return types.SimpleNamespace(metrics={"eval/accuracy": 0.5})

    monkeypatch.setattr(sweep, "run_experiment", fake_run)
    (tmp_path / "s.toml").write_text('name = "s"\n[sweep.space."grpo.learning_rate"]\nlow = 1e-4\nhigh = 1e-3\n')
    spec = sweep.SweepSpec(str(tmp_path / "s.toml"), [], "sqlite://", "s", 1)
    study = optuna.create_study(direction="maximize")
    study.optimize(sweep.objective(spec, "parent", gpu=1, share=0.5), n_trials=1)
    assert seen == {"device": "cuda:1", "share": 0.5} and study.best_value == 0.5


def test_shared_gpu_meter_bills_its_share_of_time_and_energy(monkeypatch):
    counters = {"GPU-a": 0.0}
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(counters))
    meter = Meter(FM, devices=0.25, energy=GpuEnergy(["GPU-a"]))
    with meter.phase("policy"):
        time.sleep(0.2)
    counters["GPU-a"] += 3.6e9  # 1 kWh on the device, shared by 4 runs
    m = meter.metrics()
    assert m["compute/device_seconds/policy"] == pytest.approx(0.05, rel=0.3)
    assert m["energy/gpu_kwh"] == pytest.approx(0.25)


# 4. energy from each rank's own GPU, found by UUID (not NVML's index, which CUDA_VISIBLE_DEVICES does not renumber)
def _fake_nvml(counters: dict[str, float]) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda u: u if u in counters else (_ for _ in ()).throw(KeyError(u)),
        nvmlDeviceGetHandleByIndex=lambda i: sorted(counters)[i],
        nvmlDeviceGetTotalEnergyConsumption=lambda h: counters[h],
    )


def test_energy_read_by_uuid(monkeypatch):
    # the machine's GPUs in NVML order; CUDA_VISIBLE_DEVICES=2 makes the third one cuda:0
    counters = {"GPU-0000": 0.0, "GPU-1111": 0.0, "GPU-2222": 0.0}
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(counters))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="2222"))
    energy = GpuEnergy([gpu_uuid(torch.device("cuda", 0))])
    counters["GPU-0000"] += 7.2e9  # another job's GPU
    counters["GPU-2222"] += 1.8e9
    assert energy.available and energy.kwh() == pytest.approx(0.5)
    assert not GpuEnergy(["GPU-9999"]).available and GpuEnergy(["GPU-9999"]).kwh() is None
    assert GpuEnergy([]).kwh() is None


RANKS_SCRIPT = """
import atexit, os, sys, types, json, torch
# each exit line is one write (atomic on a pipe), after setup's own exit handler
atexit.register(lambda: os.write(1, f"group left: {not torch.distributed.is_initialized()}\\n".encode()))
counters = {}
sys.modules["pynvml"] = types.SimpleNamespace(
    nvmlInit=lambda: None, nvmlDeviceGetHandleByUUID=lambda u: u,
    nvmlDeviceGetTotalEnergyConsumption=lambda h: counters.setdefault(h, 0.0))
from rlscale.rl import distributed
from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.energy import GpuEnergy
distributed.setup(torch.device("cpu"))
rank = distributed.rank()
meter = Meter(FlopModel(1000, 100, 2, 8), energy=GpuEnergy([f"GPU-rank{rank}"]))
counters[f"GPU-rank{rank}"] += (rank + 1) * 3.6e9  # rank 0's GPU used 1 kWh, rank 1's 2 kWh
m = meter.metrics()
if rank == 0:
    print(json.dumps(m))
"""


def test_energy_of_every_rank_summed_under_torchrun(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANKS_SCRIPT))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                         capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    m = json.loads(next(line for line in lines if line.startswith("{")))
    assert m["energy/gpu_kwh"] == pytest.approx(3.0)
    # each rank destroys its process group before interpreter shutdown (left to it, gloo aborted a rank now and then)
    assert lines.count("group left: True") == 2, out.stdout


def test_cpu_run_records_no_energy():
    assert "energy/gpu_kwh" not in Meter(FM).metrics()


# 5. a CPU is billed per vCPU it holds: torch threads run one per core, the core's SMT siblings are rented too
def test_cpu_devices_count_vcpus(tmp_path, monkeypatch):
    def counts(logical=True):
        return 16 if logical else 8

    monkeypatch.delenv("RLSCALE_CPU_SHARE", raising=False)
    monkeypatch.setattr(accounting.psutil, "cpu_count", counts)
    monkeypatch.setattr(accounting.os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    no_limit = str(tmp_path)  # a cgroup mount without CPU limits
    assert cpu_devices(8, cgroup=no_limit) == 16 and cpu_devices(2, cgroup=no_limit) == 4
    assert cpu_devices(12, cgroup=no_limit) == 16
    monkeypatch.setattr(accounting.os, "sched_getaffinity", lambda _pid: {0, 1, 2}, raising=False)
    assert cpu_devices(8, cgroup=no_limit) == 3  # a container limited to 3 CPUs holds 3
    monkeypatch.setattr(accounting.psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(accounting.os, "sched_getaffinity", lambda _pid: set(range(4)), raising=False)
    assert cpu_devices(4, cgroup=no_limit) == 4  # no SMT: one vCPU per thread


def test_cpu_devices_honour_container_cpu_limits_and_sweep_shares(tmp_path, monkeypatch):
    """A pod limited to 4 CPUs on a 96-vCPU node is billed 4 (cgroup v2 cpu.max, v1 cfs quota), and one of k sweep
    workers its 1/k of the usable CPUs, never k x its threads."""
    monkeypatch.delenv("RLSCALE_CPU_SHARE", raising=False)
    monkeypatch.setattr(accounting.psutil, "cpu_count", lambda logical=True: 96 if logical else 48)
    monkeypatch.setattr(accounting.os, "sched_getaffinity", lambda _pid: set(range(96)), raising=False)
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    assert cpu_devices(48, cgroup=str(v2)) == 96  # the node's vCPUs, no limit
    (v2 / "cpu.max").write_text("400000 100000\n")
    assert cpu_devices(48, cgroup=str(v2)) == 4 and cpu_devices(1, cgroup=str(v2)) == 2
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_devices(48, cgroup=str(v2)) == 96
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_devices(48, cgroup=str(v1)) == 2.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_devices(48, cgroup=str(v1)) == 96
    (v2 / "cpu.max").write_text("200000 100000\n")
    assert cpu_devices(1, share=1 / 3, cgroup=str(v2)) == pytest.approx(2 / 3)  # 3 workers on 2 CPUs
    monkeypatch.setenv("RLSCALE_CPU_SHARE", "0.25")  # set by a sweep worker for the pipeline's meter
    assert cpu_devices(cgroup=str(v2)) == 0.5


def test_cpu_sweep_bills_no_more_vcpus_than_exist(tmp_path, monkeypatch):
    """Three sweep workers on this machine's CPUs are billed its usable vCPUs between them, not one vCPU each."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RLSCALE_CPU_SHARE", raising=False)
    (tmp_path / "s.toml").write_text(f"""
name = "cpu-sweep"
output_dir = "{tmp_path.as_posix()}/out"
[model]
size = "nano"
device = "cpu"
[task]
digits = 1
eval_percent = 30
[sft]
steps = 2
reuse = false
[grpo]
steps = 2
prompts_per_step = 2
num_generations = 2
max_new_tokens = 3
self_verify = false
[eval]
problems = 4
samples = 1
max_new_tokens = 3
[tracking]
root = "{tmp_path.as_posix()}/mlruns"
[sweep]
trials = 3
pruner = "none"
[sweep.space."grpo.learning_rate"]
low = 1e-4
high = 1e-3
""")
    started = time.time()
    sweep.run_sweep(str(tmp_path / "s.toml"), [], workers=3)
    wall = time.time() - started
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    runs = [r for r in client.search_runs([client.get_experiment_by_name("cpu-sweep").experiment_id])
            if r.data.tags.get("phase") == "sweep-trial"]
    usable = cpu_devices(share=1.0)
    runs.sort(key=lambda r: r.info.start_time)
    billed = [(r.info.start_time, r.info.end_time, float(r.data.tags["device.count"])) for r in runs]
    assert len(runs) == 3 and billed[0][2] == pytest.approx(usable / 3, rel=1e-3)  # 1/3 each while all 3 run
    for start, _, _ in billed:  # 1/k of the k workers left as a trial starts: never more than the CPUs in all
        assert sum(n for s, e, n in billed if s <= start < e) <= usable * (1 + 1e-3), billed
    assert sum(r.data.metrics["compute/device_seconds"] for r in runs) <= usable * wall


# 6. every tracking.* key the price table's comments mention is a real config field
def test_price_table_documents_only_real_config_keys():
    text = DEFAULT_PRICES.read_text()
    keys = set(re.findall(r"tracking\.([a-z_]+)", text))
    assert keys and keys <= set(TrackingConfig.model_fields), keys - set(TrackingConfig.model_fields)
    assert "usd_per_device_hour" not in text


# 7. the whole wall time is billed: the phases are its breakdown, the rest is the phase `other`
def test_whole_wall_time_is_billed(tmp_path, recorder, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t0 = time.time()
    cfg = load_config(None, [
        "name=billed", "model.size=nano", "task.digits=1", "task.eval_percent=30", "sft.steps=3", "sft.reuse=false",
        "grpo.steps=2",
        "grpo.prompts_per_step=4", "grpo.num_generations=2", "grpo.max_new_tokens=3", "grpo.self_verify=false",
        "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=3", "tracking.log_model=true",
        f"output_dir={tmp_path / 'out'}", f"tracking.root={tmp_path / 'mlruns'}",
    ])
    result = run_experiment(cfg, recorder)
    wall = time.time() - t0
    run = MlflowClient(tracking_uri(None, tmp_path / "mlruns")).get_run(result.run_id)
    m, devices = run.data.metrics, float(run.data.tags["device.count"])
    phases = [k for k in m if k.startswith("compute/device_seconds/")]
    assert "compute/device_seconds/other" in phases and m["compute/device_seconds/other"] > 0
    assert m["compute/device_seconds"] == pytest.approx(sum(m[k] for k in phases), rel=1e-9)
    held = (run.info.end_time - run.info.start_time) / 1000  # from the run's creation to its end, at least
    assert held * devices <= m["compute/device_seconds"] <= wall * devices
    assert run.data.tags["device.unit"] == "vCPU" and run.data.tags["device.price_key"] == "vcpu"
    assert devices == cpu_devices()
    # the same store repriced with another table (one vCPU-hour = $3600: dollars = device-seconds)
    table = tmp_path / "other.toml"
    table.write_text('[devices.vcpu]\nusd_per_hour = 3600\nunit = "vCPU"\n')
    uri = ["--uri", tracking_uri(None, tmp_path / "mlruns")]
    res = CliRunner().invoke(app, ["cost", "--prices", str(table), "--json", *uri])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["total_usd"] == pytest.approx(m["compute/device_seconds"])
    table.write_text('[devices.h100_sxm]\nusd_per_hour = 3\n')
    res = CliRunner().invoke(app, ["cost", "--prices", str(table), *uri])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "no price for 'vcpu'" in res.output


# 8. device-hours reported by device type, never CPU-hours added to GPU-hours
def test_cost_reports_device_hours_by_type():
    runs = pd.DataFrame([
        {"run_id": "a", "fate": "finished", "tags.phase": "rl", "tags.device.type": "cuda", "cost/usd": 3.0,
         "compute/gpu_hours": 1.0},
        {"run_id": "b", "fate": "failed", "tags.phase": "rl", "tags.device.type": "cpu", "tags.device.unit": "vCPU",
         "cost/usd": 0.1, "compute/gpu_hours": 2.0},
        {"run_id": "c", "fate": "finished", "tags.phase": "final", "tags.device.type": "cuda",
         "tags.device.unit": "GPU", "cost/usd": 6.0, "compute/gpu_hours": 2.0},
    ])
    ledger = pd.DataFrame([{"name": "x", "category": "other", "method": "gpu_hours", "usd": 5.0, "gpu_hours": 4.0,
                            "device": None, "note": None}])
    result = project_cost(runs, ledger)
    assert result["device_hours"] == {"GPU": 7.0, "vCPU": 2.0}
    assert result["gpu_hours_total"] == 7.0 and result["gpu_hours_final"] == 2.0
    assert result["device_hours_by_category"]["prior_runs"] == {"GPU": 1.0, "vCPU": 2.0}
    table = cost_table(result)
    assert list(table.columns) == ["category", "usd", "share_pct", "GPU_hours", "vCPU_hours"]
    assert table.iloc[-1]["GPU_hours"] == 7.0 and table.iloc[-1]["vCPU_hours"] == 2.0
    assert math.isclose(result["total_usd"], 14.1)


# 9. a check that is only a verdict has an empty trace, not the verdict itself as its context
def test_split_trace_of_a_bare_verdict():
    assert split_trace("yes") == "" and split_trace("  No. ") == ""
    assert split_trace("Verdict: yes") == "Verdict:" and split_trace("7+5=12 no") == "7+5=12"
    assert split_trace("no verdict here") == "no verdict here"


def test_a_cpu_run_records_the_cpu_model_not_the_architecture(tmp_path):
    """A price table can tell CPU types apart only if the run says which CPU it ran on."""
    import platform

    from rlscale.experiments.runner import device_name

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.split(":", 1)[0].strip() == "model name"]
    name = device_name(torch.device("cpu"))
    assert name != platform.machine() and (not models or name == " ".join(models[0].split()))
