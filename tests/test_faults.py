"""Fault injection: kills, corrupt files, malicious files, one writer per run, resource limits, divergence.

The kill tests run the real ``gradlab train`` and ``gradlab sweep`` commands (gradlab.cli.main
with their arguments) in child processes forked from one server process that has imported
gradlab and generated the synthetic dataset once: a fresh interpreter per launch would spend
about 5 s on imports and data each time. A child pauses at a named moment through the
GRADLAB_FAULT_PAUSE hook (``gradlab.runs.fault_point``: inside a step, a checkpoint write, a
records flush, an evaluation) and the test SIGKILLs it there; "time" kills land at a random
time instead. Every random choice comes from a seeded ``random.Random``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from gradlab import resources, runs, schema
from gradlab.cli import main
from gradlab.lock import LOCK, RunLock
from gradlab.recorder import RecordConfig
from gradlab.sweep import cell_dir, cell_status
from gradlab.train import TrainConfig, disk_estimate, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMING = ["train_seconds", "images_per_s"]

# ---------------------------------------------------------------------------------------
# The fork server

SERVER = r"""
import functools, json, os, sys, traceback
import torch
torch.set_num_threads(1)
from gradlab import data
from gradlab.cli import main
import gradlab.sweep, gradlab.recorder, pandas, pyarrow.parquet  # imported once, shared by every fork
data.synthetic_cifar10 = functools.cache(data.synthetic_cifar10)  # generated once, shared by every fork
data.synthetic_cifar10()
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (seconds)
cpu = min(os.sched_getaffinity(0))
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.sched_setaffinity(0, {cpu})  # one core per launch: the same numbers in every launch
            os.environ.update(job["env"])
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(target, fd)
                os.close(target)
            os.chdir(job["cwd"])
            try:
                main.main(job["args"], prog_name="gradlab")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Launch:
    def __init__(self, pid: int, stdout: Path, stderr: Path) -> None:
        self.pid, self.stdout, self.stderr = pid, stdout, stderr
        self.exit: int | None = None

    def err(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def out(self) -> str:
        return self.stdout.read_text() if self.stdout.exists() else ""


class Server:
    """Forks ``gradlab ARGS`` children of one warm process; one child at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.count, self.current = folder, 0, None
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop(runs.FAULT_PAUSE, None)
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert "ready" in self._read(120)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, "the fork server did not answer in time"
        line = self.process.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def start(self, args: list, pause: str | None = None) -> Launch:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        env = {runs.FAULT_PAUSE: pause} if pause else {}
        job = {"args": [str(a) for a in args], "env": env, "stdout": str(out), "stderr": str(err), "cwd": str(ROOT)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        self.current = Launch(self._read(30)["pid"], out, err)
        return self.current

    def wait(self, launch: Launch, timeout: float = 120) -> int:
        if launch.exit is None:
            launch.exit = self._read(timeout)["exit"]
        return launch.exit

    def wait_for_pause(self, launch: Launch, timeout: float = 60) -> str:
        """The pause marker, once the child has printed it (it then sleeps until killed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"gradlab-fault: (\S+)\n", launch.err())  # maybe after a progress bar's \r
            if found:
                return found.group(1)
            ready, _, _ = select.select([self.process.stdout], [], [], 0.005)
            if ready:  # the child ended before its pause
                launch.exit = self._read(1)["exit"]
                raise AssertionError(f"exited {launch.exit} before pausing:\n{launch.err()[-2000:]}")
        raise AssertionError(f"no pause in time:\n{launch.err()[-2000:]}")

    def kill(self, launch: Launch) -> int:
        os.kill(launch.pid, signal.SIGKILL)
        return self.wait(launch)

    def run(self, args: list, pause: str | None = None) -> Launch:
        launch = self.start(args, pause)
        self.wait(launch)
        return launch

    def succeed(self, args: list) -> Launch:
        """``run`` a command that must exit 0 (its stderr in the failure message)."""
        launch = self.run(args)
        assert launch.exit == 0, launch.err()
        return launch

    def close(self) -> None:
        if self.current is not None and self.current.exit is None:  # a test failed while a child paused
            self.kill(self.current)
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("launches"))
    yield server
    server.close()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (lock files included) with the hash of its bytes and its mtime."""
    return {str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} != {b}"


def assert_everything_loads(run_dir: Path) -> None:
    """Every checkpoint loads and every records part reads, whatever moment the kill came at."""
    for name in (runs.LAST, runs.BEST):
        if (run_dir / name).exists():
            load_checkpoint(run_dir / name)
    if (run_dir / runs.RECORDS).is_dir():
        runs.check_records(run_dir, 2 ** 62)


def assert_same_run(run_dir: Path, reference: Path, n_steps: int) -> None:
    """Final weights, metrics, tables and records equal those of the uninterrupted reference."""
    for name in (runs.LAST, runs.BEST):
        assert_same_weights(run_dir / name, reference / name)
    ours, theirs = runs.load_run(run_dir), runs.load_run(reference)
    assert ours.summary["status"] == "complete"
    for key in ("test_acc", "test_acc_best", "test_acc_last", "best_val_acc", "best_epoch", "epochs_done",
                "steps_done", "n_params"):
        assert ours.summary[key] == theirs.summary[key], key
    pd.testing.assert_frame_equal(ours.history.drop(columns=TIMING), theirs.history.drop(columns=TIMING))
    pd.testing.assert_frame_equal(ours.steps, theirs.steps)
    records = ours.records()
    per_step = records.groupby(["step", "layer", "metric"]).size()
    assert (per_step == 1).all(), "a record appears more than once"
    assert sorted(records["step"].unique()) == list(range(n_steps)), "a recorded step is missing"
    order = ["step", "position", "metric"]
    pd.testing.assert_frame_equal(records.sort_values(order, ignore_index=True),
                                  theirs.records().sort_values(order, ignore_index=True))
    assert not list(run_dir.glob(".*.tmp")) and not list((run_dir / runs.RECORDS).glob(".*.tmp"))
    assert not (run_dir / LOCK).exists()


# ---------------------------------------------------------------------------------------
# 1. Crash safety: SIGKILL at random moments, rerun the same command

EPOCHS, STEPS = 5, 3  # 192 images in batches of 64
SMALL = ["--dataset", "synthetic", "--depth", "2", "--width", "2", "--batch-size", "64", "--subset", "192",
         "--val-fraction", "0.02", "--lr", "3e-3", "--device", "cpu", "--eval-batch-size", "2048"]
TRAIN = ["train", *SMALL, "--block", "res", "--epochs", EPOCHS, "--quiet"]
POINT_KILLS = ["step", "write:last.pt", "write:best.pt", "write:records", "write:records", "evaluate", "evaluate",
               "write:history.parquet"]  # mid-step, -checkpoint-write, -records-flush, -evaluation, -tables
KILLS = {"train": 10, "sweep": 5}  # the closing note's count of kills survived


def _checkpointed(run_dir: Path) -> int:
    return load_checkpoint(run_dir / runs.LAST)["epoch"] if (run_dir / runs.LAST).exists() else 0


def _pause_for(kind: str, epochs_left: int, fresh: bool, rng: random.Random) -> str:
    """A GRADLAB_FAULT_PAUSE spec for one launch: the kind's n-th moment, within the next two epochs.

    ``time`` kills pause at the final summary write as a backstop, so that the process is still
    there when the random time comes."""
    if epochs_left == 0 and kind in ("step", "write:last.pt", "write:best.pt", "write:records", "write:history.parquet"):
        kind = "evaluate"  # only the test evaluation and the last summary are left
    if kind == "write:best.pt" and not fresh:
        kind = "write:last.pt"  # only a run's first epoch is sure to write best.pt
    per_epoch = {"step": STEPS, "write:last.pt": 1, "write:records": 1, "evaluate": 1, "write:best.pt": 1,
                 "write:history.parquet": 1}
    count = {"step": epochs_left * STEPS, "write:last.pt": epochs_left, "write:records": epochs_left,
             "evaluate": epochs_left + 1, "write:best.pt": 1, "write:history.parquet": epochs_left}
    if kind == "time":
        return f"write:summary.json:{epochs_left + 2}"  # the start, every epoch end, the end
    return f"{kind}:{rng.randint(1, min(count[kind], 2 * per_epoch[kind]))}"


def test_train_survives_ten_kills_and_ends_exactly_like_an_uninterrupted_run(server, tmp_path):
    reference = tmp_path / "reference"
    start = time.monotonic()
    assert server.wait(server.start([*TRAIN, "--out", reference])) == 0
    launch_seconds = time.monotonic() - start

    rng = random.Random(7)
    kinds = rng.sample(POINT_KILLS, len(POINT_KILLS)) + ["time", "time"]
    run_dir, landed = tmp_path / "run", []
    for kind in kinds:
        done = _checkpointed(run_dir)
        pause = _pause_for(kind, EPOCHS - done, done == 0, rng)
        launch = server.start([*TRAIN, "--out", run_dir], pause=pause)
        if kind == "time":
            time.sleep(rng.uniform(0, launch_seconds))
            at = "time"
        else:
            at = server.wait_for_pause(launch)
        assert server.kill(launch) == -signal.SIGKILL
        landed.append(at)
        assert_everything_loads(run_dir)
    assert len(landed) == KILLS["train"]
    for moment in ("step", "write:last.pt", "write:records", "evaluate", "write:history.parquet"):
        assert any(at.startswith(moment) for at in landed), (moment, landed)

    final = server.run([*TRAIN, "--out", run_dir])
    assert final.exit == 0, final.err()
    assert_same_run(run_dir, reference, EPOCHS * STEPS)


OPTIONS = dict(zip(SMALL[::2], SMALL[1::2]))
SWEEP_ARGS = ["sweep", "--blocks", "conv,res", "--depths", "1", "--seeds", "0,1", "--epochs", "2", "--jobs", "1",
              *[x for option, value in OPTIONS.items() if option != "--depth" for x in (option, value)]]
SWEEP_CELLS = ["conv-d1-s0", "conv-d1-s1", "res-d1-s0", "res-d1-s1"]


def test_a_sweep_killed_with_cells_in_every_state_ends_like_an_uninterrupted_one(server, tmp_path):
    reference = tmp_path / "reference"
    assert server.run([*SWEEP_ARGS, "--out", reference]).exit == 0

    out = tmp_path / "sweep"
    blocker = cell_dir(out, SWEEP_CELLS[0]) / "samples.npz" / "in-the-way"  # fails the first cell's first try
    blocker.mkdir(parents=True)
    rng = random.Random(11)
    states_seen = []
    # The first kill lands inside the third cell: the first has failed, the second is complete,
    # the fourth has not started. Later kills land anywhere in what is left.
    moments = [f"step:{2 * 3 + rng.randint(1, 3)}", f"write:last.pt:{rng.randint(1, 2)}",
               f"write:records:{rng.randint(1, 2)}", f"evaluate:{rng.randint(1, 3)}", "time"]
    for moment in moments:
        if moment == "time":  # the last summary write of the cells left is the backstop
            left = [2 - _checkpointed(cell_dir(out, name)) for name in SWEEP_CELLS
                    if cell_status(cell_dir(out, name)) != "complete"]
            launch = server.start([*SWEEP_ARGS, "--out", out], pause=f"write:summary.json:{sum(n + 2 for n in left)}")
            time.sleep(rng.uniform(0.5, 2.0))
        else:
            launch = server.start([*SWEEP_ARGS, "--out", out], pause=moment)
            server.wait_for_pause(launch)
        assert server.kill(launch) == -signal.SIGKILL
        states_seen.append([cell_status(cell_dir(out, name)) for name in SWEEP_CELLS])
        for name in SWEEP_CELLS:
            assert_everything_loads(cell_dir(out, name))
        if blocker.exists():
            shutil.rmtree(blocker.parent)  # the failed cell can train from the next try on
    assert states_seen[0] == ["failed", "complete", "running", "pending"], states_seen
    assert len(moments) == KILLS["sweep"]

    final = server.run([*SWEEP_ARGS, "--out", out])
    assert final.exit == 0, final.err()
    assert f"{len(SWEEP_CELLS)} cells" in final.out()
    for name in SWEEP_CELLS:
        assert_same_run(cell_dir(out, name), cell_dir(reference, name), 2 * STEPS)
    assert not (out / LOCK).exists()


# ---------------------------------------------------------------------------------------
# 2. Corrupt files: one line naming the file and what to do, exit status 2, nothing changed

PARTIAL = ["train", *SMALL, "--block", "res", "--epochs", 2, "--quiet"]  # TRAIN resumes it for 3 more epochs


@pytest.fixture(scope="module")
def partial_run(server, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("partial") / "run"
    server.succeed([*PARTIAL, "--out", folder])
    return folder


@pytest.fixture(scope="module")
def finished_sweep(server, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep") / "sweep"
    server.succeed([*SWEEP_ARGS, "--out", folder])
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    """32 bytes of seeded noise over the middle of the file (inside the tensors of a checkpoint)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 32] = random.Random(0).randbytes(32)
    path.write_bytes(bytes(data))


