"""RegistrationNet, train_registration.py and evaluate_registration.py."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate_registration
import train_registration
import utils
from conftest import assert_one_line_error
from models import RegistrationNet


# the cpu preset upsamples its fields from the 16 mm integration grid: the one inexact step
@pytest.mark.parametrize("exp_at,coarsen,bound", [("input", 1, 0.05), ("velocity", 1, 0.05), ("velocity", 2, 0.1)])
def test_inverse_consistency_by_construction(exp_at, coarsen, bound):
    torch.manual_seed(0)
    # a large velocity bound so the random net produces deformations of several voxels
    net = RegistrationNet(pool_strides=(2, 1, 1), exp_at=exp_at, max_velocity=10.0, exp_coarsen=coarsen)
    f, m = torch.rand(1, 1, 32, 24, 32), torch.rand(1, 1, 32, 24, 32)
    with torch.no_grad():
        ddf, inv = net(f, m)
        swapped = net(m, f)
        err = utils.compose(ddf, inv).norm(dim=1)[..., 4:-4, 4:-4, 4:-4]  # away from the border clamp
    mag = ddf.norm(dim=1).max()
    assert mag > 1.0, "deformation too small for a meaningful check"
    assert err.max() < bound * mag, (float(err.max()), float(mag))
    assert torch.allclose(swapped[0], inv, atol=1e-5) and torch.allclose(swapped[1], ddf, atol=1e-5)


def test_cheap_integration_matches_reference_integration():
    torch.manual_seed(1)
    fast = RegistrationNet(pool_strides=(2, 1, 1), exp_at="velocity", max_velocity=10.0)
    ref = RegistrationNet(pool_strides=(2, 1, 1), exp_at="input", max_velocity=10.0)
    ref.load_state_dict(fast.state_dict())
    f, m = torch.rand(1, 1, 32, 24, 32), torch.rand(1, 1, 32, 24, 32)
    with torch.no_grad():
        a, b = fast(f, m)[0], ref(f, m)[0]
    diff = (a - b).norm(dim=1)[..., 3:-3, 3:-3, 3:-3]
    assert diff.mean() < 0.05 * b.norm(dim=1).mean(), (float(diff.mean()), float(b.norm(dim=1).mean()))


@pytest.mark.parametrize("coarsen,bound", [(1, 0.02), (2, 0.08)])
def test_coarse_integration_of_a_smooth_velocity(coarsen, bound):
    """exp on the 8 mm velocity grid (coarsen 1) or on 16 mm (2, the cpu preset) vs the reference's
    integration at the input grid, for a smooth velocity moving voxels by up to 5 (20 mm at 4 mm)."""
    size = (64, 48, 64)
    g = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in (32, 24, 32)], indexing="ij"))
    v = 0.1 * torch.stack([torch.sin(2 * np.pi * g[1] + 1), torch.cos(2 * np.pi * g[2]), torch.sin(2 * np.pi * g[0] + 2)])
    fast, ref = RegistrationNet(exp_at="velocity", exp_coarsen=coarsen), RegistrationNet(exp_at="input")
    a, b = utils.resize_ddf(fast.exp(v[None], size), size), ref.exp(v[None], size)
    assert b.norm(dim=1).max() > 4
    assert (a - b).norm(dim=1).mean() < bound * b.norm(dim=1).mean()


def test_short_training_on_phantoms_lowers_tre(phantoms, tmp_path):
    ckpt = str(tmp_path / "reg.pth")
    train_registration.train(data=phantoms, out=ckpt, preset="demo", batch_size=2, iters=60)
    s = evaluate_registration.evaluate(0, ckpt, phantoms, out=str(tmp_path / "ev"))
    assert s["tre_net_mean"] < 0.7 * s["tre_initial_mean"], s
    assert s["dice_net"] > s["dice_initial"], s
    assert s["folding_pct"] < 1.0
    ck = utils.load_checkpoint(ckpt, "regnet", train_registration.config_of("demo", utils.LUNG250M4B))
    assert ck["iteration"] == 60
    # --resume continues from the stored iteration instead of starting again
    train_registration.train(data=phantoms, out=ckpt, preset="demo", batch_size=2, iters=62, resume=True)
    assert utils.load_checkpoint(ckpt, "regnet")["iteration"] == 62


def test_evaluate_one_real_validation_pair(shared_data, tmp_path):
    data, lms = tmp_path / "val", tmp_path / "lms"
    data.mkdir()
    lms.mkdir()
    for k in (1, 2):
        os.symlink(os.path.join(shared_data, "dilated_vessels_val", f"case_002_{k}.nii.gz"), data / f"case_002_{k}.nii.gz")
    os.symlink(os.path.join(shared_data, "landmarks_val", "case_002.csv"), lms / "case_002.csv")
    out = str(tmp_path / "ev")
    s = evaluate_registration.evaluate(10, "none", str(data), str(lms), out, preset="cpu")
    paper = np.loadtxt(os.path.join(shared_data, "paper_tre_val.csv"), delimiter=",", skiprows=1,
                       usecols=2, max_rows=98)  # case_002's initial TRE as published
    assert s["num_landmarks"] == 98 and abs(s["tre_initial_mean"] - paper.mean()) < 1e-3
    assert s["tre_tta_mean"] < 0.6 * s["tre_initial_mean"], s
    rows = open(out + ".csv").read().splitlines()
    assert rows[0] == "case,landmark,initial,net,tta" and len(rows) == 99
    for k in ("tre_initial_mean", "tre_net_p50", "dice_tta", "folding_pct", "std_logjac", "seconds_per_pair"):
        assert k in json.load(open(out + ".json"))
    assert os.path.getsize(out + ".png") > 10000


# ---------------------------------------------------------------------------- bad input
def _pair(folder, case="case_000", fixed=None, moving=None):
    os.makedirs(folder, exist_ok=True)
    good = np.zeros((64, 52, 64), np.float32)
    good[20:40, 20:30, 20:40] = 1
    for k, v in ((1, fixed), (2, moving)):
        if v is not False:
            nib.save(nib.Nifti1Image(good if v is None else v, np.eye(4)), os.path.join(folder, f"{case}_{k}.nii.gz"))


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "does not exist"),
    (lambda d: os.makedirs(d), "no ID_1.nii.gz"),
    (lambda d: _pair(d, moving=False), "case_000_2.nii.gz: missing"),
    (lambda d: _pair(d, fixed=np.full((64, 52, 64), np.nan, np.float32)), "NaN"),
    (lambda d: _pair(d, fixed=np.ones((64, 52, 3, 2), np.float32)), "expected a 3D volume or a 2D image"),
    (lambda d: _pair(d, fixed=np.ones((64, 52), np.float32)), "a 3D image paired with the 2D"),
    (lambda d: _pair(d, moving=np.zeros((64, 52, 64), np.float32)), "all zero"),
])
def test_train_bad_data(tmp_path, capsys, make, needle):
    d = str(tmp_path / "data")
    make(d)
    out = tmp_path / "reg.pth"
    with pytest.raises(SystemExit) as e:
        utils.run_main(lambda: train_registration.main(["2", d, "--preset", "demo", "--iters", "1", "--out", str(out)]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    # progress bars (cleared with \r) may precede it; the message itself is the one last line
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last and "Traceback" not in err, err
    assert not out.exists()


def test_evaluate_bad_landmarks_and_checkpoints(tmp_path, run):
    d = str(tmp_path / "data")
    _pair(d)
    out = str(tmp_path / "ev")
    assert_one_line_error(run("evaluate_registration.py", 1, "none", "--data", d, "--out", out), "case_000.csv", "missing")
    os.makedirs(os.path.join(d, "landmarks"))
    utils.write_landmarks(os.path.join(d, "landmarks", "case_000.csv"), np.array([[10, 10, 300.0]]), np.array([[10, 10, 10.0]]))
    assert_one_line_error(run("evaluate_registration.py", 1, "none", "--data", d, "--out", out), "outside")
    utils.write_landmarks(os.path.join(d, "landmarks", "case_000.csv"), np.array([[100, 100, 100.0]]), np.array([[102, 100, 100.0]]))
    wrong = str(tmp_path / "wrong.pth")
    utils.save_checkpoint(wrong, "vqae", {}, {})
    assert_one_line_error(run("evaluate_registration.py", 1, wrong, "--data", d, "--out", out), "wrong.pth", "expected 'regnet'")
    trunc = str(tmp_path / "trunc.pth")
    open(trunc, "wb").write(b"PK\x03\x04 not really a checkpoint")
    assert_one_line_error(run("evaluate_registration.py", 1, trunc, "--data", d, "--out", out), "trunc.pth", "truncated")
    open(out + ".json", "w").write("{}")
    assert_one_line_error(run("evaluate_registration.py", 1, "none", "--data", d, "--out", out), "ev.json", "exists")
    assert sorted(os.listdir(tmp_path)) == ["data", "ev.json", "trunc.pth", "wrong.pth"]  # nothing else written


def test_benchmark_runs_and_reports(phantoms, capsys):
    """tools/benchmark_registration.py at a tiny size: one timed step and two TTA iterations per variant."""
    from tools import benchmark_registration
    benchmark_registration.main(["--data", phantoms, "--batch", "1", "--steps", "1", "--tta", "2"])
    out = capsys.readouterr().out
    assert out.count("s/iteration") == 3 and out.count("TRE") == 3
    assert float(out.strip().splitlines()[-1].split("speedup:")[1]) > 0  # a number; timings are not tested
