"""Training on one's own caption JSON (issue 10): the shapes export, a run trained on the exported
JSON (with a corrupt and a missing image) and evaluated on the exported test JSON, held-out
evaluation without a test set, config files and their precedence, every bad input ending in one
line with exit status 2, and checkpoints that are refused instead of run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.data import CaptionJsonDataset, ShapesDataset
from softmask.data.export import export_shapes
from softmask.data.export import main as export_main
from softmask.eval.__main__ import main as eval_main
from softmask.train.__main__ import config_from_argv, main
from softmask.runs.checkpoint import CheckpointError, latest_checkpoint, load_train_state, rng_state, set_rng_state
from softmask.train.data import prepare_data
from softmask.train.loop import TrainConfig, train
from tests.helpers import one_thread  # noqa: F401 (fixture)

# the corrupt and missing images of these data sets are reported with a RuntimeWarning each time they are read
pytestmark = [pytest.mark.filterwarnings("ignore:skipping image:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "4", "--queue-size", "16", "--no-progress", "--threads", "1", "--pointing-every", "0",
        "--log-every", "1", "--save-every", "5"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes_json")
    assert export_main(["--out", str(d), "--size", "12", "--test-size", "6"]) == 0
    return d


def _one_line_error(capsys, rc):
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2, (rc, out.err)
    assert "Traceback" not in out.err and len(err.splitlines()) == 1, out.err
    return err


# --------------------------------------------------------------------------- export


def test_export_writes_the_shapes_data_as_caption_json(exported):
    train = json.load(open(exported / "train.json"))
    test = json.load(open(exported / "test.json"))
    assert len(train) == 12 and len(test) == 6
    for split, entries in (("train", train), ("test", test)):
        ref = ShapesDataset(split, size=len(entries), image_size=64, seed=0)
        for i, e in enumerate(entries):
            assert set(e) == {"image", "caption", "objects"} and e["image"] == f"images/{split}/{i:06d}.jpg"
            assert e["caption"] == ref[i]["caption"] and e["objects"] == ref[i]["objects"]
            with Image.open(exported / e["image"]) as im:
                assert im.format == "JPEG" and im.size == (64, 64)
                got = np.asarray(im.convert("RGB"), dtype=np.float64)
            want = np.asarray(ref[i]["image"], dtype=np.float64)
            other = np.asarray(ref[(i + 1) % len(entries)]["image"], dtype=np.float64)
            err = np.abs(got - want).mean()  # the same picture, JPEG-compressed (its noise costs most of the error)
            assert err < 5.0 and np.abs(got - other).mean() > 2 * err, (split, i, err)
    ds = CaptionJsonDataset(str(exported / "test.json"))
    assert len(ds) == 6 and ds[5]["caption"] == test[5]["caption"]


def test_export_errors(tmp_path, capsys):
    err = _one_line_error(capsys, export_main(["--out", str(tmp_path), "--size", "0"]))
    assert "--size 0" in err and "expected an integer >= 1" in err
    err = _one_line_error(capsys, export_main(["--out", str(tmp_path), "--quality", "100"]))
    assert "--quality 100" in err and "[1, 95]" in err
    assert not os.path.exists(tmp_path / "train.json")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def own_json(exported, tmp_path_factory):
    """The exported training JSON with one image replaced by a corrupt file and one entry naming a
    missing file; relative paths resolve under --image-root (the export folder)."""
    d = tmp_path_factory.mktemp("own")
    entries = json.load(open(exported / "train.json"))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    entries[3] = {"image": str(d / "corrupt.jpg"), "caption": entries[3]["caption"]}
    entries.append({"image": "images/train/missing.jpg", "caption": "a red circle"})
    (d / "train.json").write_text(json.dumps(entries))
    return d / "train.json"


@pytest.fixture(scope="module")
def run(exported, own_json, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    argv = ["--data", str(own_json), "--image-root", str(exported), "--test-data", str(exported / "test.json"),
            "--steps", "5", "--out", out, *TINY]
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(argv)
    return {"out": out, "rc": rc, "err": err.getvalue()}


def test_end_to_end_from_exported_json(run, exported, own_json):
    out = run["out"]
    assert run["rc"] == 0, run["err"]
    assert "missing.jpg" in run["err"] and "1 of 13 images are missing or unreadable" in run["err"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(np.isfinite([r[k] for k in ("loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm")]).all()
               for r in rows)
    # 12 pairs of batch 4: steps 1-3 are one epoch, in which the corrupt image was read exactly once
    assert rows[2]["num_dropped"] == 1, [r["num_dropped"] for r in rows]
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["eval_split"] == "test" and ev["eval_on_training_data"] is False
    assert ev["eval_data"] == str(exported / "test.json") and ev["num_images"] == 6
    assert ev["chance_r1"] == pytest.approx(100 / 6)
    for k in ("tr_r1", "tr_r5", "ir_r1", "ir_r5"):
        assert 0.0 <= ev[k] <= 100.0
    assert ev["tr_r5"] >= ev["tr_r1"] and ev["ir_r10"] == 100.0  # 6 images: every one is in the top 10
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["train"]["test_data"] == str(exported / "test.json") and cfg["total_steps"] == 5
    assert not os.path.exists(os.path.join(out, "heldout.json"))


def test_softmask_eval_on_any_caption_json(run, exported, own_json, tmp_path, capsys):
    out = run["out"]
    dst = str(tmp_path / "ev")
    assert eval_main(["--checkpoint", out, "--data", str(exported / "train.json"), "--out", dst, "--no-plots"]) == 0
    ev = json.load(open(os.path.join(dst, "eval.json")))
    assert ev["num_images"] == 12 and ev["eval_data"] == str(exported / "train.json")
    assert ev["eval_split"] == "given" and ev["eval_on_training_data"] is False
    # by default: the run's own test set
    assert eval_main(["--checkpoint", out, "--out", dst, "--no-plots", "--k", "4"]) == 0
    ev = json.load(open(os.path.join(dst, "eval.json")))
    assert ev["num_images"] == 6 and ev["eval_split"] == "test" and ev["rerank_k"] == 4
    capsys.readouterr()
    # the run's own training data: labelled as such, in eval.json and on stderr
    rc = eval_main(["--checkpoint", out, "--data", str(own_json), "--image-root", str(exported), "--out", dst,
                    "--no-plots"])
    assert rc == 0
    assert "training data" in capsys.readouterr().err
    ev = json.load(open(os.path.join(dst, "eval.json")))
    assert ev["eval_on_training_data"] is True and ev["eval_split"] == "train"
    assert ev["num_images"] == 11  # 13 entries: the missing and the corrupt image are left out
    err = _one_line_error(capsys, eval_main(["--checkpoint", out, "--data", str(tmp_path / "none.json")]))
    assert "--data" in err and "none.json" in err and "expected a caption JSON" in err


def test_training_data_evaluation_is_labelled(exported, tmp_path, capsys):
    """No test set and nothing held out: the log and eval.json say the numbers are on the training data.
    One epoch of 12 pairs in batches of 4 is 3 steps."""
    out = str(tmp_path / "r")
    rc = main(["--data", str(exported / "train.json"), "--holdout", "0", "--epochs", "1", "--out", out, *TINY])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "--holdout 0" in cap.err and "evaluated on the training data" in cap.err
    assert "on the training data" in cap.out
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["eval_on_training_data"] is True and ev["eval_split"] == "train" and ev["num_images"] == 12
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.load(open(os.path.join(out, "config.json")))["total_steps"] == 3


def test_holdout_split(tmp_path):
    """A JSON training set without a test set gives a tenth of its images (at most ``holdout``) to
    evaluation: the same images whatever the seed or the order of the entries, never trained on."""
    export_shapes(str(tmp_path), size=30, test_size=1)
    entries = json.load(open(tmp_path / "train.json"))
    for e in entries[:5]:  # some images with two captions
        e["caption"] = [e["caption"], "another caption"]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    (tmp_path / "shuffled.json").write_text(json.dumps(entries[::-1]))
    out = tmp_path / "out"
    out.mkdir()
    p = prepare_data(TrainConfig(data=str(tmp_path / "train.json"), out=str(out)), 64, str(out))
    held = json.load(open(out / "heldout.json"))
    assert p.eval_split == "heldout" and p.eval_data == str(out / "heldout.json") and len(held) == 3
    held_paths = {e["image"] for e in held}
    assert all(os.path.isabs(x) and os.path.isfile(x) for x in held_paths)
    assert not held_paths & set(p.train.image_paths) and len(p.train.image_paths) == 27
    assert held_paths | set(p.train.image_paths) == {str(tmp_path / e["image"]) for e in entries}
    assert len(p.train) + sum(len(e["caption"]) for e in held) == 35  # every caption on one side
    out2 = tmp_path / "out2"
    out2.mkdir()
    p2 = prepare_data(TrainConfig(data=str(tmp_path / "shuffled.json"), out=str(out2), seed=5), 64, str(out2))
    assert {e["image"] for e in json.load(open(out2 / "heldout.json"))} == held_paths
    assert p2.eval_split == "heldout"
    p3 = prepare_data(TrainConfig(data=str(tmp_path / "train.json"), out=str(out), holdout=1), 64, str(out))
    assert p3.eval_split == "train" and "training data" in p3.notes[-1]  # 1 image is no retrieval test set
    p4 = prepare_data(TrainConfig(data=str(tmp_path / "train.json"), out=str(out), holdout=0), 64, str(out))
    assert p4.eval_split == "train" and len(p4.train.image_paths) == 30 and "--holdout 0" in p4.notes[-1]


# --------------------------------------------------------------------------- config files


def test_config_file_precedence(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"_comment": "notes are allowed", "lr": 1e-3, "steps": 7, "batch_size": 6,
                             "gamma": 1.0, "weight_decay": 0.05, "no_such": None}))
    with pytest.raises(ValueError, match="no_such"):
        config_from_argv(["--config", str(f)])
    f.write_text(json.dumps({"_comment": "notes are allowed", "lr": 1e-3, "steps": 7, "batch_size": 6,
                             "gamma": 1.0, "weight_decay": 0.05}))
    cfg, sources = config_from_argv(["--config", str(f), "--lr", "2e-3", "--no-eval"])
    want = TrainConfig(lr=2e-3, steps=7, batch_size=6, gamma=1.0, weight_decay=0.05, run_eval=False)
    assert cfg == want
    assert sources["lr"] == ("flag", "--lr") and sources["steps"] == ("file", str(f))
    assert sources["run_eval"] == ("flag", "--no-eval")
    # a flag given with its default value still overrides the file
    assert config_from_argv(["--config", str(f), "--steps", "800"])[0].steps == 800
    # a --steps flag cancels the file's epochs; --epochs with --steps is an error
    f.write_text(json.dumps({"epochs": 3}))
    assert config_from_argv(["--config", str(f)])[0].epochs == 3
    cfg = config_from_argv(["--config", str(f), "--steps", "9"])[0]
    assert cfg.epochs is None and cfg.steps == 9
    with pytest.raises(ValueError, match="--epochs or --steps"):
        config_from_argv(["--steps", "9", "--epochs", "2"])


def test_yaml_config(tmp_path, monkeypatch, capsys):
    yaml = pytest.importorskip("yaml")
    f = tmp_path / "c.yaml"
    f.write_text("# ALBEF-style file\nlr: 1e-4\nsteps: 7\nno_softmask_typo: true\n")
    err = _one_line_error(capsys, main(["--config", str(f)]))
    assert "--config" in err and "'no_softmask_typo'" in err
    f.write_text("lr: 1e-4  # PyYAML reads this as a string\nsteps: 7\nsoftmask: false\n")
    assert yaml.safe_load(f.read_text())["lr"] == "1e-4"
    cfg = config_from_argv(["--config", str(f)])[0]
    assert cfg == TrainConfig(lr=1e-4, steps=7, softmask=False)
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    err = _one_line_error(capsys, main(["--config", str(f)]))
    assert "--config" in err and "c.yaml" in err and "PyYAML" in err and "JSON" in err


def test_shipped_configs():
    assert config_from_argv(["--config", os.path.join(ROOT, "configs", "tiny.json")])[0] == TrainConfig()
    cfg = config_from_argv(["--config", os.path.join(ROOT, "configs", "base_albef.json")])[0]
    albef = dict(preset="base", lr=1e-4, weight_decay=0.02, batch_size=64, epochs=30, queue_size=65536,
                 momentum=0.995, alpha=0.4, min_lr_ratio=0.1, warmup_steps=2000)
    assert {k: getattr(cfg, k) for k in albef} == albef

    class Tok:  # model_config needs only the vocabulary size and the padding id
        pad_token_id = 0

        def __len__(self):
            return 30522

    m = cfg.model_config(Tok())
    assert (m.image_size, m.queue_size, m.momentum, m.alpha, m.vision_width, m.embed_dim) == (256, 65536, 0.995, 0.4,
                                                                                              768, 256)


def test_run_config_replays_the_run(run, tmp_path):
    saved = json.load(open(os.path.join(run["out"], "config.json")))
    cfg = config_from_argv(["--config", os.path.join(run["out"], "config.json")])[0]
    assert cfg.to_dict() == saved["train"]
    cfg = config_from_argv(["--config", os.path.join(run["out"], "config.json"), "--out", str(tmp_path)])[0]
    assert cfg.out == str(tmp_path) and cfg.test_data == saved["train"]["test_data"]


# --------------------------------------------------------------------------- bad input: one line, exit status 2


def _json(tmp_path, name, entries):
    p = tmp_path / name
    p.write_text(json.dumps(entries))
    return str(p)


def test_bad_settings(tmp_path, capsys):
    cases = [
        (["--batch-size", "1"], ["--batch-size 1", "expected an integer >= 2"]),
        (["--device", "gpu"], ["--device gpu", "expected cpu"]),
        (["--steps", "0"], ["--steps 0", "expected a positive integer"]),
        (["--gamma", "-1"], ["--gamma -1.0", "expected >= 0"]),
        (["--vision-frozen-blocks", "5"], ["--vision-frozen-blocks 5", "expected an int in [0, vision_depth = 4]"]),
        (["--data", "pairs.csv"], ["--data pairs.csv", "expected 'shapes', 'shapes-partial', 'shapes-longtail' or a "
                                                     "caption JSON"]),
    ]
    for argv, parts in cases:
        err = _one_line_error(capsys, main(argv + ["--out", str(tmp_path / "r"), "--no-progress"]))
        for part in parts:
            assert part in err, (argv, err)
    with pytest.raises(SystemExit) as e:  # argparse's own errors: also one line, status 2
        main(["--batch-size", "x"])
    err = _one_line_error(capsys, e.value.code)
    assert "--batch-size" in err and "'x'" in err and "invalid int" in err
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"batch_size": 1}))
    err = _one_line_error(capsys, main(["--config", str(f)]))
    assert f"{f}: batch_size = 1: expected an integer >= 2" in err


def test_unavailable_device(tmp_path, capsys):
    spec = "cuda:99" if torch.cuda.is_available() else "cuda"
    err = _one_line_error(capsys, main(["--device", spec, "--out", str(tmp_path / "r"), "--no-progress"]))
    assert f"--device {spec}" in err and "expected cpu or an available device" in err
    assert ("CUDA is not available" in err) != torch.cuda.is_available()
    assert not os.path.exists(tmp_path / "r" / "config.json")
    err = _one_line_error(capsys, eval_main(["--checkpoint", str(tmp_path), "--device", spec]))
    assert f"--device {spec}" in err


def test_bad_data(exported, tmp_path, capsys):
    img = str(exported / "images" / "train" / "000000.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    good = _json(tmp_path, "good.json", [{"image": img, "caption": "x"}] * 4)
    cases = [
        (["--data", _json(tmp_path, "noimg.json", [{"image": img, "caption": "x"}, {"caption": "y"}])],
         ["--data", "noimg.json", "entry 1 has no 'image'", "expected a non-empty string path"]),
        (["--data", _json(tmp_path, "nocap.json", [{"image": img}])],
         ["--data", "nocap.json", "entry 0 has no 'caption'", "expected a string or a non-empty list"]),
        (["--data", _json(tmp_path, "gone.json", [{"image": "a.jpg", "caption": "x"},
                                                  {"image": "b.jpg", "caption": "y"}])],
         ["--data", "gone.json", "no images left: all 2 images are missing", "expected image files"]),
        (["--data", _json(tmp_path, "empty.json", [])], ["--data", "empty.json", "empty", "expected at least one"]),
        (["--data", good, "--test-data", _json(tmp_path, "t0.json", [])],
         ["--test-data", "t0.json", "empty", "expected at least one"]),
        (["--data", good, "--test-data", _json(tmp_path, "t1.json", [{"image": "nope.jpg", "caption": "x"}])],
         ["--test-data", "t1.json", "no images left", "missing or unreadable"]),
        (["--data", good, "--test-data", _json(tmp_path, "t2.json", [{"image": "junk.jpg", "caption": "x"}])],
         ["--test-data", "t2.json", "no images left", "missing or unreadable"]),
        (["--data", good, "--test-data", str(tmp_path / "absent.json")],
         ["--test-data", "absent.json", "no such file", "expected a caption JSON"]),
        (["--data", good, "--image-root", str(tmp_path / "nodir")], ["--image-root", "nodir", "no such directory"]),
        (["--data", good, "--batch-size", "8"], ["--batch-size 8", "expected at most 4", "4 pairs"]),
    ]
    for argv, parts in cases:
        err = _one_line_error(capsys, main(argv + ["--out", str(tmp_path / "r"), "--no-progress"]))
        for part in parts:
            assert part in err, (argv, err)


def test_unreadable_training_images(exported, tmp_path, capsys):
    """Files that exist but do not decode are noticed while training: a whole epoch without a usable
    batch stops the run with one line."""
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not an image")
    data = _json(tmp_path, "junk.json", [{"image": "junk.jpg", "caption": f"c {i}"} for i in range(4)])
    # in the main process (--num-workers 0) so that pytest.warns sees the warning; a worker prints its own
    with pytest.warns(RuntimeWarning, match="junk.jpg"):
        rc = main(["--data", data, "--test-data", str(exported / "test.json"), "--out", str(tmp_path / "r"), *TINY,
                   "--num-workers", "0"])
    err = _one_line_error(capsys, rc)
    assert "--data" in err and "junk.json" in err and "no batch of a whole epoch" in err and "expected image" in err


def test_unreadable_training_images_with_workers(exported, tmp_path):
    """With a data loader worker the warning naming the file comes from the worker, on the CLI's stderr as well
    (a subprocess: pytest records the warnings of its own process, and a forked worker's records are lost)."""
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not an image")
    data = _json(tmp_path, "junk.json", [{"image": "junk.jpg", "caption": f"c {i}"} for i in range(4)])
    r = subprocess.run([sys.executable, "-m", "softmask.train", "--data", data, "--test-data", str(exported / "test.json"),
                        "--out", str(tmp_path / "r"), *TINY, "--num-workers", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "skipping image" in r.stderr and "junk.jpg" in r.stderr, r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("softmask-pretrain: error: --data"), r.stderr


def _copy_run(run, dst):
    shutil.copytree(run["out"], dst)
    return str(dst)


def test_resume_with_other_settings_names_them(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path / "r")
    err = _one_line_error(capsys, main(["--out", out, "--resume", "--lr", "0.001", "--warmup-steps", "3",
                                        "--no-eval", "--no-progress"]))
    assert "--resume" in err and "lr: 0.0005 in the checkpoint, 0.001 now" in err
    assert "warmup_steps: 60 in the checkpoint, 3 now" in err
    assert "steps:" not in err.replace("warmup_steps:", "")  # fields not given come from the checkpoint
    # the same through the API: every field counts, those of the shapes recipe that the shapes data brings too
    with pytest.raises(ValueError, match=r'resume: .*\(data: "\S+/train.json" in the checkpoint, "shapes" now; '
                                         r'image_root: "\S+" in the checkpoint, null now; vision_lr_scale: 1.0 in the '
                                         r'checkpoint, 0.1 now; mask_floor: null in the checkpoint, 0.75 now; vision_attn_radius: null in the '
                                         r'checkpoint, 1 now; vision_frozen_blocks: null in the checkpoint, 3 now; '
                                         r'text_attn_radius: null in the checkpoint, 1 now; '
                                         r'itm_text_aug: null in the checkpoint, false now\)'):
        train(TrainConfig(out=out, resume=True, steps=5, batch_size=4, queue_size=16, run_eval=False, progress=False))
    # the run's own settings (nothing given but --resume): continues, here with nothing left to do
    assert main(["--out", out, "--resume", "--no-eval", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().err


class _Payload:
    """Unpickling this object opens (creates) the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_runs_code_is_refused(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path / "r")
    ckpt = latest_checkpoint(out)
    path = os.path.join(ckpt, "train_state.pt")
    marker = str(tmp_path / "marker")
    state = torch.load(path, weights_only=True)
    state["rng"]["python"] = _Payload(marker)
    torch.save(state, path)
    err = _one_line_error(capsys, main(["--out", out, "--resume", "--no-eval", "--no-progress"]))
    assert "--resume" in err and "train_state.pt" in err and "refused" in err
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_train_state(ckpt)
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert os.path.exists(marker)


def test_truncated_checkpoint_files(run, tmp_path, capsys):
    out = _copy_run(run, tmp_path / "r")
    ckpt = latest_checkpoint(out)
    for name in ("train_state.pt", "model.safetensors"):
        path = os.path.join(ckpt, name)
        whole = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(whole[: len(whole) // 2])
        err = _one_line_error(capsys, main(["--out", out, "--resume", "--no-eval", "--no-progress"]))
        assert "--resume" in err and name in err and "truncated or corrupt" in err, err
        with open(path, "wb") as f:
            f.write(whole)
    with open(os.path.join(ckpt, "model.safetensors"), "wb") as f:
        f.write(b"")
    err = _one_line_error(capsys, eval_main(["--checkpoint", out, "--no-plots"]))
    assert "model.safetensors" in err and "truncated or corrupt" in err


def test_rng_state_round_trip_and_older_layout(tmp_path):
    """The RNG state holds only tensors and plain containers; checkpoints that stored NumPy's own
    state tuple still load (NumPy's array globals are the only ones allowed besides torch's)."""
    state = rng_state()
    ref = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.manual_seed(123)
    np.random.seed(123)
    for layout in ("current", "older"):
        st = dict(state)
        if layout == "older":
            name, keys, pos, g, c = st["numpy"]
            st["numpy"] = (name, keys.numpy().astype(np.uint32), pos, g, c)
        torch.save({"step": 1, "cursor": 1, "optimizer": {}, "scheduler": {}, "rng": st},
                   tmp_path / "train_state.pt")
        loaded = load_train_state(str(tmp_path))
        set_rng_state(loaded["rng"])
        got = (torch.rand(3), np.random.rand(3), __import__("random").random())
        assert torch.equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]) and got[2] == ref[2], layout
    torch.save({"step": 1}, tmp_path / "train_state.pt")
    with pytest.raises(CheckpointError, match="missing entries"):
        load_train_state(str(tmp_path))