def first_part(run_dir: Path) -> Path:
    return sorted((run_dir / runs.RECORDS).glob("part-*.parquet"))[0]


CORRUPT_RUN_FILES = {
    "last.pt truncated": (lambda d: d / runs.LAST, truncate),
    "last.pt garbled": (lambda d: d / runs.LAST, garble),
    "last.pt empty": (lambda d: d / runs.LAST, lambda p: p.write_bytes(b"")),
    "best.pt truncated": (lambda d: d / runs.BEST, truncate),
    "best.pt garbled": (lambda d: d / runs.BEST, garble),
    "records.parquet part truncated": (first_part, truncate),
    "records.parquet part garbled": (first_part, garble),
    "summary.json truncated": (lambda d: d / runs.SUMMARY, truncate),
    "summary.json garbled": (lambda d: d / runs.SUMMARY, garble),
    "summary.json not an object": (lambda d: d / runs.SUMMARY, lambda p: p.write_text("[]")),
    "config.json truncated": (lambda d: d / runs.CONFIG, truncate),
    "config.json garbled": (lambda d: d / runs.CONFIG, garble),
    "config.json without options": (lambda d: d / runs.CONFIG, lambda p: p.write_text("{}")),
}


@pytest.mark.parametrize("case", list(CORRUPT_RUN_FILES))
def test_a_corrupt_run_file_is_named_and_nothing_changes(partial_run, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(partial_run, run_dir)
    target_of, corrupt = CORRUPT_RUN_FILES[case]
    target = target_of(run_dir)
    corrupt(target)
    before = snapshot(run_dir)
    line = one_error_line(invoke(*TRAIN, "--out", run_dir))
    assert str(target) in line and "--restart" in line, line
    assert snapshot(run_dir) == before


def test_a_complete_run_with_a_corrupt_checkpoint_is_named_too(partial_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(partial_run, run_dir)
    garble(run_dir / runs.LAST)
    before = snapshot(run_dir)
    line = one_error_line(invoke(*PARTIAL, "--out", run_dir))  # the same length: finished, if it were sound
    assert str(run_dir / runs.LAST) in line and "checksum" in line and "--restart" in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("corrupt", [truncate, garble], ids=["truncated", "garbled"])
def test_a_corrupt_sweep_json_is_named_and_nothing_changes(finished_sweep, tmp_path, corrupt):
    out = tmp_path / "sweep"
    shutil.copytree(finished_sweep, out)
    corrupt(out / runs.SWEEP)
    before = snapshot(out)
    line = one_error_line(invoke(*SWEEP_ARGS, "--out", out))
    assert str(out / runs.SWEEP) in line and "delete it and rerun the same gradlab sweep command" in line, line
    assert snapshot(out) == before


def test_a_corrupt_cell_is_refused_untouched_while_the_others_go_on(server, finished_sweep, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(finished_sweep, out)
    bad = cell_dir(out, "res-d1-s0")
    truncate(bad / runs.LAST)
    before = snapshot(bad)
    longer = [("3" if previous == "--epochs" else a) for previous, a in zip([None, *SWEEP_ARGS], SWEEP_ARGS)]
    launch = server.run([*longer, "--out", out])  # every cell resumes for a third epoch
    assert launch.exit == 3, launch.err()  # the sweep ran every cell it could, and one failed
    assert "3 trained, 0 diverged, 0 already finished, 1 failed" in launch.out()
    assert f"res-d1-s0: failed: {bad / runs.LAST}: cannot be loaded" in launch.out()
    assert snapshot(bad) == before
    for name in ("conv-d1-s0", "conv-d1-s1", "res-d1-s1"):
        assert runs.load_run(cell_dir(out, name)).summary["epochs_done"] == 3
        assert_everything_loads(cell_dir(out, name))


def test_report_on_a_sweep_with_a_corrupt_cell_reports_the_others_and_names_it(finished_sweep, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(finished_sweep, out)
    garble(cell_dir(out, "conv-d1-s1") / runs.SUMMARY)
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert "conv-d1-s1" in result.stderr and str(cell_dir(out, "conv-d1-s1") / runs.SUMMARY) in result.stderr
    assert "res" in result.stdout and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------
# 5. Untrusted files: crafted checkpoints and data files are refused, their payloads never run


class Payload:
    """Unpickling this runs ``code`` (a shell command through os.system, or Python through exec)."""

    def __init__(self, marker: Path, how: str = "system") -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _evil_checkpoint(kind: str, marker: Path) -> bytes:
    """A checkpoint-shaped file whose unpickling would create ``marker``."""
    state = {"model": {}, "optimizer": {}, "epoch": 2, "step": 6, "best_val_acc": 0.1,
                                     "best_epoch": 0, "history": [], "step_losses": [], "rng": {}}
    if kind == "torch.save, os.system in the weights":
        state["model"] = {"conv1.weight": Payload(marker)}
    elif kind == "torch.save, exec in the optimizer state":
        state["optimizer"] = {"state": {0: Payload(marker, "exec")}}
    elif kind == "plain pickle, os.system":
        return pickle.dumps(Payload(marker), protocol=2)
    elif kind == "plain pickle, exec":
        return pickle.dumps({"model": Payload(marker, "exec")}, protocol=2)
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


EVIL_CHECKPOINTS = ["torch.save, os.system in the weights", "torch.save, exec in the optimizer state",
                    "plain pickle, os.system", "plain pickle, exec"]


@pytest.mark.parametrize("name", [runs.LAST, runs.BEST])
@pytest.mark.parametrize("kind", EVIL_CHECKPOINTS)
def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(partial_run, tmp_path, kind, name):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(partial_run, run_dir)
    (run_dir / name).write_bytes(_evil_checkpoint(kind, marker))
    before = snapshot(run_dir)
    line = one_error_line(invoke(*TRAIN, "--out", run_dir))
    assert f"{run_dir / name}: cannot be loaded as a gradlab checkpoint" in line
    assert not marker.exists() and snapshot(run_dir) == before
    if kind.startswith("plain pickle"):  # control: an unrestricted load does run it
        pickle.loads((run_dir / name).read_bytes())
    else:
        torch.load(run_dir / name, weights_only=False)
    assert marker.exists()


DATA_FILES = ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
              "test_batch"]


@pytest.fixture(scope="module")
def zero_layout(tmp_path_factory) -> Path:
    """A valid cifar-10-batches-py of black images (every file is read before the test batch)."""
    folder = tmp_path_factory.mktemp("zeros") / "cifar-10-batches-py"
    folder.mkdir()
    batch = pickle.dumps({b"data": np.zeros((10_000, 3072), np.uint8), b"labels": [0] * 10_000}, protocol=5)
    for name in DATA_FILES[1:]:
        (folder / name).write_bytes(batch)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}, protocol=2))
    return folder


