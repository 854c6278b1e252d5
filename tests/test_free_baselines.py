"""The free baselines (utils.random_field, deform_pairs.py, train_registration.py --augment) and the
held-out rule of the generator's training stages (no evaluation set reaches a weight)."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import deform_pairs
import train_diffusion
import train_registration
import train_vqae
import utils
from conftest import assert_one_line_error

FRAME = utils.LUNG250M4B


@pytest.fixture(autouse=True, scope="module")
def few_calibration_fields():
    """Two calibration fields instead of utils.FIELD_CALIBRATION (quick registrations are the slow part);
    test_field_strengths_come_from_the_pairs_motion checks the calibration itself."""
    n = utils.FIELD_CALIBRATION
    utils.FIELD_CALIBRATION = 2
    yield
    utils.FIELD_CALIBRATION = n


def mean_mm(u, weight, frame=FRAME):
    cell = [utils.FIELD_FACTOR * s for s in frame["spacing"]]
    return float((utils.scale_channels(u, cell)[0].norm(dim=0) * weight).sum() / weight.sum())


@pytest.mark.parametrize("magnitude", [2.0, 8.0, 20.0])
def test_random_fields_are_diffeomorphic_and_of_the_stated_magnitude(magnitude):
    weight = torch.rand(utils.grid_shape(utils.FIELD_FACTOR, FRAME)) ** 4  # vessel-like: most weight in few voxels
    u = utils.random_field(FRAME, magnitude, weight, torch.Generator().manual_seed(1))
    assert u.shape == (1, 3, *utils.grid_shape(utils.FIELD_FACTOR, FRAME))
    assert mean_mm(u, weight) == pytest.approx(magnitude, rel=0.01)
    with_affine = utils.random_field(FRAME, magnitude, weight, torch.Generator().manual_seed(1), utils.AFFINE_STD)
    for field in (u, with_affine):  # on its own grid and upsampled to the registration nets' 4 mm
        for grid in (u.shape[2:], utils.grid_shape(4, FRAME)):
            assert (utils.jacobian_det(utils.resize_ddf(field, tuple(grid))) > 0).all()
    # one draw per generator state; another seed, another field
    assert torch.equal(u, utils.random_field(FRAME, magnitude, weight, torch.Generator().manual_seed(1)))
    assert not torch.allclose(u, utils.random_field(FRAME, magnitude, weight, torch.Generator().manual_seed(2)))
    assert not torch.allclose(u, with_affine)


def test_field_strengths_come_from_the_pairs_motion(phantoms, monkeypatch):
    """The strength is the pairs' quick-registration displacement over the share of a random field's
    displacement the quick registration finds; pairs without motion get (almost) none."""
    ids, x = utils.load_pairs(phantoms, 4, FRAME, progress=False)
    monkeypatch.setattr(utils, "FIELD_CALIBRATION", 8)
    strengths, disp, r = utils.field_strengths(x, 4, FRAME, torch.Generator().manual_seed(0))
    assert len(strengths) == len(ids) and 0.2 < r < 1.5
    assert strengths == pytest.approx([d / r for d in disp])
    still = torch.stack([x[:, 0], x[:, 0]], 1)  # no motion at all
    assert max(utils.field_strengths(still, 4, FRAME, torch.Generator().manual_seed(0))[1]) < 0.5 * min(disp)


def test_augmentation_applies_one_draw_to_both_maps(phantoms):
    _, x = utils.load_pairs(phantoms, 4, FRAME, progress=False)
    x = x[:2]
    motion = torch.tensor([6.0, 3.0])
    y = train_registration.augment_pairs(x, motion, FRAME, torch.Generator().manual_seed(5))
    assert y.shape == x.shape and not torch.allclose(y, x)
    gen = torch.Generator().manual_seed(5)  # the same draws, by hand
    for b in range(2):
        u = utils.random_field(FRAME, float(motion[b]), utils.field_weight(x[b, 0], FRAME), gen, utils.AFFINE_STD)
        ddf = utils.resize_ddf(u, tuple(x.shape[2:]))
        for c in range(2):  # fixed and moving warped by the one field of their pair
            assert torch.allclose(y[b, c], utils.warp(x[b, c][None, None], ddf, padding="zeros")[0, 0], atol=1e-5)
    # a pair of two equal maps stays a pair of two equal maps
    same = train_registration.augment_pairs(torch.stack([x[:, 0], x[:, 0]], 1), motion, FRAME, torch.Generator())
    assert torch.equal(same[:, 0], same[:, 1])


def test_augmented_training_resumes_bit_identical_and_refuses_a_switch(phantoms, tmp_path):
    whole, part = str(tmp_path / "whole.pth"), str(tmp_path / "part.pth")
    kw = dict(data=phantoms, preset="demo", batch_size=2, augment=True, log=lambda *a: None)
    train_registration.train(out=whole, iters=4, **kw)
    train_registration.train(out=part, iters=2, **kw)
    train_registration.train(out=part, iters=4, resume=True, **kw)
    a, b = (utils.load_checkpoint(p, "regnet") for p in (whole, part))
    assert a["augment"] is True
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    with pytest.raises(utils.DataError, match="trained with --augment"):
        train_registration.train(out=part, iters=6, resume=True, **dict(kw, augment=False))


@pytest.fixture(scope="module")
def made(phantoms, tmp_path_factory):
    """6 warped and 6 deformed pairs of the phantoms, written by the script's main()."""
    root = tmp_path_factory.mktemp("free")
    for kind in deform_pairs.KINDS:
        deform_pairs.main([kind, phantoms, "6", "--preset", "demo", "--out", str(root / kind), "--seed", "3"])
    return root


