"""Security: verifiers of model output fuzzed with > 100,000 inputs; no code is run, no file touched, no exception.

Model output is untrusted text. Each task's `extract`, `check`, `check_trace`, `is_correct` and `reward` (and the
self-verification verdict parser) get random strings, strings in the task's own alphabet, near-misses of right
answers and code payloads (`__import__('os').system(...)`, `open(...)`, lambdas, `9**9**9`, deep parentheses,
unicode, NUL bytes), from a seeded loop (>= 100,000 inputs) and from hypothesis. While they run, `eval`, `exec`,
`os.system`, `subprocess.Popen` and `open` are trapped and `compile` may only build an AST: none of them may be
reached. Also here: `torch.load` only with weights_only=True, secrets masked in params, servers bound to
127.0.0.1 by default, and names with `../` that cannot place artifacts outside their folder.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import inspect
import os
import random
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import rlscale.experiments.cli as cli
from rlscale.rl.self_verify import corrupt, parse_verdict, split_trace, verdict_reward
from rlscale.rl.tasks import ArithmeticParams, CountdownParams, RecipeParams, make_task
from rlscale.tracking.run import experiment_id, flatten, masked, safe_uri, tracking_uri

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["rl", "tracking", "experiments", "analysis"]
LOOP_INPUTS = 102_000
TASKS = {
    "arithmetic": make_task(ArithmeticParams(digits=3, ops=["+", "*"])),
    "countdown": make_task(CountdownParams(num_numbers=4)),
    "recipe": make_task(RecipeParams(num_ingredients=3)),
}
PROBLEMS = {name: task.problems(4, "train", seed=7) for name, task in TASKS.items()}
ALPHABETS = {"arithmetic": "0123456789- ", "countdown": "0123456789+-*/() ",
             "recipe": "abcdefghijklmnopqrstuvwxyz0123456789., "}


def payloads(sentinel: Path) -> list[str]:
    s = str(sentinel)
    return [
        f"__import__('os').system('touch {s}')", f"open('{s}', 'w').write('x')", f"exec(\"open('{s}','w')\")",
        f"eval(\"__import__('os').system('touch {s}')\")", "(lambda: __import__('os'))()", "lambda x: x",
        "9**9**9", "9**9**9**9", "(9**9)**(9**9)", "10**100000", "2**-1", "1/0", "0/0", "1//0", "1%0", "-(1)",
        "(" * 60 + "1" + ")" * 60, "(" * 200 + "1", ")" * 50, "1" + "+1" * 49, "1" + "*99999" * 16, "99999" * 20,
        "1" * 100, "1" * 101, "1" * 5000, "1e308*10", "1_000", "0x10", "0b1", "1j", "True", "None", "...", "[1]*9",
        "{}", "''", '"', "\\", "\x00", "1\x002", "\x00" * 10, "\ud800", "\U0001f600", "١٢٣", "１２３", "½", "⁹",
        "𝟗", "٣+٤", "12\u200b3", "\u202e321", " \t\n\r\x0b\x0c", "", " ", "\n".join(["1"] * 100),
        "flour 200g,flour 200g", "flour 1e400g", "flour 99999999999999999999g", "egg nan", "egg inf", "egg -1",
        "a" * 300 + " 1", ",".join(["egg 1"] * 100), "flour 200g," * 30, "os.system('ls')", "().__class__",
        "[c for c in ().__class__.__base__.__subclasses__()]", "getattr(1,'real')", "import os", "yes", "no",
        "1 yes", "ok? no", "YES", "nO", "breakpoint()", "input()", "print(1)", "globals()", "__builtins__",
    ]


class Trap:
    """While active: eval/exec/os.system/os.popen/subprocess.Popen/open raise and are recorded; compile may only
    produce an AST (what ast.parse asks for)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.saved: list[tuple[object, str, object]] = []

    def _trap(self, owner: object, name: str) -> None:
        def trapped(*args, **kwargs):
            self.hits.append(f"{name}{args[:1]!r}")
            raise PermissionError(f"{name} is trapped in the verifier fuzz")

        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, trapped)

    def __enter__(self) -> Trap:
        for owner, name in [(builtins, "eval"), (builtins, "exec"), (builtins, "open"), (os, "system"),
                            (os, "popen"), (subprocess, "Popen")]:
            self._trap(owner, name)
        real_compile = builtins.compile

        def ast_only_compile(source, filename, mode, flags=0, *args, **kwargs):
            if not flags & ast.PyCF_ONLY_AST:
                self.hits.append(f"compile to code {source!r:.80}")
                raise PermissionError("compile to code is trapped in the verifier fuzz")
            return real_compile(source, filename, mode, flags, *args, **kwargs)

        self.saved.append((builtins, "compile", real_compile))
        builtins.compile = ast_only_compile
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)
        self.saved.clear()


