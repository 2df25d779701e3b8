"""The command line end to end on a tiny budget, and every kind of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import toy_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher-steps", "40", "--student-steps", "20", "--batch-size", "64", "--width", "32",
        "--depth", "1", "--n-samples", "1000", "--teacher-samples", "500", "--teacher-sample-steps", "10",
        "--warmup-steps", "5"]
SAMPLE_FILES = ["teacher", "scd-1step", "scd-2step", "sct-1step", "sct-2step"]


def scm(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scm_min.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_end_to_end_writes_samples_metrics_figure_and_log(tmp_path):
    out = tmp_path / "toy"
    result = scm(*TINY, "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in SAMPLE_FILES:
        x = np.load(out / "samples" / f"{name}.npy")
        assert x.shape == (500 if name == "teacher" else 1000, 2) and x.dtype == np.float64 and np.isfinite(x).all()
    metrics = json.loads((out / "metrics.json").read_text())
    for metric in ("sliced_wasserstein", "energy_distance", "precision", "recall"):
        assert set(metrics[metric]) == {"data", *SAMPLE_FILES}
        assert all(np.isfinite(v) for v in metrics[metric].values())
        assert np.isfinite(metrics["floor"]["teacher"][metric])
    assert metrics["sample_sizes"] == {"reference": 1000, "teacher": 500, **{name: 1000 for name in SAMPLE_FILES[1:]}}
    assert metrics["config"]["teacher_steps"] == 40
    assert (out / "toy.png").stat().st_size > 10_000
    assert sorted(os.listdir(out)) == ["metrics.json", "samples", "toy.png", "train.log"]  # no temporary files
    # stderr is not a terminal here: every phase prints plain progress lines, and the log has them too.
    log = (out / "train.log").read_text().splitlines()
    assert json.loads(log[0].removeprefix("config "))["teacher_steps"] == 40
    for phase, steps in (("teacher", 40), ("scd", 20), ("sct", 20)):
        assert any(line.startswith(f"{phase} {steps}/{steps} ") for line in log[1:]), log
        assert f"{phase} {steps}/{steps} " in result.stderr
    assert all(" it/s ETA " in line for line in log[1:])


def test_user_point_cloud_samples_come_back_in_its_units(tmp_path):
    points = 100.0 + 20.0 * toy_data.sample("moons", 3000, seed=0)  # std about 10, centered at 100
    np.save(tmp_path / "cloud.npy", points)
    out = tmp_path / "out"
    result = scm(*TINY, "--teacher-steps", "200", "--data", str(tmp_path / "cloud.npy"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    teacher = np.load(out / "samples" / "teacher.npy")
    np.testing.assert_allclose(teacher.mean(axis=0), points.mean(axis=0), atol=3.0)
    assert 5.0 < teacher.std() < 15.0


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    result = scm("--dry-run", "--student-steps", "7", "--out", str(tmp_path / "never"))
    assert result.returncode == 0
    config = json.loads(result.stdout)
    assert config["student_steps"] == 7 and config["data"] == "8gaussians" and config["out"].endswith("never")
    assert not (tmp_path / "never").exists()


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    return str(path)


GOOD = toy_data.sample("rings", 500, seed=0)
BAD_INPUTS = {
    "missing file": (None, "not found"),
    "not an npy file": (b"these bytes are not a numpy array", "cannot read"),
    "three columns": (np.zeros((500, 3)) + GOOD[:, :1], "shape"),
    "one dimension": (GOOD[:, 0], "shape"),
    "text dtype": (np.array([["a", "b"]] * 500), "real numbers"),
    "nan": (np.where(np.arange(500)[:, None] == 7, np.nan, GOOD), "NaN or inf"),
    "inf": (np.where(np.arange(500)[:, None] == 9, np.inf, GOOD), "NaN or inf"),
    "too few points": (GOOD[:20], "at least"),
    "identical points": (np.ones((500, 2)), "identical"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_data_file_gives_one_error_line_exit_2_and_writes_nothing(tmp_path, case):
    content, expected = BAD_INPUTS[case]
    path = str(tmp_path / "missing.npy") if content is None else _write(tmp_path / "data.npy", content)
    out = tmp_path / "out"
    result = scm(*TINY, "--data", path, "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--data", "nosuchdistribution"], "unknown distribution"),
    (["--teacher-steps", "0"], "at least 1"),
    (["--t-mid", "2.0"], "--t-mid"),
    (["--ema-sigma-rel", "0.5"], "--ema-sigma-rel"),
])
def test_bad_options_give_one_error_line_exit_2_and_write_nothing(tmp_path, args, expected):
    out = tmp_path / "out"
    result = scm(*TINY, *args, "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not out.exists()