def test_baseline_pairs_are_written_like_synthetic_pairs_and_train_a_net(made, phantoms, tmp_path):
    for kind in deform_pairs.KINDS:
        folder = str(made / kind)
        m = json.load(open(os.path.join(folder, "manifest.json")))
        assert m["complete"] and m["kind"] == kind and m["frame"] == FRAME
        assert m["fields_drawn"] == 6 and m["fields_folding"] == 0  # phantom motion: no field needs a second draw
        assert len(m["pairs"]) == 6 and set(p["source"] for p in m["pairs"]) <= set(utils.pair_ids(phantoms))
        assert utils.recorded_frame(folder) == FRAME and len(utils.find_pairs(folder)) == 6
        assert os.path.exists(os.path.join(folder, "preview.png"))
        img = nib.load(os.path.join(folder, "case_0000_2.nii.gz"))
        assert img.shape == utils.grid_shape(4, FRAME) and np.allclose(img.affine, utils.frame_affine(4, FRAME))
        vol = np.asarray(img.dataobj)
        assert 0 <= vol.min() and vol.max() <= 1 and vol.max() > 0.5
        ck = str(tmp_path / f"{kind}.pth")
        train_registration.train(data=folder, out=ck, preset="demo", batch_size=2, iters=2, log=lambda *a: None)
        assert utils.load_checkpoint(ck, "regnet")["cases"] == utils.pair_ids(folder)
    # warped: the fixed map is a real map as it was (one of its source pair's two), the moving one moved
    ids, real = utils.load_pairs(phantoms, 4, FRAME, progress=False)
    m = json.load(open(made / "warped" / "manifest.json"))
    _, warped = utils.load_pairs(str(made / "warped"), 4, FRAME, progress=False)
    for pair, row in zip(warped, m["pairs"]):
        source = real[ids.index(row["source"])]
        assert min(float((pair[0] - source[k]).abs().max()) for k in range(2)) < 1e-6
        assert float((pair[1] - pair[0]).abs().max()) > 0.1


def landmarks_through(ddf, points, iters=30):
    """Where frame points x land in a volume warped by ddf (frame voxels): y with y + ddf(y) = x."""
    y = points.copy()
    for _ in range(iters):
        y = points - (utils.displace_points(ddf, y, FRAME["shape"]) - y)
    return y


def test_deformed_pairs_keep_their_source_pairs_motion(phantoms):
    """Both maps move by one field, so the exact landmark motion of each new pair is its source pair's
    within +-10 % (the anatomy itself moves further)."""
    ids, maps, f0 = deform_pairs.load_maps(phantoms, FRAME)
    strengths, _, _ = utils.field_strengths(maps, f0, FRAME, torch.Generator().manual_seed(0))
    for i in range(6):
        j = i % len(ids)
        _, u = deform_pairs.make_pair("deformed", maps[j], strengths[j], FRAME, torch.Generator().manual_seed(i))
        ddf = utils.resize_ddf(u, tuple(FRAME["shape"]))
        fixed, moving = utils.read_landmarks(os.path.join(phantoms, "landmarks", f"{ids[j]}.csv"), FRAME)
        new_fixed, new_moving = landmarks_through(ddf, fixed), landmarks_through(ddf, moving)
        before = np.linalg.norm(moving - fixed, axis=1).mean()
        after = np.linalg.norm(new_moving - new_fixed, axis=1).mean()
        assert 0.9 < after / before < 1.1, (ids[j], before, after)
        assert np.linalg.norm(new_fixed - fixed, axis=1).mean() > 0.5 * before  # new anatomy


