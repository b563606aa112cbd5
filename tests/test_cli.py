"""The command line: real runs through click's runner; every bad input is one line and exit status 2."""
import pickle

import pytest
from click.testing import CliRunner

from gradlab.cli import main

SMALL = ["--dataset", "synthetic", "--depth", "2", "--width", "8", "--epochs", "2", "--batch-size", "128",
         "--subset", "512", "--lr", "3e-3", "--device", "cpu", "--eval-batch-size", "2048"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_train_prints_parameters_epochs_and_test_accuracy_then_resumes(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *SMALL, "--block", "skip", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    assert "parameters" in result.stdout and "note: synthetic data" in result.stdout
    assert "test accuracy" in result.stdout and "epoch 1/2" not in result.stdout  # --quiet
    again = invoke("train", *SMALL, "--block", "skip", "--out", out)
    assert again.exit_code == 0 and "already complete" in again.stdout
    three_epochs = [("3" if previous == "--epochs" else a) for previous, a in zip([None, *SMALL], SMALL)]
    longer = invoke("train", *three_epochs, "--block", "skip", "--out", out)
    assert longer.exit_code == 0, longer.output
    assert "resuming after epoch 2" in longer.stdout and "epoch 3/3" in longer.stdout
    report = invoke("report", out)
    assert report.exit_code == 0, report.output
    assert "skip" in report.stdout and "layers.1" in report.stdout


def test_help_explains_every_option_with_its_default():
    text = invoke("train", "--help").stdout
    for option, default in [("--block", "conv"), ("--depth", "6"), ("--width", "32"), ("--epochs", "30"),
                            ("--batch-size", "256"), ("--lr", "0.0001"), ("--seed", "0"), ("--record-every", "1")]:
        assert option in text
        assert f"[default: {default}" in text.split(option, 1)[1], option


def _malicious_root(tmp_path):
    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    folder = tmp_path / "evil" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    return tmp_path / "evil"


def _bad_inputs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "unknown block": (["--block", "dense"], "'dense' is not one of"),
        "unknown norm": (["--norm", "layer"], "'layer' is not one of"),
        "negative depth": (["--depth", "-1"], "-1 is not in the range"),
        "odd width": (["--width", "7"], "width must be an even integer"),
        "tiny width": (["--width", "1"], "1 is not in the range"),
        "zero batch": (["--batch-size", "0"], "0 is not in the range"),
        "zero epochs": (["--epochs", "0"], "0 is not in the range"),
        "zero lr": (["--lr", "0"], "lr must be a finite number > 0"),
        "nan lr": (["--lr", "nan"], "lr must be a finite number > 0"),
        "negative lr": (["--lr", "-1e-3"], "lr must be a finite number > 0"),
        "non-numeric depth": (["--depth", "deep"], "'deep' is not a valid integer"),
        "out is a file": (["--out", afile], "is a file"),
        "no data, offline": (["--dataset", "cifar10", "--data-root", empty], "GRADLAB_DATA"),
        "malicious batch file": (["--dataset", "cifar10", "--data-root", _malicious_root(tmp_path)], "refus"),
    }


CASES = ["unknown block", "unknown norm", "negative depth", "odd width", "tiny width", "zero batch", "zero epochs",
         "zero lr", "nan lr", "negative lr", "non-numeric depth", "out is a file", "no data, offline", "malicious batch file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, monkeypatch, case):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    args, expected = _bad_inputs(tmp_path)[case]
    options = dict(zip(SMALL[::2], SMALL[1::2]))
    options["--out"] = str(tmp_path / "run")
    options.update(zip(args[::2], args[1::2]))
    result = invoke("train", *[x for kv in options.items() for x in kv])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists()


def test_report_on_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "neither a run directory" in result.stderr


def test_unknown_command_is_one_line():
    result = invoke("trian")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_the_demo_closes_with_the_measured_similarity_and_lesion_numbers(tmp_path, monkeypatch):
    """The demo command on a tiny configuration, offline (synthetic data): its closing sentences state
    the neighbouring-gradient similarity of each block type and each trained network's lesion."""
    import functools
    import re

    import torchvision

    from gradlab import demo

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(demo, "DemoConfig", functools.partial(
        demo.DemoConfig, probe_depths=(1, 4), train_depths=(1, 3), width=4, probe_batch_size=16, subset=128, epochs=1,
        batch_size=64, shatter_depths=(1, 4), shatter_points=16, shatter_pairs=2, shatter_max_lag=4,
        lesion_images=100))
    result = invoke("demo", "--data-root", tmp_path / "no-data", "--work-dir", tmp_path / "work",
                    "--out", tmp_path / "demo.html", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = result.stdout
    number = r"-?\d+(\.\d+)?(e[+-]\d+)?( ± \d+(\.\d+)?(e[+-]\d+)?)?"
    for block in ("conv", "res", "skip"):
        assert re.search(rf"{block}, batch norm, at initialisation: the mean cosine similarity of input gradients at "
                         rf"neighbouring points was {number} at depth 1 and {number} at depth 4 \(mean ± standard "
                         rf"deviation over 2 image pairs, 16 points per line", out), out
        for depth in (1, 3):
            assert re.search(rf"{block}-d{depth}-s0: \d+\.\d% test accuracy with all {depth} blocks; deleting one "
                             rf"block gave \d+\.\d% to \d+\.\d%", out), out
    assert "first 100 test images" in out and "lesion" in out.splitlines()[-1]
    html = (tmp_path / "demo.html").read_text()
    assert 'id="shatter"' in html and 'id="lesion"' in html


SWEEP_SMALL = ["--dataset", "synthetic", "--depths", "1", "--width", "4", "--epochs", "1", "--batch-size", "64",
               "--subset", "128", "--val-fraction", "0.02", "--device", "cpu", "--record-every", "0"]


def test_a_sweep_with_a_failed_cell_exits_3_after_the_others_and_says_where_the_reasons_are(tmp_path):
    out = tmp_path / "sweep"
    (out / "runs" / "res-d1-s0" / "samples.npz" / "in-the-way").mkdir(parents=True)  # train_run cannot write there
    result = invoke("sweep", *SWEEP_SMALL, "--blocks", "conv,res", "--out", out)
    assert result.exit_code == 3, result.output
    assert "res-d1-s0: failed: IsADirectoryError" in result.output
    assert "2 cells: 1 trained, 0 diverged, 0 already finished, 1 failed" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        f"gradlab: error: 1 of 2 cells failed (reasons above, and in {out / 'runs'}/<cell>/summary.json); "
        "run the same command again to retry them")
    assert "3 the sweep ran every cell it could and some failed" in invoke("sweep", "--help").stdout


def test_a_sweep_whose_cell_diverged_exits_0(tmp_path):
    # Adam at 1e6: finite with BatchNorm, non-finite at step 1 without (as in test_sweep)
    result = invoke("sweep", *SWEEP_SMALL, "--blocks", "conv", "--depths", "2", "--norms", "batch,none",
                    "--lr", "1e6", "--subset", "256", "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    assert "1 diverged" in result.stdout and "0 failed" in result.stdout
