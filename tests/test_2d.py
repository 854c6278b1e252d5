"""2D pairs through every stage: the 2D label phantoms, 2D frames from the data, the geometry in
2D (warps, scaling and squaring, Jacobians, landmarks), the models with spatial_dims=2, the stage
scripts and pipeline.py on a 2D Learn2Reg data set, and the bad inputs of mixed dimensions."""
import json
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
from models import VQAE, RegistrationNet, TokenTransformer

FRAME_2D = {"name": "derived", "shape": [64, 80], "spacing": [1.0, 1.0], "shift": [0, 0]}


@pytest.fixture(scope="module")
def brains(tmp_path_factory):
    """A 2D Learn2Reg data set: 4 training + 2 validation pairs of 64x64 label phantoms (intensity
    images with "label" entries), and a folder of 3 label-map pairs."""
    root = tmp_path_factory.mktemp("brains")
    js = make_phantoms.make_learn2reg(str(root / "l2r"), "BRAIN", 6, (64, 64), (1.0, 1.0), n_val=2)
    folder = str(root / "folder")
    make_phantoms.make_pairs(folder, 3, size=(64, 80))
    return js, folder


def test_label_phantoms_vary_move_and_keep_exact_landmarks():
    size = (160, 192)
    a_fixed, a_moving, lf, lm = make_phantoms.make_pair_2d(0, 0, size)
    b_fixed = make_phantoms.make_pair_2d(0, 1, size)[0]
    assert a_fixed.dtype == np.uint8 and a_fixed.shape == size
    assert set(np.unique(a_fixed)) == {0, 1, 2, 3, 4}  # every structure present
    assert (a_fixed != b_fixed).mean() > 0.02  # subjects differ in shape, not only in position
    assert (a_fixed != a_moving).mean() > 0.01  # the pair moves
    # the moving map is the fixed one through the known motion: labels agree away from borders
    rng = np.random.default_rng([0, 0, 2])
    subj, m = make_phantoms.random_subject(rng), make_phantoms.random_motion_2d(rng, size)
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in size), indexing="ij"), -1)
    assert np.array_equal(make_phantoms.brain_labels(grid + make_phantoms.displacement_2d(grid, m), subj, size), a_moving)
    np.testing.assert_allclose(lm + make_phantoms.displacement_2d(lm, m), lf, atol=1e-9)  # exact correspondences
    assert len(lf) >= 30 and np.linalg.norm(lf - lm, axis=1).mean() > 1.0


def test_2d_folder_and_json_make_2d_frames(brains, tmp_path):
    js, folder = brains
    assert utils.data_frame(folder) == {"name": "derived", "shape": [64, 80], "spacing": [1.0, 1.0], "shift": [0, 0]}
    frame = utils.data_frame(js)
    assert utils.spatial_dims(frame) == 2 and frame["shape"] == [80, 80]  # jittered sizes rounded up to 16
    pair = utils.find_pairs(js)[0]
    assert "labelsTr" in pair.fixed  # the JSON's "label" entries, not the intensity images
    v = utils.framed_volume(pair.fixed, 1, frame)
    assert v.shape == (80, 80) and set(v.unique().tolist()) == {0.0, 1.0}
    fixed, moving = utils.pair_landmarks(pair, frame)
    assert fixed.shape[1] == 2 and moving.shape == fixed.shape
    # an (H, W, 1) NIfTI is 2D too
    p = str(tmp_path / "slice.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((64, 80, 1), np.uint8), np.eye(4)), p)
    assert utils.load_volume(p).shape == (64, 80) and utils.header_geometry(p)[0] == (64, 80)
    with pytest.raises(utils.DataError, match="lung250m4b frame is 3D"):
        utils.data_frame(folder, "lung250m4b")


def test_mixed_dimensions_are_refused(brains, tmp_path, run):
    _, folder = brains
    bad = tmp_path / "mixed"
    bad.mkdir()
    for f in os.listdir(folder):
        if f.endswith(".nii.gz"):
            os.symlink(os.path.join(folder, f), bad / f)
    vol = np.zeros((64, 80, 3), np.uint8)  # several slices among 2D images
    vol[20:40, 20:40] = 1
    for k in (1, 2):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(bad / f"case_009_{k}.nii.gz"))
    proc = run("train_registration.py", 2, bad, "--preset", "demo", "--iters", 1, "--out", tmp_path / "r.pth")
    assert_one_line_error(proc, "case_009_1.nii.gz", "3D image among 2D ones")
    # a 3D validation pair against a 2D net
    val = tmp_path / "val3d"
    val.mkdir()
    for k in (1, 2):
        os.symlink(bad / f"case_009_{k}.nii.gz", val / f"case_009_{k}.nii.gz")
    with pytest.raises(utils.DataError, match="3D image, but the derived frame is 2D"):
        utils.framed_volume(str(val / "case_009_1.nii.gz"), 1, utils.data_frame(folder))


