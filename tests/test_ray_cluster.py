"""Sweeps on a real two-node Ray cluster: a head and a second node started with ``ray start``.

Both nodes run on this machine as separate raylets, each with one CPU, joined at 127.0.0.1
(Ray advertises the host's own address for them). They run with token authentication, a
HOME of their own and none of the driver's GRADLAB_* variables, as a cluster a user joins
would: what a cell uses must come from the driver. Every process of a node carries a marker
in its environment (``GRADLAB_TEST_RAY``), so a test kills exactly one node (its raylet and
workers, SIGKILL: the node dies) and the fixture stops exactly what it started, even when a
test fails. The sweeps run the real ``gradlab sweep`` command in a subprocess.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from gradlab import runs, sweep
from gradlab.recorder import RecordConfig
from gradlab.sweep import SWEEP, SweepGrid, cell_dir, run_sweep
from gradlab.train import TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray") if os.environ.get("CI") != "true" else __import__("ray")

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
MARK = "GRADLAB_TEST_RAY"
CIFAR = os.environ.get("GRADLAB_DATA") or str(ROOT / ".data")
# Test-only: the head notices a dead node within about 2 s instead of Ray's default 30 s or so.
HEAD_SETTINGS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                 "RAY_health_check_timeout_ms": "500"}
TIMING = ["train_seconds", "images_per_s"]
# Two cells at a time, one per node (each has one CPU). Synthetic: 256 images, 4 steps of 64 per epoch.
FAULT_ARGS = ["--blocks", "conv,res", "--depths", "1", "--seeds", "0", "--width", "4", "--epochs", "2",
              "--batch-size", "64", "--subset", "256", "--val-fraction", "0.02", "--dataset", "synthetic",
              "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:  # an ephemeral port: outside Ray's worker port range (10002-19999)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(value: str) -> list[int]:
    """Every process whose environment holds MARK=value."""
    wanted, pids = f"{MARK}={value}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class Cluster:
    """A Ray head and a second node on this machine; ``kill(node)`` SIGKILLs one of them."""

    def __init__(self, root: Path) -> None:
        self.root, self.token, self.tag = root, secrets.token_hex(32), secrets.token_hex(4)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.home = {name: root / f"home-{name}" for name in ("head", "node2", "driver")}
        for home in self.home.values():
            home.mkdir(parents=True, exist_ok=True)
        self.node_ids: dict[str, str] = {}

    def _env(self, name: str, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GRADLAB_", "XDG_"))}
        env.update(PYTHONPATH=str(ROOT), HOME=str(self.home[name]), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self.token, **(extra or {}))
        return env

    def start(self, name: str, pause: str | None = None) -> None:
        """Start the head or node2; ``pause``: every cell on it pauses at this fault point."""
        marker = {MARK: f"{self.tag}-{name}"}
        if pause:
            marker[runs.FAULT_PAUSE] = pause
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", "80000000",
                  "--temp-dir", str(self.root / "ray"), "--disable-usage-stats"]
        if name == "head":
            args = ["--head", "--port", str(self.port), "--ray-client-server-port", str(_free_port()),
                    "--include-dashboard", "false", *common]
            marker.update(HEAD_SETTINGS)
        else:
            args = ["--address", self.address, *common]
        with open(self.root / f"{name}.log", "a") as log:
            done = subprocess.run([str(RAY), "start", *args], env=self._env(name, marker), stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=120)
        assert done.returncode == 0, (self.root / f"{name}.log").read_text()[-3000:]
        self.node_ids[name] = self._node_id(name)

    def _node_id(self, name: str) -> str:
        for pid in _marked(f"{self.tag}-{name}"):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if Path(argv[0]).name == "raylet":
                return next(a.split("=", 1)[1] for a in argv if a.startswith("--node_id="))
        raise AssertionError(f"no raylet found for {name}")

    def kill(self, name: str) -> None:
        """SIGKILL every process of this node (raylet, workers, ...), as when its machine dies."""
        for _ in range(20):  # a dying raylet may still be starting a worker
            pids = _marked(f"{self.tag}-{name}")
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def stop(self) -> None:
        self.kill("node2")
        self.kill("head")

    def driver_env(self, **extra) -> dict:
        """The sweep's environment: the token without RAY_AUTH_MODE (gradlab turns token mode on)."""
        env = self._env("driver", extra)
        del env["RAY_AUTH_MODE"]
        return env

    def sweep(self, out: Path, args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
        command = [sys.executable, "-m", "gradlab.cli", "sweep", *args, "--executor", "ray",
                   "--ray-address", self.address, "--out", str(out)]
        return subprocess.Popen(command, cwd=ROOT, env=env or self.driver_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = Path(str(tmp_path_factory.mktemp("cluster")))
    cluster = Cluster(root)
    try:
        cluster.start("head")
        cluster.start("node2")
        yield cluster
    finally:
        cluster.stop()
        assert not _marked(f"{cluster.tag}-head") and not _marked(f"{cluster.tag}-node2")


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the sweep did not finish:\n{out}\n{err}") from None
    return process.returncode, out, err


def _node_of(run_dir: Path) -> str | None:
    try:
        return runs.read_json(run_dir / runs.CONFIG)["hardware"]["node"].get("ray_node_id")
    except (runs.RunError, KeyError, FileNotFoundError):
        return None


def _records_hold_each_step_once(run_dir: Path) -> None:
    records = runs.load_run(run_dir).records()
    keys = [c for c in ("step", "layer", "position", "metric") if c in records.columns]
    assert not records.duplicated(subset=keys).any()
    history = runs.load_run(run_dir).history
    assert list(history["epoch"]) == list(range(len(history)))


def _wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------


def test_gradlab_data_on_the_driver_reaches_every_node_and_matches_the_local_executor(cluster, tmp_path,
                                                                                      monkeypatch):
    """The issue's case: GRADLAB_DATA set on the driver only, the real CIFAR-10 folder."""
    if not (Path(CIFAR) / "cifar-10-batches-py").is_dir():
        pytest.skip(f"no CIFAR-10 under {CIFAR}")
    out = tmp_path / "sweep"
    args = ["--blocks", "conv,res", "--depths", "1", "--seeds", "0", "--width", "4", "--epochs", "1",
            "--batch-size", "64", "--subset", "256", "--val-fraction", "0.02", "--device", "cpu"]
    start = time.monotonic()
    code, stdout, stderr = _finish(cluster.sweep(out, args, env=cluster.driver_env(GRADLAB_DATA=CIFAR)))
    seconds = time.monotonic() - start
    assert code == 0, stderr
    print(f"\nfigures: 2 real-CIFAR cells on two nodes in {seconds:.1f} s (driver start included)")
    names = ["conv-d1-s0", "res-d1-s0"]
    stored = runs.read_json(out / SWEEP)
    assert stored["base"]["data_root"] == str(Path(CIFAR).resolve())  # resolved on the driver, stored
    cache = cluster.home["driver"] / ".cache" / "gradlab"
    assert stored["environment"]["GRADLAB_CACHE_DIR"] == str(cache.resolve())
    assert list(cache.glob("moments-*.so"))  # the workers built the kernels in the driver's cache folder
    assert not (cluster.home["node2"] / ".cache").exists() and not (cluster.home["head"] / ".cache").exists()
    nodes = {name: _node_of(cell_dir(out, name)) for name in names}
    assert set(nodes.values()) == {cluster.node_ids["head"], cluster.node_ids["node2"]}  # both nodes ran cells
    for name in names:
        line = next(line for line in (stdout + stderr).splitlines() if line.startswith(f"{name} on "))
        assert f"Ray node {nodes[name][:8]})" in line and "test accuracy" in line  # progress names the node

    # The local executor, one torch thread per cell as on the cluster, lands the same files and numbers.
    local = tmp_path / "local"
    base = TrainConfig(width=4, epochs=1, batch_size=64, subset=256, val_fraction=0.02, device="cpu",
                       data_root=CIFAR)
    monkeypatch.setattr(sweep, "_cpu_count", lambda: 2)  # two workers of one thread on any machine
    run_sweep(SweepGrid(("conv", "res"), (1,)), base, local, record=RecordConfig(), jobs=2)
    assert runs.read_json(local / SWEEP)["base"] == stored["base"]
    for name in names:
        ours, theirs = runs.load_run(cell_dir(out, name)), runs.load_run(cell_dir(local, name))
        assert ours.config["hardware"]["torch_threads"] == theirs.config["hardware"]["torch_threads"] == 1
        files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        assert files(ours.path) == files(theirs.path)
        pd.testing.assert_frame_equal(ours.history.drop(columns=TIMING), theirs.history.drop(columns=TIMING))
        pd.testing.assert_frame_equal(ours.records(), theirs.records())
        assert ours.summary["test_acc"] == theirs.summary["test_acc"]

    report = subprocess.run([sys.executable, "-m", "gradlab.cli", "report", str(out), "--format", "csv"], cwd=ROOT,
                            env=cluster.driver_env(), capture_output=True, text=True, timeout=120)
    local_report = subprocess.run([sys.executable, "-m", "gradlab.cli", "report", str(local), "--format", "csv"],
                                  cwd=ROOT, env=cluster.driver_env(), capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and report.stdout.replace(str(out), "") == local_report.stdout.replace(str(local), "")


@pytest.mark.parametrize("case", ["no token", "nothing listening"])
def test_a_cluster_it_cannot_join_is_one_line_and_exit_2(cluster, tmp_path, case):
    env = cluster.driver_env(RAY_NUM_REDIS_GET_RETRIES="2")  # test-only: give up after 2 s, not 20 s
    if case == "no token":
        del env["RAY_AUTH_TOKEN"]
        command_address = cluster.address
    else:
        command_address = f"127.0.0.1:{_free_port()}"
    done = subprocess.run([sys.executable, "-m", "gradlab.cli", "sweep", *FAULT_ARGS, "--executor", "ray",
                           "--ray-address", command_address, "--out", str(tmp_path / "sweep")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: ") and "Traceback" not in done.stderr, done.stderr
    expected = "authentication token" if case == "no token" else f"cannot join the Ray cluster at {command_address}"
    assert expected in lines[0]


def test_a_node_killed_mid_cell_loses_nothing(cluster, tmp_path):
    """node2 dies while its cell trains (paused after its first checkpoint): the cell is retried
    on the head, resuming from that checkpoint; the other cells finish; nothing is duplicated."""
    cluster.kill("node2")  # if it is up
    cluster.start("node2", pause="step:6")  # the second step of epoch 1: epoch 0's checkpoint is written
    node2 = cluster.node_ids["node2"]
    out = tmp_path / "sweep"
    start = time.monotonic()
    process = cluster.sweep(out, FAULT_ARGS)
    try:
        def paused_on_node2() -> Path | None:
            for run_dir in (out / "runs").glob("*"):
                if _node_of(run_dir) == node2 and (run_dir / runs.LAST).exists():
                    return run_dir
            return None

        _wait_for(lambda: paused_on_node2() is not None or process.poll() is not None, what="a cell on node2")
        lost = paused_on_node2()
        time.sleep(0.5)  # it reaches the pause in milliseconds
        killed_at = time.monotonic()
        cluster.kill("node2")
        code, stdout, stderr = _finish(process)
    finally:
        cluster.kill("node2")  # the next test starts it again as it needs it
    ended = time.monotonic()
    assert code == 0, stderr
    assert f"{lost.name}: lost (Ray task failed:" in stderr and "retrying it once on a live node" in stderr
    retried = [line for line in (stdout + stderr).splitlines() if "(retried)" in line]
    assert len(retried) == 1 and retried[0].startswith(f"{lost.name} on ") and cluster.node_ids["head"][:8] in retried[0]
    summary = runs.read_json(lost / runs.SUMMARY)
    assert summary["status"] == "complete" and summary["resumed_from_epoch"] == 1  # resumed, not restarted
    assert _node_of(lost) == cluster.node_ids["head"]
    for run_dir in (out / "runs").glob("*"):
        assert runs.read_json(run_dir / runs.SUMMARY)["status"] == "complete"
        _records_hold_each_step_once(run_dir)
    print(f"\nfigures: node kill: 1 cell retried; {ended - killed_at:.1f} s from the kill to the sweep's end, "
          f"{ended - start:.1f} s in all")
    again = subprocess.run([sys.executable, "-m", "gradlab.cli", "sweep", *FAULT_ARGS, "--executor", "ray",
                            "--ray-address", cluster.address, "--out", str(out)], cwd=ROOT, env=cluster.driver_env(),
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "2 already finished" in again.stdout


def test_a_head_lost_mid_sweep_ends_with_one_line_and_a_rerun_resumes(cluster, tmp_path):
    cluster.kill("node2")
    cluster.start("node2", pause="step:6")
    node2 = cluster.node_ids["node2"]
    out = tmp_path / "sweep"
    process = cluster.sweep(out, FAULT_ARGS)
    _wait_for(lambda: any(_node_of(d) == node2 and (d / runs.LAST).exists() for d in (out / "runs").glob("*"))
              or process.poll() is not None, what="a cell on node2")
    time.sleep(0.5)
    killed_at = time.monotonic()
    cluster.kill("head")
    code, stdout, stderr = _finish(process)
    ended = time.monotonic()
    assert code == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("gradlab: error")]
    assert len(lines) == 1 and "went away mid-sweep" in lines[-1] and "Traceback" not in stderr, stderr
    assert "rerun the same command to resume" in lines[-1]
    print(f"\nfigures: head loss: the sweep ended {ended - killed_at:.1f} s after the head died")

    cluster.stop()  # the rest of the cluster goes down with its head; bring it all back
    cluster.start("head")
    cluster.start("node2")
    start = time.monotonic()
    code, stdout, stderr = _finish(cluster.sweep(out, FAULT_ARGS))
    assert code == 0, stderr
    resumed = 0
    for run_dir in (out / "runs").glob("*"):
        summary = runs.read_json(run_dir / runs.SUMMARY)
        assert summary["status"] == "complete"
        resumed += summary.get("resumed_from_epoch") is not None
        _records_hold_each_step_once(run_dir)
    assert resumed >= 1  # what the lost head interrupted was resumed, not redone
    print(f"figures: head loss: the rerun finished in {time.monotonic() - start:.1f} s, {resumed} cells resumed")


def test_a_node_that_cannot_see_a_path_fails_the_cell_with_one_line_naming_both(tmp_path, monkeypatch):
    """What a Ray worker does on a node without the shared storage (no cluster needed to see it)."""
    node = {"host": "node7", "ip": "10.0.0.7", "ray_node_id": "abcdef0123456789"}
    monkeypatch.setattr(sweep, "_ray_node", lambda: node)
    cell = sweep.expand(SweepGrid(("conv",), (1,)), TrainConfig(dataset="synthetic", device="cpu"))[0]
    missing = tmp_path / "data"
    result = sweep._ray_cell(cell, str(tmp_path / "runs" / cell.name), RecordConfig(), 1, {}, [str(missing)])
    assert result["status"] == "failed" and result["node"] == node
    assert result["error"] == (f"{missing} is not visible on Ray node node7 (10.0.0.7, Ray node abcdef01): the sweep "
                               "folder and the data root must be on storage every node sees")
