"""Checkpoints that survive a kill (issue 14): leftovers of interrupted saves removed,
``latest`` never naming a missing directory, the fallback to the newest complete
checkpoint, ``--resume`` refusing to start over on top of a run, and a training
process killed at random moments during its saves that still ends exactly where an
uninterrupted run ends."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from softmask.runs import checkpoint as ck
from softmask.train.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STALE = (".tmp-", ".trash-", ".latest-")


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _save(out, step, seed=None, keep=2):
    m = _model(step if seed is None else seed)
    return ck.save_checkpoint(out, step, m, {"step": step}, {"step": step}, keep=keep), m


def _entries(out):
    return sorted(os.listdir(os.path.join(out, ck.CKPT_DIR)))


def _pointer(out):
    with open(os.path.join(out, ck.CKPT_DIR, "latest")) as f:
        return f.read().strip()


def _plant_stale(out):
    root = os.path.join(out, ck.CKPT_DIR)
    os.makedirs(os.path.join(root, ".tmp-step_000007-4242"))
    with open(os.path.join(root, ".tmp-step_000007-4242", "model.safetensors"), "wb") as f:
        f.write(b"half a file")
    os.makedirs(os.path.join(root, ".trash-step_000001-4242"))
    with open(os.path.join(root, ".latest-4242"), "w") as f:
        f.write("step_000007")


def test_save_removes_leftovers_and_keeps_two(tmp_path):
    out = str(tmp_path)
    _save(out, 1)
    _plant_stale(out)
    _save(out, 2)
    assert _entries(out) == ["latest", "step_000001", "step_000002"]
    _save(out, 3)
    assert _entries(out) == ["latest", "step_000002", "step_000003"] and _pointer(out) == "step_000003"
    w = load_file(os.path.join(out, ck.CKPT_DIR, "step_000003", "model.safetensors"))
    assert torch.equal(w["weight"], _model(3).weight.detach())


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "no-exchange"])
def test_resave_never_leaves_latest_dangling(tmp_path, monkeypatch, exchange):
    """Re-saving an existing step (a run resumed from an older checkpoint than the newest
    one on disk): after every rename the save makes, ``latest`` names a complete
    directory, and at the end the step holds the new weights."""
    out = str(tmp_path)
    _save(out, 3)
    _save(out, 4, seed=100)
    ck._write_pointer(os.path.join(out, ck.CKPT_DIR), "step_000003")  # as if killed before the pointer update
    seen = []

    def checked(rename):
        def wrapper(a, b):
            res = rename(a, b)
            name = _pointer(out)
            seen.append((os.path.basename(a), os.path.basename(b), name))
            assert ck._complete(os.path.join(out, ck.CKPT_DIR, name)), \
                f"latest names {name!r}, not a complete directory, after renaming {a} -> {b}"
            return res
        return wrapper

    monkeypatch.setattr(ck.os, "replace", checked(os.replace))
    monkeypatch.setattr(ck, "_rename_exchange", checked(ck._rename_exchange if exchange else lambda a, b: False))
    _, m = _save(out, 4, seed=200)
    monkeypatch.undo()
    moves = [(a, b) for a, b, _ in seen if b == "step_000004" or a == "step_000004"]
    assert moves, seen  # the new directory's move into place was observed
    assert seen[-1][1] == "latest" and seen[-1][2] == "step_000004", seen
    assert _entries(out) == ["latest", "step_000003", "step_000004"] and _pointer(out) == "step_000004"
    w = load_file(os.path.join(out, ck.CKPT_DIR, "step_000004", "model.safetensors"))
    assert torch.equal(w["weight"], m.weight.detach()) and not torch.equal(w["weight"], _model(100).weight.detach())


def test_rename_exchange_swaps_here(tmp_path):
    """The atomic exchange is available on this machine's file system (Linux renameat2), so
    the kill test below exercises the path a real re-save takes."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    assert ck._rename_exchange(str(a), str(b)) is True
    assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"