def verify_all(name: str, text: str) -> None:
    """Every verifier entry point on one completion: no exception, the right types."""
    task = TASKS[name]
    for problem in PROBLEMS[name]:
        answer = task.extract(text)
        if answer is not None:
            assert isinstance(task.check(problem, answer), bool)
        assert isinstance(task.is_correct(problem, text), bool)
        assert isinstance(task.check_trace(problem, text), str)
        assert isinstance(task.answer_text(text), str)
        assert task.reward(problem, text) in (0.0, task.params.format_reward, 1.0)
    assert parse_verdict(text) in (True, False, None)
    assert isinstance(split_trace(text), str) and verdict_reward(text, True) in (0.0, 1.0)


def generated(rng: random.Random, sentinel: Path, n: int):
    """(task, text) pairs: task-alphabet strings, near-misses of right answers, payloads alone and spliced into
    answers, printable ASCII and arbitrary code points (surrogates and NUL included)."""
    names = list(TASKS)
    bad = payloads(sentinel)
    for i in range(n):
        name = names[i % 3]
        kind = rng.randrange(6)
        if kind == 0:
            text = "".join(rng.choice(ALPHABETS[name]) for _ in range(rng.randrange(0, 120)))
        elif kind == 1:
            text = corrupt(rng.choice(PROBLEMS[name]).solution, rng)
        elif kind == 2:
            text = rng.choice(PROBLEMS[name]).solution if rng.random() < 0.3 else rng.choice(bad)
        elif kind == 3:
            base = rng.choice(PROBLEMS[name]).solution
            cut = rng.randrange(len(base) + 1)
            text = base[:cut] + rng.choice(bad) + base[cut:]
        elif kind == 4:
            text = "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(0, 80)))
        else:
            text = "".join(chr(rng.randrange(0, 0x110000)) for _ in range(rng.randrange(0, 40)))
        yield name, text


def test_verifiers_survive_100k_generated_inputs_without_side_effects(tmp_path):
    sentinel = tmp_path / "pwned"
    rng = random.Random(20240601)
    slowest, count = 0.0, 0
    with Trap() as trap:
        for name, text in generated(rng, sentinel, LOOP_INPUTS):
            t0 = time.perf_counter()
            verify_all(name, text)
            slowest = max(slowest, time.perf_counter() - t0)
            count += 1
    assert count >= 100_000
    assert trap.hits == [] and not sentinel.exists()
    assert slowest < 1.0  # no input makes a verifier compute for long (no 9**9**9, no regex blow-up)


@settings(max_examples=1500, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(list(TASKS)), text=st.one_of(
    st.text(max_size=150),
    st.text(alphabet=ALPHABETS["countdown"] + "a.,e", max_size=110),
    st.builds(lambda a, b: a + b, st.sampled_from(payloads(Path("/nonexistent/pwned"))), st.text(max_size=20)),
))
def test_verifiers_hypothesis(name, text):
    with Trap() as trap:
        verify_all(name, text)
    assert trap.hits == []


def test_the_trap_catches_what_it_should(tmp_path):
    """The guard is real: evaluating a payload under the trap is caught and recorded."""
    with Trap() as trap:
        with contextlib.suppress(PermissionError):
            eval("1")  # noqa: S307
        with contextlib.suppress(PermissionError):
            open(tmp_path / "x", "w")  # noqa: SIM115
        ast.parse("1+1", mode="eval")  # an AST only: allowed
    assert len(trap.hits) == 2 and not (tmp_path / "x").exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_every_torch_load_uses_weights_only_and_no_code_runner_in_the_source():
    found = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for call in _calls(tree):
                f = call.func
                where = f"{path.relative_to(REPO)}:{call.lineno}"
                if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                        and f.value.id == "torch":
                    kw = {k.arg: k.value for k in call.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    assert ok, f"{where}: torch.load without weights_only=True"
                    found.append(where)
                if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                    raise AssertionError(f"{where}: {f.id}() in the source")
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (
                        (f.value.id == "pickle" and f.attr in ("load", "loads"))
                        or (f.value.id == "yaml" and f.attr == "load")):
                    raise AssertionError(f"{where}: {f.value.id}.{f.attr} on data from disk")
                if any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value for k in call.keywords):
                    raise AssertionError(f"{where}: shell=True")
    assert found, "no torch.load found: the scan looks in the wrong place"


