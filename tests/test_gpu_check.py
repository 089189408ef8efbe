"""benchmarks/gpu_check.py, the one prepared GPU run (issue 30): its dry run on the CPU end to
end (every step at toy sizes, so the script cannot rot between GPU loans), the budget that
kills a step which runs over, the parsing of pytest's reports, and the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it up itself
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out / "run"), "--dry-run",
                           "--jobs", "2", "--bundle", str(out / "gpu_check.tar.gz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return out, proc, time.perf_counter() - t0


def test_dry_run_passes_every_step(dry_run):
    out, proc, seconds = dry_run
    summary = json.load(open(out / "run" / "summary.json"))
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {name: "ok" for name in gpu_check.STEP_NAMES}, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0
    md = (out / "run" / "summary.md").read_text()
    assert "| step | status |" in md and "## Accuracy against float64" in md and "## Benchmarks" in md
    assert proc.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the summary is printed last


def test_dry_run_results(dry_run):
    out, _, _ = dry_run
    run = out / "run"
    step = lambda name: json.load(open(run / f"{name}.json"))  # noqa: E731
    dev = step("device")["result"]
    assert dev["copy"]["gbps"] > 0 and dev["matmul"]["tflops"] > 0 and dev["facts"]["torch"]
    tests = step("tests_kernels")["tests"]["counts"]
    assert tests["passed"] >= 2 and tests["failed"] == tests["errors"] == 0
    acc = step("accuracy")["result"]["rows"]
    assert {(r["op"], r["dtype"]) for r in acc} == {(op, dt) for op in ("focal_itc", "soft_mask")
                                                    for dt in ("bfloat16", "float16")}
    assert all(r["within_test_criterion"] for r in acc), acc
    from benchmarks import render

    rows = render.load(str(run))  # the bench folder: what --collect copies to bench_results/<device>/
    assert {r["op"] for r in rows} == {"focal_itc", "soft_mask", "train_step"}
    ts = step("train_step")["result"]
    assert {r["provider"] for r in ts["rows"]} == {"fused", "reference", "fused_no_softmask"}
    assert ts["profile"]["top"]
    job = step("default_job")["result"]
    assert job["steps"] == 2 and job["eval"]
    tr = step("torchrun")["result"]
    assert tr["collectives_ok"] and tr["ddp_steps"]["max_abs_diff"] == 0.0
    assert tr["train_runs"]["max_abs_diff"] == 0.0 and tr["train_runs"]["steps"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "run/summary.md" in names and "run/bench/bench_soft_mask.json" in names
    assert (out / "summary.md").exists()  # beside the bundle


def test_only_reruns_one_step_and_collect_renders(dry_run, tmp_path):
    out, _, _ = dry_run
    run = out / "run"
    before = json.load(open(run / "accuracy.json"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(run), "--dry-run",
                           "--only", "device"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert json.load(open(run / "accuracy.json")) == before  # the other steps' results are kept
    summary = json.load(open(run / "summary.json"))
    assert [s["step"] for s in summary["steps"]] == gpu_check.STEP_NAMES
    dest = gpu_check.collect(str(run), str(tmp_path / "bench_results"))
    assert sorted(os.listdir(dest)) == sorted(  # the files of the dry run's bench steps
        ["bench_focal_albef_gpu.json", "bench_focal_albef.json", "bench_focal_clip.json", "bench_soft_mask.json",
         "train_step.json", "gpu_check_summary.md", "gpu_check_summary.json"]), os.listdir(os.path.join(run, "bench"))
    assert "## focal_itc / cpu_small" in (tmp_path / "bench_results" / "README.md").read_text()


def test_budget_kills_a_step_that_runs_over(tmp_path):
    t0 = time.perf_counter()
    rc, seconds = gpu_check._run_with_budget(
        [sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "print('started', flush=True); time.sleep(60)"],
        str(tmp_path / "log"), budget=2.0, env=dict(os.environ))
    assert rc is None and time.perf_counter() - t0 < 30
    assert "started" in (tmp_path / "log").read_text()


def test_gpu_budgets_fit_eight_minutes():
    assert sum(s.budget for s in gpu_check.STEPS) <= gpu_check.TOTAL_BUDGET < 8 * 60
    assert gpu_check.STEP_NAMES[0] == "device" and gpu_check.STEP_NAMES[-1] == "torchrun"


def test_a_cut_off_step_keeps_its_results(tmp_path):
    """A worker that is killed keeps what it recorded; the summary says timeout and names
    the steps not run."""
    out = tmp_path / "out"
    out.mkdir()
    rec = gpu_check.Recorder(str(out / "device.result.json"))
    rec.set("copy", dict(gbps=1.0))
    res = dict(step="device", what="", started="", seconds=3.0, budget_s=3.0, returncode=None, dry_run=True,
               status="timeout", result=json.load(open(out / "device.result.json")))
    gpu_check._write_json(str(out / "device.json"), res)
    summary = gpu_check.summarize(str(out))
    assert summary["steps"][0]["status"] == "timeout" and summary["not_run"] == gpu_check.STEP_NAMES[1:]
    assert "| device | timeout |" in (out / "summary.md").read_text()


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad[x]" time="0.1"><failure message="AssertionError: 2 != 3">...</failure></testcase>
<testcase classname="tests.test_a" name="test_skip" time="0"><skipped type="pytest.skip" message="needs CUDA">...</skipped></testcase>
<testcase classname="tests.test_a" name="test_err" time="0"><error message="fixture broke">...</error></testcase>
</testsuite></testsuites>"""


def test_parse_junit_and_verbose_log(tmp_path):
    (tmp_path / "r.xml").write_text(JUNIT)
    res = gpu_check._parse_junit(str(tmp_path / "r.xml"))
    assert res["counts"] == dict(passed=1, failed=1, errors=1, skipped=1)
    assert res["failures"][0] == dict(test="tests.test_a::test_bad[x]", message="AssertionError: 2 != 3")
    assert res["skip_reasons"] == {"needs CUDA": 1}
    assert gpu_check._parse_junit(str(tmp_path / "missing.xml")) is None
    (tmp_path / "log").write_text("tests/test_a.py::test_ok PASSED [ 50%]\n"
                                  "[gw1] [ 75%] FAILED tests/test_a.py::test_bad[x] \n"
                                  "tests/test_a.py::test_skip SKIPPED (needs CUDA) [100%]\n")
    res = gpu_check._parse_verbose_log(str(tmp_path / "log"))
    assert res["counts"] == dict(passed=1, failed=1, errors=0, skipped=1) and res["partial"]


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="the refusal is for machines without an NVIDIA GPU")
def test_full_sizes_need_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": os.path.dirname(sys.executable)})  # no nvidia-smi on PATH
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