def test_latest_falls_back_to_newest_complete(tmp_path, capsys):
    out = str(tmp_path)
    _save(out, 1)
    _save(out, 2)
    root = os.path.join(out, ck.CKPT_DIR)
    assert ck.latest_checkpoint(out) == os.path.join(root, "step_000002")
    assert capsys.readouterr().err == ""
    # dangling pointer
    ck._write_pointer(root, "step_000009")
    assert ck.latest_checkpoint(out) == os.path.join(root, "step_000002")
    err = capsys.readouterr().err
    assert "'step_000009', which is not a complete checkpoint" in err and "step_000002" in err
    # missing pointer, and the newest step directory incomplete: skipped
    os.remove(os.path.join(root, "latest"))
    os.makedirs(os.path.join(root, "step_000003"))
    torch.save({}, os.path.join(root, "step_000003", "train_state.pt"))
    got = ck.latest_checkpoint(out)
    assert got == os.path.join(root, "step_000002"), got
    assert "latest is missing; using the newest complete checkpoint" in capsys.readouterr().err
    # a pointer naming an incomplete directory
    ck._write_pointer(root, "step_000003")
    assert ck.latest_checkpoint(out, warn=False) == os.path.join(root, "step_000002")
    assert capsys.readouterr().err == ""
    # nothing complete at all
    for d in ("step_000001", "step_000002"):
        if os.path.isdir(os.path.join(root, d)):
            os.remove(os.path.join(root, d, "model.safetensors"))
    assert ck.latest_checkpoint(out) is None


TINY_CLI = ["--batch-size", "4", "--train-size", "24", "--queue-size", "16", "--log-every", "1", "--no-eval",
            "--no-progress", "--threads", "1"]


def test_resume_without_checkpoint_stops(tmp_path, capsys):
    """A run directory with metrics but no loadable checkpoint: --resume exits with status 2
    and says why, and leaves the old run's metrics alone; leftovers of saves are removed."""
    n = torch.get_num_threads()
    try:
        out = str(tmp_path / "run")
        os.makedirs(os.path.join(out, ck.CKPT_DIR))
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n")
        _plant_stale(out)
        rc = main(["--steps", "2", "--out", out, "--resume", *TINY_CLI])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "--resume" in err and "holds a run" in err and "no loadable checkpoint" in err
        assert "removed 3 leftover(s)" in err
        assert _entries(out) == []
        assert open(os.path.join(out, "metrics.jsonl")).read() == json.dumps({"step": 1, "loss": 1.0}) + "\n"
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- kill -9 during saves

STEPS = 12
KILLS = 4
KILL_CLI = ["--steps", str(STEPS), "--save-every", "1", *TINY_CLI]


def _launch(out, resume):
    """The training command in a subprocess; its stderr goes to ``<out>.stderr-N`` (read with
    :func:`_stderr`), so that no pipe can fill up and block it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [p for p in (ROOT, os.environ.get("PYTHONPATH")) if p])}
    cmd = [sys.executable, "-m", "softmask.train", *KILL_CLI, "--out", out] + (["--resume"] if resume else [])
    n = len([f for f in os.listdir(os.path.dirname(out)) if f.startswith(os.path.basename(out) + ".stderr-")])
    with open(f"{out}.stderr-{n}", "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    p.stderr_path = err.name
    return p


def _stderr(p):
    with open(p.stderr_path) as f:
        return f.read()[-3000:]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_kill_during_saves_then_resume(tmp_path):
    """SIGKILL a training process (a checkpoint every step) at random moments of its saves,
    KILLS times, resuming each time; the end state equals an uninterrupted run's."""
    rng = random.Random(14)
    ref_out, out = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    procs = []
    try:
        _kill_and_resume(rng, ref_out, out, procs)
    finally:
        for p in procs:  # a failed check leaves no training process behind
            if p.poll() is None:
                p.kill()
                p.wait()


