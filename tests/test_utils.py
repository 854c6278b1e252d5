"""The shared layer: frame, TRE convention, metrics, checkpoints."""
import numpy as np
import pytest
import torch

import evaluate_registration
import utils


@pytest.mark.parametrize("shape, offset", [
    ((320, 250, 353), (-32, -29, -49)),   # larger than the frame in every axis (cropped)
    ((268, 188, 451), (-6, 2, -98)),      # case_035-like: oversize along k, undersize along j
    ((200, 150, 200), (28, 21, 28)),      # smaller than the frame (padded)
])
def test_frame_formula(shape, offset):
    # offsets worked out by hand from the data README: h1 = (352 - H)//2 - 48, w1 = (256 - W)//2 - 32, ...
    vol = torch.zeros(shape)
    p = np.array([120, 100, 130])
    vol[tuple(p)] = 1
    framed = utils.to_frame(vol, utils.LUNG250M4B)
    assert framed.shape == tuple(utils.LUNG250M4B['shape'])
    q = np.argwhere(framed.numpy() == 1)
    assert q.tolist() == [list(p + np.array(offset))]


def test_framed_volume_reads_scans_and_pooled_maps(tmp_path):
    scan = np.zeros((300, 230, 320), np.uint8)
    scan[140:160, 100:120, 150:170] = 2  # label 2 counts as vessel
    utils.write_nifti(tmp_path / "scan.nii.gz", scan, 1, utils.LUNG250M4B)
    v1 = utils.framed_volume(str(tmp_path / "scan.nii.gz"), 1, utils.LUNG250M4B)
    assert v1.shape == tuple(utils.LUNG250M4B['shape']) and v1.max() == 1 and v1.sum() == 20 ** 3
    v4 = utils.framed_volume(str(tmp_path / "scan.nii.gz"), 4, utils.LUNG250M4B)
    assert v4.shape == (64, 52, 64) and abs(float(v4.sum()) * 64 - 20 ** 3) < 1e-3  # occupancy preserved
    soft = np.full((64, 52, 64), 0.3, np.float32)
    utils.write_nifti(tmp_path / "soft.nii.gz", soft, 4, utils.LUNG250M4B)
    s = utils.framed_volume(str(tmp_path / "soft.nii.gz"), 4, utils.LUNG250M4B)
    assert torch.allclose(s, torch.tensor(0.3))  # probability maps stay soft
    with pytest.raises(utils.DataError, match="frame/4 but frame/2"):
        utils.framed_volume(str(tmp_path / "soft.nii.gz"), 2, utils.LUNG250M4B)


def test_tre_convention_on_known_translation():
    rng = np.random.default_rng(0)
    fixed = rng.uniform(20, 180, (50, 3))
    shift = np.array([6.0, -4.0, 8.0])  # moving = fixed + shift (mm = frame voxels)
    moving = fixed + shift
    assert np.allclose(utils.tre(None, fixed, moving, utils.LUNG250M4B), np.linalg.norm(shift))
    for factor in (1, 4):  # the field is in voxels of its own grid: shift / factor
        size = utils.grid_shape(factor, utils.LUNG250M4B) if factor > 1 else (32, 26, 32)
        f = factor if factor > 1 else 8
        ddf = torch.tensor(shift / f, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *size).contiguous()
        for direction in utils.TRE_DIRECTIONS:  # a constant field: both directions, both samplings agree
            assert np.allclose(utils.tre((ddf, -ddf), fixed, moving, utils.LUNG250M4B, direction), 0, atol=1e-4)
            assert np.allclose(utils.tre((ddf * 0.5, -ddf * 0.5), fixed, moving, utils.LUNG250M4B, direction),
                               np.linalg.norm(shift) / 2, atol=1e-4)


def test_tre_directions_differ_by_the_reference_sampling():
    """A field varying along i: the reference samples ddf_inv at p - 0.5 (1 mm voxels), so its TRE
    differs from exact sampling by the field's slope x 0.5 voxel; `fixed` maps the other landmarks."""
    size = (64, 52, 64)  # 4 mm grid
    i = torch.arange(size[0], dtype=torch.float32)
    inv = torch.zeros(1, 3, *size)
    inv[0, 0] = (0.02 * i).view(-1, 1, 1)  # u_i(x) = 0.02 * (4 mm voxel index) in 4 mm voxels
    moving = np.array([[100.0, 80.0, 120.0]])
    fixed = utils.displace_points(inv, moving, utils.LUNG250M4B['shape'])  # exact: where ddf_inv sends the moving landmark
    ref = utils.tre((torch.zeros_like(inv), inv), fixed, moving, utils.LUNG250M4B, "reference")
    assert abs(ref[0] - 0.02 * 0.5) < 1e-4  # slope 0.02 mm per mm x the half-voxel (0.5 mm) offset
    assert utils.tre((-inv, inv), moving, moving, utils.LUNG250M4B, "fixed")[0] > 0.1