def test_secret_looking_values_are_masked_in_params_and_config_artifact():
    config = {"tracking": {"api_token": "s3cr3t-t0k", "uri": "postgresql+psycopg2://rlscale:hunter2@127.0.0.1:5432/mlflow",
                           "plain": "http://127.0.0.1:5000"},
              "sweep": {"storage": "mysql://u:pa:ss@db/optuna"}, "DB_PASSWORD": "p", "aws_secret_access_key": "k",
              "hf_token": None, "n": 3, "lists": ["redis://:pw@cache:6379/0"]}
    flat = flatten(config)
    assert flat["tracking.api_token"] == "***" and flat["DB_PASSWORD"] == "***"
    assert flat["aws_secret_access_key"] == "***" and flat["hf_token"] == "None"  # nothing to hide
    assert flat["tracking.uri"] == "postgresql+psycopg2://rlscale:***@127.0.0.1:5432/mlflow"
    assert flat["tracking.plain"] == "http://127.0.0.1:5000" and flat["n"] == "3"
    assert "hunter2" not in str(flat) and "pa:ss" not in str(flat) and ":pw@" not in str(flat)
    safe = masked(config)
    assert "hunter2" not in str(safe) and "s3cr3t" not in str(safe) and safe["n"] == 3
    assert safe["tracking"]["uri"].endswith(":***@127.0.0.1:5432/mlflow")


SECRET_QUERY_NAMES = ["password", "PassWord", "passwd", "pwd", "pass", "sslpassword", "token", "access_token",
                      "refresh_token", "X-Amz-Security-Token", "secret", "client_secret", "key", "api_key", "apiKey",
                      "AccountKey", "sig", "X-Amz-Signature", "X-Amz-Credential", "pass%77ord", "api%5Fkey"]


@pytest.mark.parametrize("name", SECRET_QUERY_NAMES)
def test_password_like_query_parameters_are_masked(name):
    url = f"postgresql://alice@db:5432/mlflow?sslmode=require&{name}=s3cret&connect_timeout=5"
    assert safe_uri(url) == f"postgresql://alice@db:5432/mlflow?sslmode=require&{name}=***&connect_timeout=5"
    first = f"https://host/api?{name}=s3cret%2Fx"
    assert safe_uri(f"cannot open {first} (refused)") == f"cannot open https://host/api?{name}=*** (refused)"
    both = safe_uri(f"mysql://u:pw@db/x?{name}=s3cret&{name}=again")
    assert "s3cret" not in both and "again" not in both and ":pw@" not in both


def test_plain_query_parameters_and_config_keys_stay_readable():
    url = "postgresql://alice@db/mlflow?sslmode=require&connect_timeout=5&application_name=rl&keepalives=1&password="
    assert safe_uri(url) == url  # nothing secret (an empty password hides nothing)
    config = {"grpo": {"max_new_tokens": 64, "verify_max_new_tokens": 12}, "model": {"tokenizer": "gpt2"},
              "tracking": {"api_token": "t0k", "sslKey": "/k.pem"}}
    assert flatten(config) == {"grpo.max_new_tokens": "64", "grpo.verify_max_new_tokens": "12",
                               "model.tokenizer": "gpt2", "tracking.api_token": "***", "tracking.sslKey": "***"}
    assert masked(config)["grpo"] == {"max_new_tokens": 64, "verify_max_new_tokens": 12}