def test_deform_pairs_refuses_empty_maps_and_folding_fields(phantoms, tmp_path, run, monkeypatch):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(phantoms, bad)
    img = nib.load(str(bad / "case_001_2.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(bad / "case_001_2.nii.gz"))
    proc = run("deform_pairs.py", "warped", bad, "2", "--preset", "demo", "--out", tmp_path / "w")
    assert_one_line_error(proc, "case_001_2.nii.gz", "all zero")
    assert not os.path.exists(tmp_path / "w")
    # fields far stronger than the anatomy they move fold at every draw: refused, no pair written
    monkeypatch.setattr(utils, "field_strengths", lambda pairs, *a: ([200.0] * len(pairs), [1.0] * len(pairs), 1.0))
    with pytest.raises(utils.DataError, match="10 random fields for pair 0 .* fold"):
        deform_pairs.run("deformed", phantoms, str(tmp_path / "d"), 2, "demo", progress=False)
    assert not os.path.exists(tmp_path / "d" / "case_0000_1.nii.gz")


def test_no_evaluation_set_reaches_a_generator_weight(phantoms, tmp_path, monkeypatch):
    """The VQ-AE and the diffusion model train to the same weights with and without held-out pairs
    (they only log on them), and the diffusion model's vocabulary is the training grids' codes: a
    validation grid's code outside it is left out of the validation loss, not added to the model."""
    monkeypatch.setitem(train_vqae.PRESETS, "demo", dict(train_vqae.PRESETS["demo"], val_every=2, ckpt_every=2))
    a, b = str(tmp_path / "a.pth"), str(tmp_path / "b.pth")
    train_vqae.train(data=phantoms, out=a, preset="demo", batch_size=2, iters=4, val=phantoms)
    train_vqae.train(data=phantoms, out=b, preset="demo", batch_size=2, iters=4)
    sa, sb = (utils.load_checkpoint(p, "vqae")["state"] for p in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    grid = (8, 7, 8)
    cfg = {"factor": 4, "frame": FRAME, "preset": "demo"}
    train = torch.randint(6, (4, *grid)) * 2  # even codes 0..10
    held = train[:2].clone()
    held[:, 0] = 15  # a code no training grid uses
    utils.write_tokens(str(tmp_path / "t.pth"), train, [f"c{i}" for i in range(4)], 16, cfg)
    utils.write_tokens(str(tmp_path / "v.pth"), held, ["v0", "v1"], 16, cfg)
    monkeypatch.setitem(train_diffusion.PRESETS, "demo", dict(train_diffusion.PRESETS["demo"], every=2))
    with_val = train_diffusion.train(data=str(tmp_path / "t.pth"), out=str(tmp_path / "d1.pth"), preset="demo",
                                     batch_size=2, iters=4, val=str(tmp_path / "v.pth"))
    without = train_diffusion.train(data=str(tmp_path / "t.pth"), out=str(tmp_path / "d2.pth"), preset="demo",
                                    batch_size=2, iters=4)
    assert with_val.vocab.tolist() == sorted(set(train.flatten().tolist())) and 15 not in with_val.vocab
    assert all(torch.equal(v, without.state_dict()[k]) for k, v in with_val.state_dict().items())
    log = utils.load_checkpoint(str(tmp_path / "d1.pth"), "diffusion")["log"]
    assert all(np.isfinite(r["val_loss"]) for r in log)


def test_preset_table_holds_only_what_the_script_reads():
    """The table is part of a pipeline stage's record: keys of the VQ-AE table that deform_pairs.py does
    not read would make finished runs redo their baseline pairs whenever that table changes."""
    import deform_pairs
    import train_vqae

    for name, table in deform_pairs.PRESETS.items():
        assert set(table) <= {"factor", "factor_2d"} and table["factor"] == train_vqae.PRESETS[name]["factor"]
