"""Bad input and faults (README "Bad input and faults"): stale results, untrusted files, argument
ranges, interrupted runs. One test per row of that table, most of them parametrised."""
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate_registration
import infer_vqae
import pipeline
import synthesise
import train_diffusion
import train_registration
import train_vqae
import utils
from conftest import ROOT, assert_one_line_error
from models import TokenTransformer, VQAE

GRID = (8, 7, 8)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- data integrity and security
def test_stage_record_covers_the_contents_of_its_inputs(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("1,2,3,4,5,6\n")
    calls = []

    def stage(argv):
        calls.append(argv)
        (tmp_path / "out.txt").write_text("done")

    run = pipeline.Stages(str(tmp_path), [])
    for _ in range(2):
        run("s", [str(tmp_path / "out.txt")], stage, ["x"], inputs=[str(data)])
    assert len(calls) == 1  # unchanged: skipped
    os.utime(data / "a.csv", (1, 1))  # the same data, copied again (new modification time)
    run("s", [str(tmp_path / "out.txt")], stage, ["x"], inputs=[str(data)])
    assert len(calls) == 1
    (data / "a.csv").write_text("1,2,3,4,5,7\n")  # an edited landmark: same size, same time
    os.utime(data / "a.csv", (1, 1))
    run("s", [str(tmp_path / "out.txt")], stage, ["x"], inputs=[str(data)])
    assert len(calls) == 2
    assert f"changed since its last run ({data / 'a.csv'})" in capsys.readouterr().out


def test_each_input_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.csv", "b.csv"):
        (data / name).write_text("1,2,3,4,5,6\n")
    hashed = []
    sha256 = utils.sha256
    monkeypatch.setattr(utils, "sha256", lambda path: hashed.append(path) or sha256(path))
    first = pipeline.contents(str(data))
    assert pipeline.contents(str(data)) == first and len(hashed) == 2  # the second stage's record: no reads
    (data / "a.csv").write_text("1,2,3,4,5,7\n")  # same size; the test above covers a restored time
    assert pipeline.contents(str(data))["a.csv"] != first["a.csv"] and len(hashed) == 3


def test_a_killed_stage_resumes(tmp_path):
    calls = []

    def stage(argv):
        calls.append(argv)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed midway
        (tmp_path / "ck.pth").write_text("done")

    run = pipeline.Stages(str(tmp_path), [])
    with pytest.raises(KeyboardInterrupt):
        run("train", [str(tmp_path / "ck.pth")], stage, ["2"], resume=["--resume"])
    run = pipeline.Stages(str(tmp_path), [])  # a new pipeline run
    run("train", [str(tmp_path / "ck.pth")], stage, ["2"], resume=["--resume"])
    assert calls == [["2"], ["2", "--resume"]]


def test_mix_folder_is_rebuilt(tmp_path, phantoms):
    synth = tmp_path / "synth"
    synth.mkdir()
    for i in range(4):
        for k in (1, 2):
            os.symlink(os.path.join(phantoms, f"case_00{i % 4}_{k}.nii.gz"), synth / f"case_{i:04d}_{k}.nii.gz")
    real = tmp_path / "real"
    real.mkdir()
    for k in (1, 2):  # a real case named like a synthetic one
        os.symlink(os.path.join(phantoms, f"case_000_{k}.nii.gz"), real / f"case_0000_{k}.nii.gz")
    mix = str(tmp_path / "mix")
    assert len(utils.pair_ids(pipeline.mix_folder(str(real), str(synth), mix, utils.LUNG250M4B))) == 5
    for k in (1, 2):  # fewer synthetic pairs now
        os.remove(synth / f"case_0003_{k}.nii.gz")
    assert utils.pair_ids(pipeline.mix_folder(str(real), str(synth), mix, utils.LUNG250M4B)) == [
        "real_case_0000", "synth_case_0000", "synth_case_0001", "synth_case_0002"]


class Payload:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("reader", [lambda p: utils.load_checkpoint(p, "vqae"), utils.read_tokens])
def test_a_crafted_file_never_runs_code(tmp_path, reader):
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    with open(evil, "wb") as f:
        pickle.dump({"kind": "vqae", "tokens": Payload(str(marker))}, f)
    with pytest.raises(utils.DataError):
        reader(str(evil))
    assert not marker.exists()


def test_synthesise_refuses_a_folder_it_did_not_make(tmp_path, phantoms):
    vq_config = {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B, "model": dict(channels=[4, 4, 4], strides=[2, 2, 2], num_codes=16)}
    utils.save_checkpoint(str(tmp_path / "v.pth"), "vqae", vq_config, VQAE.build(vq_config).state_dict())
    cfg = train_diffusion.config_of("demo", {"grid_shape": GRID, "num_codes": 16, "factor": 4, "frame": utils.LUNG250M4B})
    utils.save_checkpoint(str(tmp_path / "d.pth"), "diffusion", cfg,
                          TokenTransformer.build(cfg).state_dict())
    before = sorted(os.listdir(phantoms))
    with pytest.raises(utils.DataError, match="did not write"):
        synthesise.main(["2", "--diffusion", str(tmp_path / "d.pth"), "--vqae", str(tmp_path / "v.pth"),
                         "--out", phantoms, "--steps", "2"])
    assert sorted(os.listdir(phantoms)) == before


def test_side_outputs_are_outputs_too(tmp_path, phantoms):
    ck = str(tmp_path / "vqae.pth")
    utils.save_checkpoint(ck, "vqae", train_vqae.config_of("demo", utils.LUNG250M4B), VQAE.build(train_vqae.config_of("demo", utils.LUNG250M4B)).state_dict())
    (tmp_path / "vqae.csv").write_text("the VQ-AE's training log")
    with pytest.raises(utils.DataError, match="vqae.csv: output exists"):
        infer_vqae.main([ck, "--data", phantoms, "--out", str(tmp_path / "vqae.pt")])
    assert (tmp_path / "vqae.csv").read_text() == "the VQ-AE's training log"


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("script, argv, match", [
    (train_registration, ["2", "{phantoms}", "--preset", "demo", "--iters", "-5", "--out", "{tmp}/r.pth"], "--iters"),
    (train_registration, ["0", "{phantoms}", "--preset", "demo", "--out", "{tmp}/r.pth"], "BATCH_SIZE"),
    (train_registration, ["2", "{phantoms}", "--preset", "demo", "--seed", "-1", "--out", "{tmp}/r.pth"], "--seed"),
    (train_vqae, ["2", "--preset", "demo", "--data", "{phantoms}", "--seed", "-1", "--out", "{tmp}/v.pth"], "--seed"),
    (evaluate_registration, ["-1", "none", "--data", "{phantoms}", "--out", "{tmp}/e"], "ITER_TTA"),
    (pipeline, ["--preset", "demo", "--out", "{tmp}/p", "--seeds", "0"], "--seeds"),
    (pipeline, ["--preset", "demo", "--out", "{tmp}/p", "--num-synth", "0"], "--num-synth"),
    (pipeline, ["--preset", "demo", "--out", "{tmp}/p", "--reg-iters", "-1"], "--reg-iters"),
    (synthesise, ["0", "--diffusion", "{tmp}/none.pth"], "NUM_PAIRS"),
    (synthesise, ["2", "--steps", "0", "--diffusion", "{tmp}/none.pth"], "--steps"),
    (synthesise, ["2", "--temp", "nan", "--diffusion", "{tmp}/none.pth"], "--temp"),
    (synthesise, ["2", "--temp", "inf", "--diffusion", "{tmp}/none.pth"], "--temp"),
    (synthesise, ["2", "--seed", "-1", "--diffusion", "{tmp}/none.pth"], "--seed"),
])
def test_counts_are_checked_before_anything_runs(tmp_path, phantoms, script, argv, match):
    with pytest.raises(utils.DataError, match=match):
        script.main([a.format(phantoms=phantoms, tmp=tmp_path) for a in argv])
    assert sorted(os.listdir(tmp_path)) in ([], ["p"])  # nothing written (the pipeline's empty out folder)
    if os.path.isdir(tmp_path / "p"):
        assert os.listdir(tmp_path / "p") == []


def test_pipeline_checks_every_input_before_the_first_stage(tmp_path, phantoms):
    val = tmp_path / "val"
    val.mkdir()
    for k in (1, 2):
        os.symlink(os.path.join(phantoms, f"case_001_{k}.nii.gz"), val / f"case_001_{k}.nii.gz")
    (val / "landmarks").mkdir()  # ... but no landmark file
    out = tmp_path / "out"
    with pytest.raises(utils.DataError, match="case_001.csv: landmark file missing"):
        pipeline.main(["--preset", "cpu", "--data", phantoms, "--val", str(val), "--out", str(out)])
    assert os.listdir(out) == []  # no stage ran


@pytest.mark.parametrize("out, match", [("{tmp}/dir/", "is a folder"), ("{tmp}/file/ck.pth", "is a file")])
def test_unwritable_outputs_are_refused_up_front(tmp_path, phantoms, out, match):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(utils.DataError, match=match):
        train_registration.main(["2", phantoms, "--preset", "demo", "--out", out.format(tmp=tmp_path)])


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, phantoms, monkeypatch, capsys):
    def full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"the first bytes")
        raise OSError(28, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "ck.pth"
    with pytest.raises(SystemExit) as e:
        utils.run_main(lambda: train_registration.main(["1", phantoms, "--preset", "demo", "--iters", "1",
                                                        "--out", str(out)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and "No space left on device" in err[-1]
    assert os.listdir(tmp_path) == []  # neither the checkpoint nor its temporary file


def test_landmarks_without_a_header_keep_their_first_row(tmp_path):
    rows = np.array([[10.0, 20, 30, 11, 21, 31], [40, 50, 60, 41, 51, 61]])
    np.savetxt(tmp_path / "plain.csv", rows, delimiter=",")
    utils.write_landmarks(str(tmp_path / "header.csv"), rows[:, :3], rows[:, 3:])
    for name in ("plain.csv", "header.csv"):
        fixed, moving = utils.read_landmarks(str(tmp_path / name), utils.LUNG250M4B)
        assert np.array_equal(fixed, rows[:, :3]) and np.array_equal(moving, rows[:, 3:])


def test_evaluation_checks_every_volume_first(tmp_path, phantoms):
    data = tmp_path / "data"
    data.mkdir()
    for c in ("case_000", "case_001"):
        for k in (1, 2):
            os.symlink(os.path.join(phantoms, f"{c}_{k}.nii.gz"), data / f"{c}_{k}.nii.gz")
    os.symlink(os.path.join(phantoms, "landmarks"), data / "landmarks")
    os.remove(data / "case_001_2.nii.gz")
    raw = open(os.path.join(phantoms, "case_001_2.nii.gz"), "rb").read()
    (data / "case_001_2.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated, in the second pair
    printed = []
    with pytest.raises(utils.DataError, match="case_001_2.nii.gz"):
        evaluate_registration.evaluate(1, "none", str(data), out=str(tmp_path / "ev"), log=printed.append)
    assert printed == []  # failed before the first (slow) pair


# ---------------------------------------------------------------------------- resume and seeds
def killed_after(monkeypatch, iteration):
    """Make the training stop like a kill -9 right after the checkpoint of `iteration` is written."""
    save = utils.save_checkpoint

    def save_then_die(path, kind, config, state, **extra):
        save(path, kind, config, state, **extra)
        if extra.get("iteration") == iteration:
            raise KeyboardInterrupt

    monkeypatch.setattr(utils, "save_checkpoint", save_then_die)


def assert_same_weights(a, b):
    sa, sb = torch.load(a, weights_only=True)["state"], torch.load(b, weights_only=True)["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tokens_file(tmp_path):
    path = str(tmp_path / "tokens.pth")
    ids = torch.randint(0, 16, (6, *GRID), generator=torch.Generator().manual_seed(0))
    utils.write_tokens(path, ids, [f"case_{i:03d}" for i in range(6)], 16, {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B})
    return path


STAGES = {  # stage: (module, preset entries that make checkpoints frequent, train() kwargs but out)
    "vqae": (train_vqae, dict(ckpt_every=3, val_every=3, restart=2), lambda p, t: dict(data=p, iters=6)),
    "diffusion": (train_diffusion, dict(every=2), lambda p, t: dict(data=tokens_file(t), iters=4)),
    "registration": (train_registration, dict(ckpt_every=2), lambda p, t: dict(data=p, iters=4)),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_same_seed_same_weights_and_a_killed_run_resumes_exactly(stage, phantoms, tmp_path, monkeypatch):
    module, entries, kwargs = STAGES[stage]
    monkeypatch.setitem(module.PRESETS, "demo", dict(module.PRESETS["demo"], **entries))
    kw = dict(kwargs(phantoms, tmp_path), preset="demo", batch_size=1, seed=3)
    module.train(out=str(tmp_path / "a.pth"), **kw)
    module.train(out=str(tmp_path / "b.pth"), **kw)
    assert_same_weights(tmp_path / "a.pth", tmp_path / "b.pth")  # same seed, same weights
    with monkeypatch.context() as m:
        killed_after(m, 3 if stage == "vqae" else 2)
        with pytest.raises(KeyboardInterrupt):
            module.train(out=str(tmp_path / "c.pth"), **kw)
    module.train(out=str(tmp_path / "c.pth"), resume=True, **dict(kw, seed=None, batch_size=None))
    assert_same_weights(tmp_path / "a.pth", tmp_path / "c.pth")  # killed + resumed = uninterrupted


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """A real SIGKILL of the script between checkpoints (not a simulated stop)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train_diffusion.py", "2", tokens_file(tmp_path), "--preset", "demo", "--seed", "3",
           "--iters", "100"]
    subprocess.run(cmd + ["--out", str(tmp_path / "a.pth")], cwd=ROOT, env=env, check=True, capture_output=True)
    killed = str(tmp_path / "k.pth")
    proc = subprocess.Popen(cmd + ["--out", killed], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # right after the first checkpoint (iteration 50 of 100)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert utils.load_checkpoint(killed, "diffusion")["iteration"] < 100
    subprocess.run(cmd + ["--out", killed, "--resume"], cwd=ROOT, env=env, check=True, capture_output=True)
    assert_same_weights(tmp_path / "a.pth", killed)


def test_resume_refuses_other_settings(phantoms, tmp_path, monkeypatch):
    monkeypatch.setitem(train_registration.PRESETS, "demo", dict(train_registration.PRESETS["demo"], ckpt_every=1))
    out = str(tmp_path / "r.pth")
    train_registration.train(data=phantoms, out=out, preset="demo", batch_size=1, iters=1)
    with pytest.raises(utils.DataError, match="batch 1 -> 2"):
        train_registration.train(data=phantoms, out=out, preset="demo", batch_size=2, iters=2, resume=True)
    train_registration.train(data=phantoms, out=out, preset="demo", batch_size=None, iters=2, resume=True)
    assert utils.load_checkpoint(out, "regnet")["iteration"] == 2  # a larger --iters trains on


def test_resume_refuses_other_data_and_a_replanned_schedule(phantoms, tmp_path):
    """utils.start_training for every trainer: the VQ-AE's schedule is planned for its first --iters,
    and no trainer resumes on other data."""
    import shutil

    other = str(tmp_path / "other")
    shutil.copytree(phantoms, other)
    out = str(tmp_path / "v.pth")
    train_vqae.train(data=phantoms, out=out, preset="demo", batch_size=1, iters=2)
    with pytest.raises(utils.DataError, match="iters 2 -> 3"):
        train_vqae.train(data=phantoms, out=out, preset="demo", batch_size=1, iters=3, resume=True)
    with pytest.raises(utils.DataError, match="data"):
        train_vqae.train(data=other, out=out, preset="demo", batch_size=1, iters=2, resume=True)
    tokens, diff = tokens_file(tmp_path), str(tmp_path / "d.pth")
    train_diffusion.main(["2", tokens, "--preset", "demo", "--iters", "1", "--out", diff])
    copy = str(tmp_path / "copy.pth")
    shutil.copy(tokens, copy)
    with pytest.raises(utils.DataError, match="tokens"):
        train_diffusion.main(["2", copy, "--preset", "demo", "--iters", "2", "--out", diff, "--resume"])


def test_one_line_errors_as_a_user_sees_them(run, tmp_path):
    empty = tmp_path / "empty.pth"
    utils.write_tokens(str(empty), torch.zeros(0, *GRID, dtype=torch.long), [], 16, {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B})
    assert_one_line_error(run("train_diffusion.py", "2", empty, "--preset", "demo", "--out", tmp_path / "d.pth"),
                          "empty.pth", "no token grids")


def test_stale_temporary_files_are_cleaned(tmp_path):
    stale = tmp_path / ".tmp-999999999-ck.pth"  # left by a killed process
    stale.write_bytes(b"half a checkpoint")
    utils.save_checkpoint(str(tmp_path / "ck.pth"), "regnet", {}, {})
    assert sorted(os.listdir(tmp_path)) == ["ck.pth"]


def test_warnings_for_oversize_and_unusual_scans(tmp_path):
    a = np.zeros((300, 208, 256), np.uint8)
    a[2:30, 100:110, 100:110] = 1  # outside the frame's 256 rows: cropped
    a[150:160, 100:110, 100:110] = 1
    nib.save(nib.Nifti1Image(a, np.diag([-1.0, -1, 1, 1])), str(tmp_path / "big.nii.gz"))  # LPS, 1 mm
    with pytest.warns(UserWarning, match=r"big.nii.gz: 300x208x256 exceeds the 256x208x256 frame"):
        utils.framed_volume(str(tmp_path / "big.nii.gz"), 4, utils.LUNG250M4B)
    nib.save(nib.Nifti1Image(a, np.diag([2.0, 2, 2, 1])), str(tmp_path / "coarse.nii.gz"))
    with pytest.raises(utils.DataError, match="voxels 2.00x2.00x2.00 mm, but the lung250m4b frame has 1.00x1.00x1.00 mm; "
                       "use --frame derived"):
        utils.framed_volume(str(tmp_path / "coarse.nii.gz"), 4, utils.LUNG250M4B)
    swapped = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # voxel axes i, j swapped
    nib.save(nib.Nifti1Image(a, swapped), str(tmp_path / "swapped.nii.gz"))
    with pytest.warns(UserWarning, match="orientation ARS"):
        utils.framed_volume(str(tmp_path / "swapped.nii.gz"), 4, utils.LUNG250M4B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the data set's own conventions (LPS and RAS, 1 mm) pass silently
        for affine in (np.diag([-1.0, -1, 1, 1]), np.eye(4)):
            nib.save(nib.Nifti1Image(a[:250, :200], affine), str(tmp_path / "ok.nii.gz"))
            utils.framed_volume(str(tmp_path / "ok.nii.gz"), 4, utils.LUNG250M4B)


def test_pairs_of_different_shapes_are_refused(tmp_path):
    a = np.zeros((250, 200, 250), np.uint8)
    a[100:110, 100:110, 100:110] = 1
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "case_000_1.nii.gz"))
    nib.save(nib.Nifti1Image(a[:, :, :240], np.eye(4)), str(tmp_path / "case_000_2.nii.gz"))
    with pytest.raises(utils.DataError, match=r"case_000_2.nii.gz: grid 250x200x240 at 1.00x1.00x1.00 mm differs from its fixed"):
        utils.find_pairs(str(tmp_path))