def test_a_password_in_a_query_string_reaches_no_param_config_or_tag(tmp_path, monkeypatch):
    import optuna

    from rlscale.experiments.config import load_config
    from rlscale.experiments.sweep import parent_run

    url = "postgresql://alice@db/mlflow?password=s3cret"
    cfg = load_config(None, [f"tracking.uri={url}", f"tracking.root={tmp_path / 'mlruns'}", "sweep.trials=1"])
    assert flatten(cfg.model_dump(mode="json"))["tracking.uri"] == "postgresql://alice@db/mlflow?password=***"
    assert masked(cfg.model_dump(mode="json"))["tracking"]["uri"] == "postgresql://alice@db/mlflow?password=***"
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    monkeypatch.setattr("rlscale.experiments.sweep.time.sleep", lambda s: None)
    run_id = parent_run(client, cfg, optuna.create_study(), "postgresql://bob@db/optuna?sslmode=require&token=s3cret")
    assert client.get_run(run_id).data.tags["optuna.storage"] == "postgresql://bob@db/optuna?sslmode=require&token=***"


def test_ui_binds_to_localhost_by_default(tmp_path, monkeypatch):
    assert inspect.signature(cli.ui).parameters["host"].default == "127.0.0.1"
    launched = []

    class FakeServer:
        def __init__(self, cmd, *args, **kwargs):
            launched.append(cmd)

        def wait(self, timeout=None):
            return 0

        def terminate(self):
            pass

    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)  # leave pytest's own handlers alone
    result = CliRunner().invoke(cli.app, ["ui", "--uri", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 0, result.output
    (cmd,) = launched
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in cmd


def test_experiment_names_cannot_place_artifacts_outside_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "mlruns"
    client = MlflowClient(tracking_uri(None, root))
    for name in ["../../evil", "..", "a/../../b", "/abs/path", "..\\..\\win", "~/home", "%2e%2e%2f",
                 "evil/../../../../etc", "ok name", "ünïcødé/../x", ".hidden/..", "\u202e../x"]:
        exp = client.get_experiment(experiment_id(client, name, root))
        location = Path(urlparse(exp.artifact_location).path).resolve()
        assert location.parent == (root / "artifacts").resolve(), (name, location)


def test_artifact_names_with_dotdot_are_refused_and_write_nothing_outside(tmp_path, monkeypatch):
    from rlscale.tracking.run import TrackedRun

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "store" / "mlruns"
    client = MlflowClient(tracking_uri(None, root))
    before = set(tmp_path.rglob("*"))
    with TrackedRun(client, "../../evil", "r", {}, {}, "cpu_core", prices={"cpu_core": 1.0}, root=root,
                    store_wait_seconds=1) as run:
        for bad in ("../../escape.json", "/tmp/escape.json", "a/../../../escape.json"):
            with pytest.raises(Exception, match="Invalid artifact path"):
                run.log_dict({"x": 1}, bad)
        (tmp_path / "store" / "d").mkdir()
        (tmp_path / "store" / "d" / "f.txt").write_text("x")
        with pytest.raises(Exception, match="Invalid artifact path"):
            run.log_artifacts(tmp_path / "store" / "d", "../../../escape")
        run.log_dict({"x": 1}, "fine.json")
    new = set(tmp_path.rglob("*")) - before
    outside = [p for p in new if not p.resolve().is_relative_to((tmp_path / "store").resolve())]
    assert outside == [] and not list(tmp_path.rglob("escape*"))
    assert [f.path for f in client.list_artifacts(run.run_id)] == ["fine.json"]


def test_report_of_an_experiment_named_dotdot_writes_only_into_out_and_the_store(tmp_path, monkeypatch):
    from rlscale.analysis.report import build_report
    from rlscale.tracking.run import TrackedRun

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "mlruns"
    uri = tracking_uri(None, root)
    name = "../../../evil/../x"
    with TrackedRun(MlflowClient(uri), name, "r", {"phase": "rl"}, {}, "cpu_core", prices={"cpu_core": 1.0},
                    root=root) as run:
        run.on_log(1, {"compute/flops": 1e12, "compute/device_seconds": 3.0, "eval/accuracy": 0.5})
    before = set(tmp_path.rglob("*"))
    result = build_report(uri, [name], None, None, tmp_path / "report", root=root)
    new = set(tmp_path.rglob("*")) - before
    allowed = [(tmp_path / "report").resolve(), root.resolve()]
    assert new and all(any(p.resolve().is_relative_to(a) for a in allowed) for p in new), sorted(new)
    location = MlflowClient(uri).get_run(result.report_run_id).info.artifact_uri
    assert Path(urlparse(location).path).resolve().is_relative_to((root / "artifacts").resolve())