def _evil_data(name: str, how: str, marker: Path) -> bytes:
    if name == "batches.meta":
        return pickle.dumps({b"label_names": [Payload(marker, how)] * 10}, protocol=2)
    if how == "object array":
        return pickle.dumps({b"data": np.array([Payload(marker)], dtype=object), b"labels": [0] * 10_000}, protocol=2)
    return pickle.dumps({b"data": Payload(marker, how), b"labels": [0] * 10_000}, protocol=2)


EVIL_DATA = [(name, "system") for name in DATA_FILES] + [("data_batch_1", "exec"), ("data_batch_2", "object array")]


@pytest.mark.parametrize("name, how", EVIL_DATA)
def test_a_malicious_data_file_is_refused_and_its_payload_never_runs(zero_layout, tmp_path, name, how):
    root, marker = tmp_path / "data", tmp_path / "pwned"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for src in zero_layout.iterdir():
        (folder / src.name).symlink_to(src)
    (folder / name).unlink()
    (folder / name).write_bytes(_evil_data(name, how, marker))
    options = {**OPTIONS, "--dataset": "cifar10", "--data-root": str(root)}
    line = one_error_line(invoke("train", *[x for kv in options.items() for x in kv], "--out", tmp_path / "run"))
    assert f"{folder / name}: refused to unpickle" in line and "may be malicious" in line
    assert not marker.exists() and not (tmp_path / "run").exists()
    pickle.loads((folder / name).read_bytes())  # control: the plain unpickler does run it
    assert marker.exists()


