"""Bad input gets one line naming the value and what is expected — never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import write_corpus


def run_cli(*args: str, data_dir=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if data_dir is not None:
        env["FEDPRIV_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "fedpriv", *args], capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_prepared_data_names_the_command_to_run(tmp_path):
    proc = run_cli("simulate", "--run-dir", str(tmp_path / "run"), data_dir=tmp_path / "nothing-here")
    assert_one_line_error(proc, "no prepared data", "fedpriv prepare-data")


@pytest.mark.parametrize("args, fragments", [
    (["--preset", "huge"], ["unknown preset 'huge'", "default"]),
    (["--run-config", "num-rounds=3"], ["unknown config key 'num-rounds'"]),
    (["--run-config", "regions=''"], ["regions", "at least 1 region"]),
    (["--run-config", "target-epsilon=0.0"], ["target-epsilon = 0.0", "epsilon > 0"]),
    (["--run-config", "target-epsilon=-1.0"], ["target-epsilon = -1.0"]),
    (["--run-config", "delta=1.5"], ["delta = 1.5", "(0, 1)"]),
    (["--run-config", "delta=0.0"], ["delta = 0.0"]),
    (["--run-config", "num-server-rounds=0"], ["num-server-rounds = 0", ">= 1"]),
    (["--run-config", "num-server-rounds=1000000"], ["num-server-rounds = 1000000", "at most 10000"]),
    (["--run-config", "target-epsilon=inf"], ["target-epsilon = inf", "a finite number"]),
    (["--run-config", "max-grad-norm=nan"], ["max-grad-norm = nan", "a finite number"]),
    (["--run-config", "resume-from='runs/x'"], ["resume-from = 'runs/x'", "fedpriv run --resume"]),
    (["--run-config", "batch-size='big'"], ["batch-size", "expected a int"]),
    (["--run-config", "secagg-neighbours=1 secagg-threshold=3 regions='a,b,c'"], ["secagg-threshold = 3", "<= 2"]),
    (["--run-config", "grad-sample-mode='fast'"], ["grad-sample-mode = 'fast'", "ghost, hooks"]),
    (["--run-config", "trainable='head' lora-rank=8"], ["lora-rank = 8", "top-K"]),
])
def test_bad_run_config_is_rejected_before_anything_starts(tmp_path, args, fragments):
    data = write_corpus(tmp_path / "data", 200)
    proc = run_cli("simulate", "--run-dir", str(tmp_path / "run"), *args, data_dir=data)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run" / "superlink.log").exists(), "nothing may start for a bad config"


def test_region_too_small_for_the_batch_size(tmp_path):
    data = write_corpus(tmp_path / "data", 200)
    proc = run_cli("simulate", "--run-dir", str(tmp_path / "run"), "--run-config", "batch-size=512", data_dir=data)
    assert_one_line_error(proc, "batch-size = 512", "training posts")


def test_report_of_a_directory_without_a_report(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert_one_line_error(proc, "privacy_report.json")


@pytest.mark.parametrize("where, fragments", [
    ("/proc/forbidden", ["/proc/forbidden", "No such file or directory", "expected"]),
    ("FILE/data", ["FILE/data", "Not a directory", "expected a directory"]),
])
def test_unusable_data_dir_is_one_line_naming_the_path(tmp_path, where, fragments):
    """An OSError from a path the user gave (here: a corpus cache that cannot be created) was a
    FileNotFoundError traceback; now it is one line naming the path and what is expected."""
    (tmp_path / "FILE").write_text("a file, not a directory")
    where = where.replace("FILE", str(tmp_path / "FILE"))
    proc = run_cli("prepare-data", "--data-dir", where)
    assert_one_line_error(proc, *[f.replace("FILE", str(tmp_path / "FILE")) for f in fragments])
    assert proc.stderr.startswith("fedpriv prepare-data: error: ")


def test_a_corpus_of_random_bytes_is_one_line(tmp_path):
    """Random bytes where the corpus should be: a 27-line UnicodeDecodeError traceback before, one line now."""
    import random

    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_bytes(random.Random(1).randbytes(1 << 20))  # > one read buffer: decoding fails
    proc = run_cli("simulate", "--run-dir", str(tmp_path / "run"), data_dir=data)
    assert_one_line_error(proc, "corpus.jsonl", "not UTF-8 text", "fedpriv prepare-data")


def test_a_corpus_of_other_json_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("[1, 2, 3]\n")
    proc = run_cli("simulate", "--run-dir", str(tmp_path / "run"), data_dir=data)
    assert_one_line_error(proc, "corpus.jsonl", "is not fedpriv JSONL", "expected an object")


def test_a_policy_table_for_a_misspelt_region_is_one_line(tmp_path):
    """[regions.us-easst] was ignored silently (us-east then ran under the file's default [policy])."""
    data = write_corpus(tmp_path / "data", 200)
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 10.0\n\n"
                      "[regions.us-easst]\nmax-lifetime-epsilon = 1.0\n")
    proc = run_cli("simulate", "--run-dir", str(tmp_path / "run"), "--run-config",
                   f"regions='us-east,eu-west' sim-region-policy='{policy}'", data_dir=data)
    assert_one_line_error(proc, "[regions.us-easst]", "expected one of us-east, eu-west")
    assert not (tmp_path / "run" / "superlink.log").exists()
