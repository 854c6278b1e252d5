"""make_phantoms.py: files, exact landmark correspondence, determinism, resolution consistency, CLI."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate_registration
import make_phantoms
import utils
from conftest import assert_one_line_error


def sample(vol, pts):
    """Trilinear value of a pooled-frame volume (H, W, D) at 1 mm frame points (N, 3)."""
    v = torch.as_tensor(vol, dtype=torch.float32)[None, None]
    norm = (2 * torch.as_tensor(pts, dtype=torch.float32) + 1) / torch.tensor(tuple(utils.LUNG250M4B['shape']), dtype=torch.float32) - 1
    g = norm.flip(-1).view(1, -1, 1, 1, 3)  # grid_sample wants (x, y, z) = (D, W, H) order
    return F.grid_sample(v, g, mode="bilinear", align_corners=False).flatten().numpy()


def test_files_shape_affine_and_loading(phantoms):
    ids = utils.pair_ids(phantoms)
    assert ids == [f"case_{i:03d}" for i in range(4)]
    for c in ids:
        for k in (1, 2):
            img = nib.load(os.path.join(phantoms, f"{c}_{k}.nii.gz"))
            assert img.shape == (64, 52, 64)
            assert np.allclose(img.affine, utils.frame_affine(4, utils.LUNG250M4B))
        assert os.path.exists(os.path.join(phantoms, "landmarks", f"{c}.csv"))
    _, vols = utils.load_pairs(phantoms, 4, utils.LUNG250M4B, progress=False)
    assert vols.shape == (4, 2, 64, 52, 64)
    assert vols.min() >= 0 and vols.max() <= 1
    frac = vols.mean(dim=(2, 3, 4))
    assert (frac > 0.015).all() and (frac < 0.05).all(), frac  # real data at 4 mm: ~2.5-4.5 %
    assert ((vols > 0) & (vols < 1)).float().mean() > 0.01  # soft occupancy, not a binary mask


def test_landmarks_are_exact_and_on_vessels(phantoms):
    _, vols = utils.load_pairs(phantoms, 4, utils.LUNG250M4B, progress=False)
    tre, right, wrong = [], [], []
    for i, c in enumerate(utils.pair_ids(phantoms)):
        fx, mv = utils.read_landmarks(os.path.join(phantoms, "landmarks", f"{c}.csv"), utils.LUNG250M4B)
        assert len(fx) >= 60
        # exact by construction: fixed = moving + w(moving), w the case's analytic displacement
        w = make_phantoms.displacement(mv, make_phantoms.case_motion(0, i))
        assert np.abs(mv + w - fx).max() < 1e-3
        on_fixed, on_moving = sample(vols[i, 0], fx), sample(vols[i, 1], mv)
        # on vessel centrelines; trilinear at 4 mm gives ~0.8 on a 2.5 mm radius vessel
        assert np.median(on_fixed) > 0.65 and np.median(on_moving) > 0.65, (np.median(on_fixed), np.median(on_moving))
        assert (on_fixed > 0.3).all() and (on_moving > 0.3).all()
        right += [on_fixed, on_moving]
        wrong += [sample(vols[i, 1], fx), sample(vols[i, 0], mv)]  # each point in the other volume
        assert (fx[:, 0] < 128).sum() > 10 and (fx[:, 0] > 128).sum() > 10  # spread over both lungs
        d = np.linalg.norm(mv[:, None] - mv[None], axis=-1) + 1e9 * np.eye(len(mv))
        assert d.min() > 1.0  # no duplicates
        tre.append(utils.tre(None, fx, mv, utils.LUNG250M4B))
    assert np.concatenate(wrong).mean() < np.concatenate(right).mean() - 0.1  # the pairing matters
    t = np.concatenate(tre)
    assert 3 < t.mean() < 15 and t.max() < 20, evaluate_registration.summary(t)


def test_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_phantoms.make_pairs(str(tmp_path / name), 1, seed=seed)
    vol = {n: nib.load(str(tmp_path / n / "case_000_2.nii.gz")).get_fdata() for n in "abc"}
    lms = {n: (tmp_path / n / "landmarks" / "case_000.csv").read_text() for n in "abc"}
    assert np.array_equal(vol["a"], vol["b"]) and lms["a"] == lms["b"]
    assert utils.dice(vol["a"], vol["c"]) < 0.5 and lms["a"] != lms["c"]


def test_motion_scales_the_displacement_of_the_same_trees(tmp_path):
    for name, motion in (("m1", 1.0), ("m2", 1.5)):
        make_phantoms.make_pairs(str(tmp_path / name), 1, seed=3, motion=motion)
    fixed = {n: nib.load(str(tmp_path / n / "case_000_1.nii.gz")).get_fdata() for n in ("m1", "m2")}
    assert np.array_equal(fixed["m1"], fixed["m2"])  # the same tree
    fx, mv = utils.read_landmarks(str(tmp_path / "m2" / "landmarks" / "case_000.csv"), utils.LUNG250M4B)
    w = make_phantoms.displacement(mv, make_phantoms.case_motion(3, 0, 1.5))
    assert np.abs(mv + w - fx).max() < 1e-3  # still exact
    w1 = make_phantoms.displacement(mv, make_phantoms.case_motion(3, 0))
    assert np.allclose(w, 1.5 * w1)
    with pytest.raises(utils.DataError, match="--motion"):
        make_phantoms.make_pairs(str(tmp_path / "bad"), 1, motion=2.0)


def test_half_resolution_pools_to_the_quarter_resolution_phantom(tmp_path):
    make_phantoms.make_pairs(str(tmp_path / "f2"), 1, seed=3, size=(128, 104, 128))
    make_phantoms.make_pairs(str(tmp_path / "f4"), 1, seed=3)
    p2 = str(tmp_path / "f2" / "case_000_1.nii.gz")
    assert np.allclose(nib.load(p2).affine, utils.frame_affine(2, utils.LUNG250M4B))
    assert utils.framed_volume(p2, 2, utils.LUNG250M4B).shape == (128, 104, 128)
    for k in (1, 2):
        a = utils.framed_volume(str(tmp_path / "f2" / f"case_000_{k}.nii.gz"), 4, utils.LUNG250M4B)  # pooled 2 -> 4 mm
        b = utils.framed_volume(str(tmp_path / "f4" / f"case_000_{k}.nii.gz"), 4, utils.LUNG250M4B)
        assert utils.dice(a, b) > 0.85, utils.dice(a, b)
        assert abs(float(a.mean()) / float(b.mean()) - 1) < 0.2
    l2 = (tmp_path / "f2" / "landmarks" / "case_000.csv").read_text()
    assert l2 == (tmp_path / "f4" / "landmarks" / "case_000.csv").read_text()  # landmarks do not depend on size


def test_refuses_bad_input_without_writing(tmp_path):
    out = tmp_path / "p"
    for size in ((64, 52, 63), (100, 80, 100), (0, 0, 0)):
        with pytest.raises(utils.DataError, match="--size"):
            make_phantoms.make_pairs(str(out), 1, size=size)
    with pytest.raises(utils.DataError, match="NUM_PAIRS"):
        make_phantoms.make_pairs(str(out), 0)
    assert not out.exists()
    # an existing later case blocks the whole run before case_000 is written
    out.mkdir()
    (out / "case_001_2.nii.gz").write_bytes(b"old")
    with pytest.raises(utils.DataError, match="output exists"):
        make_phantoms.make_pairs(str(out), 2)
    assert sorted(os.listdir(out)) == ["case_001_2.nii.gz"]


def test_cli(run, tmp_path, capsys):
    out = tmp_path / "cli"
    make_phantoms.main([str(out), "1", "--seed", "2"])  # in-process: a subprocess pays ~5 s of imports
    assert "wrote 1 phantom pairs" in capsys.readouterr().out
    before = (out / "case_000_1.nii.gz").read_bytes()
    with pytest.raises(utils.DataError, match="output exists"):
        make_phantoms.main([str(out), "1", "--seed", "9"])
    assert (out / "case_000_1.nii.gz").read_bytes() == before
    make_phantoms.main([str(out), "1", "--seed", "9", "--overwrite"])
    assert (out / "case_000_1.nii.gz").read_bytes() != before
    p = run("make_phantoms.py", tmp_path / "x", 2, "--size", 64, 52, 60)  # as a user sees it
    assert p.returncode == 2
    assert_one_line_error(p, "--size")
    assert not (tmp_path / "x").exists()