EVIL_NAME = "<img src=x onerror=alert(1)>"


def test_the_html_report_escapes_file_strings_and_refuses_pickled_samples(partial_run, tmp_path):
    """Strings read from run files (a cell's name from sweep.json, class names from samples.npz) are
    escaped in the page; a samples.npz holding a pickled object array is skipped, its payload not run."""
    out, marker = tmp_path / "sweep", tmp_path / "pwned"
    poisoned, evil = cell_dir(out, "poisoned"), cell_dir(out, EVIL_NAME)
    shutil.copytree(partial_run, poisoned)
    shutil.copytree(partial_run, evil)
    with open(poisoned / "samples.npz", "wb") as f:
        np.savez(f, images=np.array([Payload(marker)], dtype=object), labels=np.array(["cat"]))
    images = np.load(evil / "samples.npz")["images"]
    np.savez(evil / "samples.npz", images=images, labels=np.array(["<script>alert(2)</script>"] * len(images)))
    runs.write_json(out / runs.SWEEP, {"cells": ["poisoned", EVIL_NAME]})
    result = invoke("report", out, "--html", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    assert EVIL_NAME not in page and "<script>alert(2)" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert not marker.exists()
    np.load(poisoned / "samples.npz", allow_pickle=True)["images"]  # control: a trusting load runs it
    assert marker.exists()


MALICIOUS = {"checkpoints": 2 * len(EVIL_CHECKPOINTS), "data files": len(EVIL_DATA), "samples.npz": 1}  # the closing note


# ---------------------------------------------------------------------------------------
# 6. One writer per run


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(server, tmp_path):
    run_dir = tmp_path / "run"
    first = server.start([*TRAIN, "--out", run_dir], pause="step:2")
    server.wait_for_pause(first)
    before = snapshot(run_dir)
    line = one_error_line(invoke(*TRAIN, "--out", run_dir))
    assert f"in use by another gradlab process (pid {first.pid} on host {platform.node()}" in line
    assert snapshot(run_dir) == before

    assert server.kill(first) == -signal.SIGKILL
    owner = json.loads((run_dir / LOCK).read_text())  # left behind: stale
    assert owner["pid"] == first.pid and owner["host"] == platform.node()
    again = server.run([*TRAIN, "--out", run_dir])
    assert again.exit == 0, again.err()
    assert f"gradlab: note: {run_dir}: took over the lock left by pid {first.pid} on host" in again.err()
    assert runs.load_run(run_dir).summary["status"] == "complete" and not (run_dir / LOCK).exists()


def test_a_sweep_folder_has_one_writer(tmp_path):
    out = tmp_path / "sweep"
    with RunLock(out, what="sweep folder"):
        line = one_error_line(invoke(*SWEEP_ARGS, "--out", out))
        assert f"{out}: in use by another gradlab process (pid {os.getpid()}" in line
        assert "one writer per sweep folder" in line
    assert not out.exists()  # the lock's folder is removed again when nothing else was written


def test_a_lock_file_with_garbage_is_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_text("not json")
    with RunLock(tmp_path / "run") as lock:
        assert lock.stale is None and json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK).exists()