def test_geometry_in_2d():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 40)
    zero = torch.zeros(2, 2, 32, 40)
    assert torch.allclose(utils.warp(x, zero), x, atol=1e-5)  # float rounding of the grid
    shift = torch.zeros(1, 2, 32, 40)
    shift[:, 1] = 1.0  # one pixel along the second axis
    assert torch.allclose(utils.warp(x[:1], shift)[..., :-1], x[:1, :, :, 1:], atol=1e-5)
    # box filter = avg_pool2d with zero padding counted
    assert torch.allclose(utils.box_filter(x, 5), F.avg_pool2d(x, 5, stride=1, padding=2), atol=1e-6)
    # scaling and squaring: a smooth velocity gives an invertible field whose Jacobian stays positive
    v = utils.box_filter(utils.box_filter(torch.randn(1, 2, 32, 40) * 20, 7), 7)
    ddf, inv = utils.exp_velocity(v, 12), utils.exp_velocity(-v, 12)
    assert (utils.jacobian_det(ddf) > 0).all() and ddf.abs().max() > 2  # a few pixels
    assert utils.compose(ddf, inv).abs().mean() < 0.05 * ddf.abs().max()  # inverse up to interpolation
    assert torch.allclose(utils.jacobian_det(zero), torch.ones(2, 32, 40))
    # landmarks through a constant field on a half-resolution grid, in frame voxels
    half = torch.zeros(1, 2, 32, 40)
    half[:, 0] = 1.5  # 1.5 pooled voxels = 3 frame voxels
    pts = np.array([[10.0, 12.0], [40.0, 70.0]])
    np.testing.assert_allclose(utils.displace_points(half, pts, FRAME_2D["shape"]), pts + [3.0, 0.0], atol=1e-6)
    assert utils.pool(torch.ones(3, 64, 80), 4, 2).shape == (3, 16, 20)
    affine = utils.frame_affine(2, FRAME_2D)
    np.testing.assert_allclose(affine, [[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_models_in_2d():
    torch.manual_seed(0)
    vq = VQAE(channels=(8, 16, 16), strides=(2, 2, 1), num_codes=16, spatial_dims=2)
    x = torch.rand(2, 2, 32, 40)
    logits, _, ids = vq(x)
    assert logits.shape == (2, 4, 32, 40) and ids.shape == (2, 8, 10)
    assert vq.decode_pair(ids, (32, 40))[0].shape == (2, 32, 40)
    net = RegistrationNet(channels=(4, 8, 8), strides=(2, 2), pool_strides=(2, 1, 1), exp_at="velocity",
                          exp_coarsen=2, spatial_dims=2)
    ddf, inv = net(x[:, :1], x[:, 1:])
    assert ddf.shape == (2, 2, 32, 40)
    assert utils.compose(ddf, inv).abs().mean() < 0.05 * ddf.abs().max() + 1e-4  # inverse consistent by construction
    tt = TokenTransformer(num_codes=16, seq_len=80, dim=16, layers=1, heads=2, ff=16, grid_shape=(8, 10), group=3)
    blocks = tt.blocks_of(ids.flatten(1), tt.mask_id)
    assert blocks.shape == (2, 12, 9) and torch.equal(tt.tokens_of(blocks), ids.flatten(1))
    assert torch.equal(blocks[0, 0], ids[0, :3, :3].reshape(-1))  # a block is a 3x3 patch of the grid
    assert tt(ids.flatten(1)).shape == (2, 80, 16)


def test_every_stage_in_2d(brains, tmp_path):
    """VQ-AE -> tokens -> diffusion -> synthesis -> registration (+ augmentation) -> evaluation, on
    the 2D JSON, each script's main() with a user's command line (in this process: seconds, not
    an import of torch per script); 2D outputs with their 2D frame."""
    import importlib

    js, _ = brains
    t = tmp_path
    steps = [
        ("train_vqae.py", 2, "--preset", "demo", "--data", js, "--iters", 4, "--out", t / "vq.pth"),
        ("infer_vqae.py", t / "vq.pth", "--data", js, "--out", t / "tok.pth", "--augment", 1),
        ("train_diffusion.py", 4, t / "tok.pth", "--preset", "demo", "--iters", 2, "--out", t / "diff.pth"),
        ("synthesise.py", 3, "--preset", "demo", "--diffusion", t / "diff.pth", "--vqae", t / "vq.pth", "--out", t / "synth"),
        ("deform_pairs.py", "deformed", js, 2, "--preset", "demo", "--out", t / "deformed"),
        ("train_registration.py", 2, t / "synth", "--preset", "demo", "--iters", 2, "--out", t / "reg.pth"),
        ("train_registration.py", 2, js, "--preset", "demo", "--iters", 2, "--out", t / "aug.pth", "--augment"),
        ("evaluate_registration.py", 1, t / "reg.pth", "--data", js, "--out", t / "eval", "--disp", t / "disp"),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for script, *argv in steps:
            importlib.import_module(script.removesuffix(".py")).main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    tokens = utils.read_tokens(str(t / "tok.pth"))
    assert tokens["grid_shape"] == (10, 10) and utils.spatial_dims(tokens["frame"]) == 2  # 80x80 frame, stride 8
    img = nib.load(str(t / "synth" / "case_0000_1.nii.gz"))
    assert img.shape == (80, 80) and np.allclose(img.affine, np.eye(4))
    assert nib.load(str(t / "deformed" / "case_0000_2.nii.gz")).shape == (80, 80)
    summary = json.load(open(t / "eval.json"))
    assert summary["num_pairs"] == 2 and np.isfinite(summary["tre_net_mean"])
    for pair in utils.find_pairs(js, "val"):  # on the fixed image's grid, 2 components
        assert nib.load(evaluate_registration.disp_path(str(t / "disp"), pair)).shape == (*nib.load(pair.fixed).shape[:2], 2)
    assert RegistrationNet.from_checkpoint(str(t / "aug.pth")).saved["augment"]


def test_a_volume_in_a_2d_json_is_refused(brains, tmp_path, run):
    js, _ = brains
    label = os.path.join(os.path.dirname(js), json.load(open(js))["training"][1]["label"])
    vol = np.zeros((64, 64, 5), np.uint8)  # five slices where the JSON promises 2D images
    vol[20:40, 20:40] = 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "stack.nii.gz"))
    bad = tmp_path / "BAD_dataset.json"
    bad.write_text(json.dumps({"tensorImageSize": {"0": "2D"},
                               "training_paired_images": [{"fixed": "./stack.nii.gz", "moving": label}]}))
    proc = run("train_vqae.py", 2, "--preset", "demo", "--data", bad, "--iters", 1, "--out", tmp_path / "v.pth")
    assert_one_line_error(proc, "stack.nii.gz", "64x64x5", "tensorImageSize 2D")


def test_a_tie_of_2d_and_3d_names_the_2d_image_and_folder_sizes_fit_their_frame(tmp_path):
    with pytest.raises(utils.DataError, match="a.nii.gz: a 2D image among 3D ones"):
        utils.derived_frame([(64, 64), (64, 64, 64)], [(1.0, 1.0), (1.0, 1.0, 1.0)], "data", ["a.nii.gz", "b.nii.gz"])
    with pytest.raises(utils.DataError, match="multiples of 16"):  # folder landmarks are frame voxels
        make_phantoms.make_pairs(str(tmp_path / "p"), 1, size=(100, 120))
