"""A throwaway PostgreSQL cluster and MLflow servers for the scale-out tests.

The cluster lives in a temp dir, listens on 127.0.0.1 on a free port (its unix socket also in the temp dir),
authenticates with a random password (scram-sha-256), and runs without fsync: it holds test data only. Started
as root, the server processes run as the `postgres` user (PostgreSQL refuses to run as root). `stop()` stops the
cluster and removes the dir; MLflow servers started with `mlflow_server()` are killed with their process group.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SUPERUSER = "rlscale"


def find_bin_dir() -> Path | None:
    """The newest `/usr/lib/postgresql/<version>/bin` holding initdb and pg_ctl (Debian layout), else PATH's."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").is_file()]
    if found:
        return max(found, key=lambda d: float(d.parent.name) if d.parent.name.replace(".", "").isdigit() else 0.0)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL cluster in a temp dir: `start()`, `create_database(name)`, `url(name)`, `stop()`."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="rlscale-pg-"))
        self.data, self.socket_dir, self.log = self.dir / "data", self.dir / "sock", self.dir / "postgres.log"
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.started = False
        self.user = None  # OS user the server runs as (None: the current one)
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError as e:
                raise RuntimeError("running as root and there is no 'postgres' user to run PostgreSQL as") from e

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user.pw_name, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=self.dir)

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout}{proc.stderr}{log}")

    def start(self) -> Cluster:
        self.socket_dir.mkdir()
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(self.dir, 0o700)
        os.chmod(pwfile, 0o600)
        if self.user is not None:
            for path in (self.dir, self.socket_dir, pwfile):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._check(self._run(self.bin_dir / "initdb", "-D", self.data, "-U", SUPERUSER, "--pwfile", pwfile,
                              "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                              "--locale=C", "--no-sync"), "initdb")
        pwfile.unlink()
        for _ in range(3):  # the free port can be taken between the probe and the bind: try another
            self.port = free_port()
            options = (f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off -c max_connections=100")
            proc = self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t",
                             "60", "start")
            if proc.returncode == 0:
                self.started = True
                return self
        self._check(proc, "pg_ctl start")
        return self

    def url(self, database: str) -> str:
        """SQLAlchemy / MLflow / Optuna URL of `database` (a bare `postgresql://` is psycopg 3, a dependency)."""
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        conn = psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password,
                               dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (immediately: nothing here is worth a clean shutdown) and remove the dir."""
        try:
            if self.started:
                proc = self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
                if proc.returncode != 0:
                    self._kill_postmaster()
        finally:
            self.started = False
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
            time.sleep(1)


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait for an MLflow server's /health (any HTTP answer counts: an auth server may refuse it)."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, *args: str, env: dict[str, str] | None = None,
                  log: Path | None = None) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 on a free port, one worker; yields its URL; killed (whole group) at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts), *args]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    # no job runner (MLflow's GenAI background jobs, a process tree of its own): unused here, slow to stop
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(url, proc)
        except (OSError, RuntimeError) as e:
            tail = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
            raise RuntimeError(f"mlflow server did not start: {e}\n{tail}") from e
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if log:
            out.close()
