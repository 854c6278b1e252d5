"""Your own data: Learn2Reg dataset JSONs in, frames derived from the data and stored in every
stage's files, TRE in the data's millimetres, Learn2Reg displacement fields and data sets out,
label maps, and the one-line errors of bad data sets."""
import json
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate_registration
import make_phantoms
import pipeline
import train_registration
import utils

SPACING = (1.5, 1.5, 2.0)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A small Learn2Reg data set of phantoms in a non-lung shape, anisotropic voxels: 4 + 2 pairs."""
    out = str(tmp_path_factory.mktemp("own"))
    make_phantoms.main([out, "6", "--learn2reg", "OWN", "--size", "48", "40", "32", "--spacing", *map(str, SPACING),
                        "--val", "2", "--seed", "3"])
    return os.path.join(out, "OWN_dataset.json")


def copy_set(js, tmp_path):
    dst = str(tmp_path / "set")
    shutil.copytree(os.path.dirname(js), dst)
    return os.path.join(dst, os.path.basename(js))


def test_lung_frame_is_the_data_readme_rule():
    for shape in [(256, 208, 256), (320, 250, 353), (236, 189, 208), (261, 165, 311), (1, 2, 3), (351, 255, 451)]:
        H, W, D = shape  # Lung250M-4B's README: pad to 352x256x352, crop 48/32/48 before, 48/16/48 after
        h1, w1, d1 = (352 - H) // 2 - 48, (256 - W) // 2 - 32, (352 - D) // 2 - 48
        rule = (h1, 352 - H - h1 - 96, w1, 256 - W - w1 - 48, d1, 352 - D - d1 - 96)
        assert utils.frame_pads(shape, utils.LUNG250M4B) == rule


def test_learn2reg_json_pairs_frame_and_keypoints(own):
    train, val = utils.find_pairs(own), utils.find_pairs(own, "val")
    assert [p.id for p in train] == [f"OWN_{i:04d}" for i in range(1, 5)]
    assert [p.id for p in val] == ["OWN_0005", "OWN_0006"]
    assert utils.find_pairs(os.path.dirname(own)) == train  # a folder holding one *_dataset.json
    frame = utils.data_frame(own)  # a JSON: derived by default
    shapes = [nib.load(p.fixed).shape for p in train]
    assert frame["name"] == "derived" and frame["spacing"] == list(SPACING)
    assert all(f % utils.FRAME_MULTIPLE == 0 and f >= max(s[i] for s in shapes) for i, f in enumerate(frame["shape"]))
    assert utils.data_frame(own, "lung250m4b") == utils.LUNG250M4B
    # keypoints in each image's voxels -> frame voxels; the TRE of no registration in mm of the data
    p = val[0]
    fixed, moving = utils.pair_landmarks(p, frame)
    kf, km = np.loadtxt(p.fixed_kp, delimiter=","), np.loadtxt(p.moving_kp, delimiter=",")
    pads = np.array(utils.frame_pads(nib.load(p.fixed).shape, frame)[::2])
    assert np.allclose(fixed, kf + pads) and np.allclose(moving, km + pads)
    assert np.allclose(utils.tre(None, fixed, moving, frame), np.linalg.norm((kf - km) * SPACING, axis=1))
    # the phantoms' keypoints are exact: each lies on a vessel of its own image (within a voxel)
    for img, kp in ((p.fixed, kf), (p.moving, km)):
        v = torch.from_numpy(np.asarray(nib.load(img).dataobj, np.float32))[None, None]
        near = torch.nn.functional.max_pool3d(v, 3, 1, 1)[0, 0].numpy()
        idx = np.clip(np.round(kp).astype(int), 0, np.array(near.shape) - 1)
        assert near[tuple(idx.T)].mean() > 0.9


def test_frames_refuse_what_does_not_fit(own, tmp_path):
    p = utils.find_pairs(own)[0]
    with pytest.raises(utils.DataError, match="use --frame derived"):
        utils.framed_volume(p.fixed, 4, utils.LUNG250M4B)
    # landmark CSVs are frame voxels: not read for an image off the frame's grid
    with pytest.raises(utils.DataError, match="landmark CSVs are frame voxels, but .*OWN_0001_0000.nii.gz is not on"):
        utils.pair_landmarks(utils.Pair("x", p.fixed, p.moving), utils.data_frame(own), str(tmp_path))
    # synthetic pairs of another frame are not mixed with these
    synth = tmp_path / "synth"
    synth.mkdir()
    for k in (1, 2):
        shutil.copy(p.fixed, synth / f"case_0000_{k}.nii.gz")
    with pytest.raises(utils.DataError, match="made in another frame"):
        pipeline.mix_folder(own, str(synth), str(tmp_path / "mix"), utils.data_frame(own))


def test_bad_data_sets_one_line_each(own, tmp_path):
    js = copy_set(own, tmp_path)
    d = json.load(open(js))
    root = os.path.dirname(js)

    def write(**changes):
        json.dump({**d, **changes}, open(js, "w"))

    write(training_paired_images=[], registration_val=[])
    with pytest.raises(utils.DataError, match="lists no pairs"):
        utils.find_pairs(js)
    write(training_paired_images=d["training_paired_images"] + [{"fixed": "./imagesTr/NOPE_0000.nii.gz",
                                                                   "moving": "./imagesTr/NOPE_0001.nii.gz"}])
    with pytest.raises(utils.DataError, match="NOPE_0000.nii.gz, which does not exist"):
        utils.find_pairs(js)
    write()
    open(os.path.join(root, "x_dataset.json"), "w").write("{}")
    with pytest.raises(utils.DataError, match="2 \\*_dataset.json files"):
        utils.find_pairs(root)
    os.remove(os.path.join(root, "x_dataset.json"))
    # fixed and moving of one pair on different grids
    p = utils.find_pairs(js)[0]
    shutil.copy(p.moving, str(tmp_path / "keep.nii.gz"))
    img = nib.load(p.moving)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), p.moving)
    with pytest.raises(utils.DataError, match="fixed and moving must share a grid"):
        utils.find_pairs(js)
    shutil.copy(str(tmp_path / "keep.nii.gz"), p.moving)
    # keypoint files with different row counts
    v = utils.find_pairs(js, "val")[0]
    np.savetxt(v.moving_kp, np.loadtxt(v.moving_kp, delimiter=",")[:-3], delimiter=",")
    with pytest.raises(utils.DataError, match="keypoints, but"):
        utils.pair_landmarks(v, utils.data_frame(js, "derived"))
    # not JSON at all
    open(js, "w").write("{ broken")
    with pytest.raises(utils.DataError, match="not readable JSON"):
        utils.find_pairs(js)


def test_labels_and_a_volume_larger_than_a_named_frame(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(utils, "_SEVERAL_LABELS", set())  # the note comes once per process: other tests may have had it
    a = np.zeros((20, 20, 20), np.uint8)
    a[2:6, 2:6, 2:6] = 1
    a[10:14, 10:14, 10:14] = 3
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    v = utils.framed_volume(str(tmp_path / "lab.nii.gz"), 1, utils.LUNG250M4B)
    assert v.sum() == 2 * 64  # all labels > 0
    assert "label map with 2 labels" in capsys.readouterr().err
    assert utils.framed_volume(str(tmp_path / "lab.nii.gz"), 1, utils.LUNG250M4B, labels=[3]).sum() == 64
    with pytest.raises(utils.DataError, match="holds none of the labels 2"):
        utils.framed_volume(str(tmp_path / "lab.nii.gz"), 1, utils.LUNG250M4B, labels=[2])
    big = np.zeros((400, 220, 260), np.uint8)
    big[::5, ::5, ::5] = 1  # spread over the whole scan: the 256x208x256 frame crops ~40 %
    nib.save(nib.Nifti1Image(big, np.eye(4)), str(tmp_path / "big.nii.gz"))
    with pytest.warns(UserWarning, match=r"keeps \d+ % of its mask voxels \(crops \d+ %\)"):
        utils.framed_volume(str(tmp_path / "big.nii.gz"), 4, utils.LUNG250M4B)


def test_displacement_field_round_trip():
    """A known shift: fixed keypoint + disp(fixed keypoint) = moving keypoint, on the fixed image's grid
    (an image smaller than the frame in one axis and larger in another)."""
    frame = {"name": "derived", "shape": [32, 24, 16], "spacing": [1.5, 1.5, 2.0], "shift": [0, 0, 0]}
    shift = np.array([2.0, -1.5, 3.0])  # frame voxels = image voxels
    ddf = torch.tensor(shift / 4, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, 8, 6, 4).contiguous()  # factor 4
    shape = (28, 30, 16)
    disp = utils.displacement_on_image(ddf, frame, shape)
    assert disp.shape == (*shape, 3) and np.allclose(disp, shift, atol=1e-5)
    fixed = np.array([[3.0, 4.0, 5.0], [20.0, 27.0, 10.0]])  # in image voxels
    moving = fixed + shift
    got = fixed + disp[tuple(fixed.astype(int).T)]
    assert np.allclose(got, moving)
    # a varying field: the disp at a voxel is the frame field at that voxel's frame position
    ramp = torch.arange(32, dtype=torch.float32).view(1, 1, 32, 1, 1).expand(1, 3, 32, 24, 16).contiguous()
    disp = utils.displacement_on_image(ramp, frame, shape)
    h1 = utils.frame_pads(shape, frame)[0]
    assert np.allclose(disp[5, 10, 3, 0], 5 + h1)
    # an image on the frame pooled by 2 (synthetic pairs): the field on its grid, in its voxels
    disp = utils.displacement_on_image(ddf, frame, (16, 12, 8))
    assert disp.shape == (16, 12, 8, 3) and np.allclose(disp, shift / 2, atol=1e-5)


def test_own_data_train_evaluate_disp_in_mm(own, tmp_path, capsys):
    """A net trained on the JSON stores the derived frame; evaluation on its registration_val pairs
    reports TRE in mm; --disp writes Learn2Reg fields whose keypoint TRE is the reported one."""
    torch.set_num_threads(1)
    ck = str(tmp_path / "reg.pth")
    train_registration.main(["2", own, "--preset", "demo", "--iters", "2", "--out", ck])
    frame = torch.load(ck, weights_only=True)["config"]["frame"]
    assert frame == utils.data_frame(own)
    disp = str(tmp_path / "disp")
    s = evaluate_registration.evaluate(3, ck, own, out=str(tmp_path / "ev"), direction="fixed", disp=disp)
    assert s["num_pairs"] == 2 and s["frame"] == frame
    per = np.genfromtxt(str(tmp_path / "ev.csv"), delimiter=",", names=True, dtype=None, encoding=None)
    for p in utils.find_pairs(own, "val"):
        n = p.fixed.split("_")[-2]
        img = nib.load(os.path.join(disp, f"disp_{n}_{n}.nii.gz"))
        fixed_img = nib.load(p.fixed)
        assert img.shape == (*fixed_img.shape, 3) and np.allclose(img.affine, fixed_img.affine)
        kf, km = np.loadtxt(p.fixed_kp, delimiter=","), np.loadtxt(p.moving_kp, delimiter=",")
        # Learn2Reg's TRE: the field sampled (trilinearly) at the fixed keypoints, in mm of the voxels
        d = torch.from_numpy(np.asarray(img.dataobj, np.float32)).permute(3, 0, 1, 2)[None]
        size = torch.tensor(d.shape[2:], dtype=torch.float64)
        g = ((2 * torch.from_numpy(kf) + 1) / size - 1).flip(-1).view(1, -1, 1, 1, 3).float()
        u = torch.nn.functional.grid_sample(d, g, align_corners=False, padding_mode="border").view(3, -1).T.numpy()
        tre = np.linalg.norm((kf + u - km) * SPACING, axis=1)
        ours = np.array([float(v) for c, v in zip(per["case"], per["tta"]) if c == p.id])
        assert abs(tre.mean() - ours.mean()) < 0.05 * ours.mean() + 0.05
        initial = np.array([float(v) for c, v in zip(per["case"], per["initial"]) if c == p.id])
        assert np.allclose(initial, np.linalg.norm((kf - km) * SPACING, axis=1), atol=1e-3)


def test_pipeline_demo_on_a_learn2reg_json(micro, own, tmp_path, capsys):
    """The whole experiment on a dataset JSON: the derived frame travels through every stage, the
    synthetic pairs carry it (affine with the data's spacing) and a Learn2Reg JSON of their own."""
    out = str(tmp_path / "res")
    pipeline.main(["--preset", "demo", "--data", own, "--out", out, "--seeds", "1", "--num-synth", "3"])
    frame = utils.data_frame(own)
    for name in ("vqae.pth", "diffusion.pth", "reg_real_s0.pth", "reg_synth_s0.pth", "reg_mix_s0.pth"):
        assert torch.load(os.path.join(out, name), weights_only=True)["config"]["frame"] == frame, name
    assert utils.read_tokens(os.path.join(out, "tokens.pth"))["frame"] == frame
    synth = os.path.join(out, "synth")
    assert json.load(open(os.path.join(synth, "manifest.json")))["frame"] == frame
    pairs = utils.find_pairs(synth)  # through synth/synth_dataset.json
    assert len(pairs) == 3 and utils.data_frame(synth) == frame
    img = nib.load(pairs[0].fixed)
    assert img.shape == utils.grid_shape(4, frame) and np.allclose(np.diag(img.affine)[:3], np.array(SPACING) * 4)
    ev = json.load(open(os.path.join(out, "eval_real_s0.json")))
    assert ev["num_pairs"] == 2 and ev["frame"] == frame
    assert "| real-4 |" in open(os.path.join(out, "results.md")).read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(utils.find_pairs(os.path.join(out, "mix"))) == 7


def test_segmentations_come_from_the_json_and_intensity_images_are_refused(own, tmp_path):
    """An NLST / OASIS-style layout: training[] lists intensity images with their "label" (or "mask");
    the pairs read the segmentations, ids and keypoints stay the images'. Without the entry, an
    intensity image is refused in one line that names the entry to add."""
    js = copy_set(own, tmp_path)
    root = os.path.dirname(js)
    d = json.load(open(js))
    before = utils.find_pairs(js)
    os.makedirs(os.path.join(root, "labelsTr"))
    for i, e in enumerate(d["training"]):
        image = os.path.join(root, e["image"])
        label = "./labelsTr/" + os.path.basename(image)
        shutil.move(image, os.path.join(root, label))  # the masks become the labels ...
        img = nib.load(os.path.join(root, label))
        noise = np.random.default_rng(i).normal(100, 20, img.shape).astype(np.float32)  # ... beside MRI-like images
        nib.save(nib.Nifti1Image(noise, img.affine), image)
        e["label" if i % 2 else "mask"] = label
    json.dump(d, open(js, "w"))
    after = utils.find_pairs(js)
    assert [p.id for p in after] == [p.id for p in before]
    assert [p.fixed_kp for p in after] == [p.fixed_kp for p in before]
    assert all("labelsTr" in p.fixed and "labelsTr" in p.moving for p in after)
    assert np.array_equal(utils.load_volume(after[0].fixed), utils.load_volume(before[0].fixed.replace("imagesTr", "labelsTr")))
    for e in d["training"]:
        e.pop("label", None)
        e.pop("mask", None)
    json.dump(d, open(js, "w"))
    with pytest.raises(utils.DataError, match='holds intensities .* "label" \\(or "mask"\\)'):
        utils.load_volume(utils.find_pairs(js)[0].fixed)
    ct = np.random.default_rng(0).integers(-1000, 1500, (64, 64, 64)).astype(np.int16)  # CT in HU: integers
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(utils.DataError, match="distinct values, an intensity image rather than a label map; .*label"):
        utils.load_volume(str(tmp_path / "ct.nii.gz"))