def _kill_and_resume(rng, ref_out, out, procs):
    ref = _launch(ref_out, resume=False)  # runs alongside (one thread each)
    procs.append(ref)
    root = os.path.join(out, ck.CKPT_DIR)
    # KILLS kills, each in the first save of a step >= its target t (t increasing); step 1's save completes first
    # (a kill before any checkpoint exists leaves nothing to resume: test_resume_without_checkpoint_stops)
    targets = sorted(rng.sample(range(2, STEPS), KILLS))
    log = []
    for i, target in enumerate(targets):
        p = _launch(out, resume=i > 0)
        procs.append(p)
        deadline = time.monotonic() + 600  # generous: a busy machine slows the start (about 7 s idle)
        while True:
            if p.poll() is not None:
                raise AssertionError(f"training ended (status {p.returncode}) before a save of step >= {target}: "
                                     f"{_stderr(p)}")
            if time.monotonic() > deadline:
                p.kill()
                raise AssertionError(f"no save of step >= {target} within 600 s")
            try:  # this process saving a step >= target (a starved poller may miss the target's own save)
                if any(n.startswith(".tmp-step_") and n.endswith(f"-{p.pid}") and
                       int(n.split("_")[1].split("-")[0]) >= target for n in os.listdir(root)):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.001)
        # a save of the tiny model takes 0.17-0.25 s here (27 MB of weights plus the optimizer
        # state, fsynced): the kill lands while the files are written, or in the renames,
        # the pointer update and the deletion of the oldest checkpoint that follow
        time.sleep(rng.uniform(0.0, 0.25))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL
        log.append((target, [n for n in os.listdir(root) if n.startswith(STALE)]))
    p = _launch(out, resume=True)
    procs.append(p)
    assert p.wait(timeout=900) == 0, _stderr(p)
    assert ref.wait(timeout=900) == 0, _stderr(ref)
    if log[-1][1]:  # what the last kill left was removed by the final run, and said so
        assert f"removed {len(log[-1][1])} leftover(s)" in _stderr(p), (log, _stderr(p))

    left = [n for n in _entries(out) if n.startswith(STALE)] + [n for n in os.listdir(out) if ".tmp-" in n]
    assert not left, f"leftovers after the final run: {left} (kills: {log})"
    rows, ref_rows = _metrics(out), _metrics(ref_out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    for r, q in zip(rows, ref_rows):
        assert [r[k] for k in ("loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm")] == \
               [q[k] for k in ("loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm")], (r, q)
    assert _pointer(out) == f"step_{STEPS:06d}"
    a = load_file(os.path.join(ref_out, ck.CKPT_DIR, f"step_{STEPS:06d}", "model.safetensors"))
    b = load_file(os.path.join(out, ck.CKPT_DIR, f"step_{STEPS:06d}", "model.safetensors"))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ from the uninterrupted run: {diff[:5]} (kills: {log})"


# --------------------------------------------------------------------------- kill -9 in the metrics rewrite of a resume

_KILL_IN_REWRITE = """
import os, signal, sys
real = os.replace
def replace(src, dst, *a, **kw):  # SIGKILL at the rename that ends a resumed run's metrics rewrite
    if os.path.basename(str(dst)) == "metrics.jsonl":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **kw)
os.replace = replace
from softmask.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_in_the_metrics_rewrite_of_a_resume(tmp_path):
    """A kill while a resumed run rewrites ``metrics.jsonl`` (keeping the rows up to its checkpoint) leaves
    ``metrics.jsonl.tmp-<pid>`` beside the untouched old file; the next resume removes it, says so, and ends
    with the metrics of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [p for p in (ROOT, os.environ.get("PYTHONPATH")) if p])}
    ref_out, out = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    cli = ["--save-every", "2", *TINY_CLI]

    def run(*args, script=None):
        cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "softmask.train", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    assert run("--steps", "4", "--out", ref_out, *cli).returncode == 0
    first = run("--steps", "4", "--out", out, *cli)
    assert first.returncode == 0, first.stderr
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # rows past the checkpoint, as a kill after step 3
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n")
    killed = run("--steps", "4", "--out", out, "--resume", *cli, script=_KILL_IN_REWRITE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [n for n in os.listdir(out) if n.startswith("metrics.jsonl.tmp-")]
    assert len(left) == 1, os.listdir(out)
    again = run("--steps", "4", "--out", out, "--resume", *cli)
    assert again.returncode == 0, again.stderr
    assert "removed 1 leftover(s)" in again.stderr and left[0] in again.stderr, again.stderr
    assert not [n for n in os.listdir(out) if ".tmp-" in n], os.listdir(out)
    keys = ("step", "loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm")
    assert [[r[k] for k in keys] for r in _metrics(out)] == [[r[k] for k in keys] for r in _metrics(ref_out)]


def test_remove_stale_files_of_a_run(tmp_path):
    """The temporary names a kill can leave in a run directory, the evaluation's hidden one included, go; the
    run's own files stay."""
    from softmask.train.loop import remove_stale_files

    for name in ("metrics.jsonl.tmp-11", "config.json.tmp-12", ".eval.json.tmp-13", "config.json", "metrics.jsonl"):
        (tmp_path / name).write_text("{}")
    assert remove_stale_files(str(tmp_path)) == [".eval.json.tmp-13", "config.json.tmp-12", "metrics.jsonl.tmp-11"]
    assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.jsonl"]