# ---------------------------------------------------------------------------------------
# 7. Resource limits


@pytest.mark.parametrize("block", ["conv", "res", "resdown", "skip"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_the_memory_formulas_are_autograds_saved_tensors(block, norm):
    import torch.nn.functional as F

    from gradlab.models import build_model, count_parameters

    def saved(depth: int, width: int, batch: int) -> int:
        model = build_model(block, depth, width, norm).to("meta").train()
        owned = {id(t) for t in [*model.parameters(), *model.buffers()]}
        seen = {}

        def pack(t):
            if id(t) not in owned:
                seen[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.empty(batch, 3, 32, 32, device="meta"))
            F.cross_entropy(out, torch.zeros(batch, dtype=torch.long, device="meta"))
        return sum(seen.values())

    for depth, width in [(0, 2), (1, 6), (3, 10)]:
        assert saved(depth, width, 3) - saved(depth, width, 2) == resources.saved_bytes_per_image(block, depth, width, norm)
        assert resources.n_parameters(block, depth, width, norm) == count_parameters(build_model(block, depth, width, norm))


def test_the_disk_estimate_covers_what_a_run_writes(partial_run):
    config = TrainConfig(block="res", depth=2, width=2, epochs=2, batch_size=64, subset=192, val_fraction=0.02)
    written = sum(p.stat().st_size for p in partial_run.rglob("*") if p.is_file())
    estimate = disk_estimate(config, RecordConfig())
    assert written <= estimate
    records = sum(p.stat().st_size for p in (partial_run / runs.RECORDS).glob("*.parquet"))
    estimated_records = resources.estimate_disk("res", 2, 2, "batch", 6, 0, RecordConfig(), 2, 0) - \
        resources.estimate_disk("res", 2, 2, "batch", 6, 0, None, 2, 0)
    assert records <= estimated_records <= 4 * records


def test_too_little_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "free_disk", lambda path: 1024 ** 2)
    line = one_error_line(invoke(*TRAIN, "--out", tmp_path / "run"))
    assert "will write about" in line and "only 0.00 GiB is free" in line and "--record-every" in line
    assert not (tmp_path / "run").exists()
    line = one_error_line(invoke(*SWEEP_ARGS, "--out", tmp_path / "sweep"))
    assert "the sweep's 4 cells to train will write about" in line
    assert not (tmp_path / "sweep" / runs.RUNS_FOLDER).exists() or not any((tmp_path / "sweep" / runs.RUNS_FOLDER).iterdir())


def test_too_little_memory_is_refused_before_any_work(tmp_path):
    line = one_error_line(invoke(*TRAIN, "--depth", 10 ** 9, "--out", tmp_path / "run"))
    assert "needs about" in line and "of memory on cpu" in line and "use a smaller --batch-size" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# 4. Divergence

DIVERGE = ["train", *SMALL, "--block", "res", "--epochs", 3, "--quiet", "--lr", "1e8"]  # Adam at 1e8


def _assert_located(run_dir: Path, diverged: dict) -> None:
    """The records at the divergence step are non-finite at the named probe point and finite before it."""
    assert set(diverged) == {"step", "epoch", "layer", "position", "cause"}
    assert diverged["cause"] in ("loss", "gradient", "activation")
    records = runs.load_run(run_dir).records()
    at = records[records["step"] == diverged["step"]]
    assert len(at) and not np.isfinite(at["value"]).all()
    if diverged["cause"] == "activation":
        broken = at[at["metric"].map(schema.EVIDENCE).eq("activation") & ~np.isfinite(at["value"]) & (at["position"] >= 0)]
        assert broken["position"].min() == diverged["position"]
        assert set(broken.loc[broken["position"] == diverged["position"], "layer"]) == {diverged["layer"]}
    earlier = records[records["step"] < diverged["step"]]
    assert np.isfinite(earlier["value"]).all()  # nothing non-finite before the step named


def test_a_diverging_run_stops_at_the_first_nonfinite_step_and_says_where(server, tmp_path):
    run_dir = tmp_path / "run"
    launch = server.succeed([*DIVERGE, "--out", run_dir])
    summary = runs.load_run(run_dir).summary
    diverged = summary["diverged"]
    assert summary["status"] == "diverged" and diverged["step"] <= 5
    _assert_located(run_dir, diverged)
    assert f"diverged: the first non-finite {diverged['cause']} appeared at step {diverged['step']}" in launch.out()
    steps = runs.load_run(run_dir).steps
    assert list(steps["step"]) == list(range(diverged["step"] + 1))  # the loss curve up to the divergence
    assert summary["test_acc_last"] is None and summary["epochs_done"] == diverged["epoch"]
    assert_everything_loads(run_dir)

    before = snapshot(run_dir)
    again = server.run([*DIVERGE, "--out", run_dir])  # finished: reported, not retrained
    assert again.exit == 0 and f"diverged at step {diverged['step']}" in again.out()
    assert snapshot(run_dir) == before

    cont = tmp_path / "continued"
    launch = server.succeed([*DIVERGE, "--on-nonfinite", "continue", "--out", cont])
    summary = runs.load_run(cont).summary
    assert summary["status"] == "diverged" and summary["diverged"] == diverged
    assert summary["epochs_done"] == 3 and len(runs.load_run(cont).steps) == 3 * STEPS
    assert "training went on to the last epoch" in launch.out()
    assert_everything_loads(cont)


def test_a_large_but_finite_learning_rate_is_legal(server, tmp_path):
    server.succeed([*DIVERGE[:-1], "1e4", "--out", tmp_path / "run"])  # Adam at 1e4: huge, finite
    run = runs.load_run(tmp_path / "run")
    assert run.summary["status"] == "complete" and "diverged" not in run.summary
    assert np.isfinite(run.steps["loss"]).all() and run.steps["loss"].max() > 1e11


def test_locate_nonfinite_prefers_the_first_broken_activation_then_the_first_gradient_backward():
    def frame(rows):
        return pd.DataFrame(rows, columns=["step", "epoch", "layer", "position", "block", "metric", "value"])

    nan, inf = float("nan"), float("inf")
    rows = [(4, 0, "model", -1, "model", "loss", nan), (4, 0, "conv1", 0, "stem", "act_std", 1.0),
            (4, 0, "layers.1", 4, "res", "act_std", inf), (4, 0, "layers.0", 3, "res", "act_mean", nan),
            (4, 0, "layers.2", 5, "res", "nonfinite_grads", 12.0)]
    assert runs.locate_nonfinite(frame(rows)) == {"layer": "layers.0", "position": 3, "cause": "activation"}
    grads = [(4, 0, "conv2", 1, "stem", "nonfinite_grads", 3.0), (4, 0, "layers.2", 5, "res", "nonfinite_grads", 12.0),
             (4, 0, "linear1", 6, "head", "nonfinite_grads", 0.0), (4, 0, "conv2", 1, "stem", "act_std", 2.0)]
    assert runs.locate_nonfinite(frame(grads)) == {"layer": "layers.2", "position": 5, "cause": "gradient"}
    assert runs.locate_nonfinite(frame([(4, 0, "model", -1, "model", "loss", nan)])) is None


@pytest.mark.parametrize("frozen", [False, True], ids=["all-trained", "frozen-layer"])
def test_a_non_finite_gradient_under_a_finite_loss_is_caught_on_the_cpu(small_config, small_splits, backend, frozen):
    """The watch's host path: a NaN in one weight's gradient at step 3, the loss still finite.
    Counted by the compiled kernels, or (eager backend, frozen parameters) by the foreach norms."""
    from gradlab.train import Trainer, _Divergence

    watch = _Divergence()
    trainer = Trainer(small_config, callbacks=[watch], splits=small_splits)
    if frozen:
        trainer.model.layers[1].requires_grad_(False)
    weight = trainer.model.layers[0].conv1.weight
    weight.register_hook(lambda grad: grad.clone().fill_(float("nan")) if trainer.step == 3 else grad)
    trainer._emit("on_fit_start")
    while not trainer.stop_training and trainer.epoch < small_config.epochs:
        trainer.train_epoch()
        trainer.epoch += 1
    assert trainer.diverged == {"step": 3, "epoch": 3 // len(trainer.train_loader), "cause": "gradient"}
    assert trainer.step == 4  # stopped after the step that diverged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_divergence_watch_adds_no_host_sync_per_step_on_cuda():
    """Between its checks the watch only queues device work: CUDA's sync debug mode would raise."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from gradlab.models import build_model
    from gradlab.train import DIVERGENCE_CHECK_EVERY, _Divergence

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("res", 2, 8).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e8)
    trainer = SimpleNamespace(device=device, step=0, model=model, diverged=None, stop_training=False,
                              train_loader=range(10 ** 6), config=SimpleNamespace(on_nonfinite="stop"))
    watch = _Divergence()
    watch.on_fit_start(trainer)
    x, y = torch.randn(16, 3, 32, 32, device=device), torch.randint(0, 10, (16,), device=device)
    for step in range(DIVERGENCE_CHECK_EVERY):
        checked = step == 0 or (step + 1) % DIVERGENCE_CHECK_EVERY == 0  # step 0 warms CUDA up
        torch.cuda.set_sync_debug_mode(0 if checked else "error")
        try:
            loss = F.cross_entropy(model(x), y)
            watch.on_after_forward(trainer, loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            watch.on_after_backward(trainer)
            optimizer.step()
            watch.on_after_step(trainer)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        trainer.step += 1
    assert trainer.diverged is not None and trainer.diverged["step"] < 10 and trainer.stop_training