def test_summary_dice_and_jacobian():
    s = evaluate_registration.summary([1, 2, 3, 4, 5])
    assert s == {"mean": 3.0, "p25": 2.0, "p50": 3.0, "p75": 4.0}
    a = torch.zeros(10, 10, 10)
    a[:5] = 1
    b = torch.zeros(10, 10, 10)
    b[2:7] = 1
    assert utils.dice(a, b) == pytest.approx(0.6)
    ident = torch.zeros(1, 3, 12, 12, 12)
    fold_pct, std = evaluate_registration.jacobian_stats(ident)
    assert fold_pct == 0.0 and std < 1e-5
    fold = ident.clone()
    fold[0, 0] = -2 * torch.arange(12.0).view(12, 1, 1)  # x -> -x: det < 0 everywhere
    assert evaluate_registration.jacobian_stats(fold)[0] == 100.0


def test_warp_compose_and_resize():
    ddf = torch.zeros(1, 3, 16, 16, 16)
    ddf[:, 0] = 2.0
    img = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 1, 16, 16, 16)
    assert torch.allclose(utils.warp(img, ddf)[0, 0, 4:10], img[0, 0, 6:12])  # samples at x + 2
    assert torch.allclose(utils.compose(ddf, ddf)[:, 0, 2:10], torch.tensor(4.0))
    big = utils.resize_ddf(ddf, (32, 32, 32))
    assert torch.allclose(big[:, 0], torch.tensor(4.0))  # same physical shift in finer voxels


def test_warp_and_exp_match_monai():
    """utils.warp / exp_velocity are grid_sample written out for speed; they must equal MONAI's."""
    from monai.networks.blocks import DVF2DDF, Warp
    g = torch.Generator().manual_seed(0)
    img, ddf = torch.rand(2, 2, 9, 7, 11, generator=g), torch.randn(2, 3, 9, 7, 11, generator=g) * 3
    assert torch.allclose(utils.warp(img, ddf), Warp("bilinear", "border")(img, ddf), atol=1e-5)
    assert torch.equal(utils.warp(img, ddf.round(), nearest=True), Warp("nearest", "zeros")(img, ddf.round()))
    assert torch.allclose(utils.exp_velocity(ddf, 7), DVF2DDF(7, padding_mode="border")(ddf), atol=1e-4)


def test_checkpoints_refuse_other_kind_config_and_truncation(tmp_path):
    p = str(tmp_path / "a.pth")
    utils.save_checkpoint(p, "regnet", {"preset": "cpu", "factor": 4}, {"w": torch.ones(3)})
    assert utils.load_checkpoint(p, "regnet", {"preset": "cpu", "factor": 4})["state"]["w"].sum() == 3
    with pytest.raises(utils.DataError, match="is a 'regnet' checkpoint, expected 'vqae'"):
        utils.load_checkpoint(p, "vqae")
    with pytest.raises(utils.DataError, match="differs in factor"):
        utils.load_checkpoint(p, "regnet", {"preset": "cpu", "factor": 2})
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(utils.DataError, match="truncated or corrupt"):
        utils.load_checkpoint(p, "regnet")
    assert [f.name for f in tmp_path.iterdir()] == ["a.pth"]  # no temporary files left behind


def test_checkpoints_record_their_precision(phantoms, tmp_path):
    """Every training checkpoint says the arithmetic it was trained in (fp32 on the CPU, fp16 on CUDA)."""
    import train_diffusion
    import train_registration
    import train_vqae

    assert utils.precision(torch.device("cuda")) == "fp16" and utils.precision(torch.device("cpu")) == "fp32"
    tokens = str(tmp_path / "t.pth")
    utils.write_tokens(tokens, torch.randint(0, 4, (4, 4, 3, 4)), list("abcd"), 16, {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B})
    runs = {"vqae": (train_vqae, ["1", "--data", phantoms]), "regnet": (train_registration, ["1", phantoms]),
            "diffusion": (train_diffusion, ["2", tokens])}
    for kind, (script, args) in runs.items():
        out = str(tmp_path / f"{kind}.pth")
        script.main(args + ["--preset", "demo", "--iters", "1", "--out", out])
        assert utils.load_checkpoint(out, kind)["precision"] == "fp32"


def test_corrfield_keypoints_move_into_the_frame(tmp_path):
    """tools/corrfield_landmarks.py: original-volume keypoints shifted by the frame offsets, those
    outside the frame dropped, written as landmark files."""
    import nibabel as nib

    from tools import corrfield_landmarks

    shape = (300, 250, 320)
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), np.eye(4)), str(tmp_path / "case_001_1.nii.gz"))
    (tmp_path / "kp").mkdir()
    np.savetxt(tmp_path / "kp" / "case_001.csv", [[100, 120, 130, 101, 121, 131], [0, 0, 0, 1, 1, 1]], delimiter=",")
    corrfield_landmarks.main([str(tmp_path / "kp"), str(tmp_path), str(tmp_path / "lm")])
    fixed, moving = utils.read_landmarks(str(tmp_path / "lm" / "case_001.csv"), utils.LUNG250M4B)
    h1, _, w1, _, d1, _ = utils.frame_pads(shape, utils.LUNG250M4B)
    assert (h1, w1, d1) == (-22, -29, -32)  # this shape is cropped on every axis
    assert fixed.tolist() == [[100 + h1, 120 + w1, 130 + d1]] and moving.tolist() == [[101 + h1, 121 + w1, 131 + d1]]
