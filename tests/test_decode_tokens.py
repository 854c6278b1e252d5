"""decode_tokens.py: the reference token list's case mapping, and a TokenDecoder that must learn a
known block pattern from a hand-made token file."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import decode_tokens
import utils
from conftest import assert_one_line_error
from models import TokenDecoder

GRID = (4, 4, 4)  # an 8 mm frame (32x26x32) in blocks of 8 voxels, cropped along the second axis
N = 16  # pairs with volumes
CODES = 8  # codes 0, 2: a vessel block; 1, 3-7 empty (sparse, like vessels)
SHIFT = 2  # moving = fixed shifted by 2 voxels (16 mm) along the first axis: a motion the decoder can carry


def test_reference_token_list_maps_to_its_cases(tmp_path):
    ref = [torch.full((3328,), i, dtype=torch.int16) for i in range(97)]  # entry i holds code i
    torch.save(ref, tmp_path / "ref.pth")
    d = utils.read_tokens(str(tmp_path / "ref.pth"))
    ids = d["case_ids"]
    assert len(ids) == 97 and ids[0] == "case_000" and ids[2] == "case_003" and ids[96] == "case_103"
    assert ids[30:40] == [f"case_{i:03d}" for i in range(32, 42)]  # the 10 shared training pairs
    assert not {"case_002", "case_008", "case_054", "case_055", "case_056", "case_094", "case_097"} & set(ids)
    assert int(d["tokens"][33, 0]) == 33 and d["grid_shape"] == (16, 13, 16)  # rows stay in file order
    torch.save(ref[:5], tmp_path / "five.pth")  # another list: grids named by position
    assert utils.read_tokens(str(tmp_path / "five.pth"))["case_ids"] == [f"grid_{i:03d}" for i in range(5)]


def test_shared_reference_tokens_have_the_training_cases(shared_data):
    path = os.path.join(shared_data, "paper_tokens_97.pth")
    if not os.path.exists(path):
        pytest.skip("paper_tokens_97.pth not in ../shared")
    ids = utils.read_tokens(path)["case_ids"]
    pairs = utils.pair_ids(os.path.join(shared_data, "dilated_vessels_10"))
    assert ids[30:40] == pairs  # cases 032-041
    val = set(utils.pair_ids(os.path.join(shared_data, "dilated_vessels_val")))
    assert not val & set(ids)  # no validation case is among the reference's training grids


def block_pair(grid):
    """A token grid's known pair (2, ...): fixed = each vessel token's 8x8x8 block, moving = fixed
    rolled by SHIFT voxels along the first axis, i.e. moving(y) = fixed(y + ddf) with ddf = -SHIFT."""
    v = ((grid % 2 == 0) & (grid < 4)).float()
    size = utils.grid_shape(8, utils.LUNG250M4B)
    fixed = v.repeat_interleave(8, 0).repeat_interleave(8, 1).repeat_interleave(8, 2)[:size[0], :size[1], :size[2]]
    return torch.stack([fixed, fixed.roll(SHIFT, 0)])


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """16 pairs made from their token grids' pattern (block_pair) and one more grid without volumes, decoded by
    the demo decoder at 8 mm (a cheaper frame grid; the method is the same) with a 2-fold check
    (8 fitted pairs, as the real check; with 4 the decoder memorises them through their context)."""
    root = tmp_path_factory.mktemp("blocks")
    data = root / "pairs"
    data.mkdir()
    grids = torch.randint(CODES, (N + 1, *GRID), generator=torch.Generator().manual_seed(0))
    cases = [f"case_{i:03d}" for i in range(N + 1)]
    for case, g in zip(cases[:N], grids):
        for k, v in enumerate(block_pair(g)):
            utils.write_nifti(str(data / f"{case}_{k + 1}.nii.gz"), v, 8, utils.LUNG250M4B)
    tokens = str(root / "tokens.pth")
    utils.write_tokens(tokens, grids, cases, CODES, {"factor": 8, "frame": utils.LUNG250M4B})
    out = root / "decoded"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(decode_tokens.PRESETS, "demo", dict(decode_tokens.PRESETS["demo"], factor=8))
        manifest = decode_tokens.run(tokens, str(data), str(out), "demo", iters=500, folds=2)

        def no_fit(*args, **kwargs):
            raise AssertionError("a finished run fitted again")
        mp.setattr(decode_tokens, "fit", no_fit)
        again = decode_tokens.run(tokens, str(data), str(out), "demo", iters=500, folds=2)
    return tokens, data, out, manifest, grids, again


def test_decoder_learns_a_known_block_pattern(decoded):
    tokens, data, out, manifest, grids, _ = decoded
    assert len(manifest["folds"]) == 2 and manifest["fitted"] == [f"case_{i:03d}" for i in range(N)]
    # pairs it never saw, from their grids alone; filling every block would give Dice ~0.4
    assert manifest["fold_mean"]["dice_fixed"] > 0.9 and manifest["fold_mean"]["dice_moving"] > 0.9, manifest
    for f in manifest["folds"]:  # fixed and moving stay as different as the real pairs, their motion kept
        assert abs(f["dice_fm"] - f["real_dice_fm"]) < 0.1 and 0.7 < f["kept"] < 1.3, f
    assert manifest["tokens_sha256"] == utils.sha256(tokens) and manifest["complete"]
    ids, pairs = utils.load_pairs(str(out), 8, utils.LUNG250M4B)
    assert ids == [f"case_{i:03d}" for i in range(N + 1)] and pairs.shape == (N + 1, 2, 32, 26, 32)
    assert utils.dice(pairs[N, 1], block_pair(grids[N])[1]) > 0.85  # the grid without volumes
    img = nib.load(str(out / f"case_{N:03d}_2.nii.gz"))
    assert np.allclose(img.affine, utils.frame_affine(8, utils.LUNG250M4B)) and os.path.exists(out / "preview.png")
    model = TokenDecoder.from_checkpoint(str(out / "decoder.pth"), torch.device("cpu"))
    assert model.saved["precision"] == "fp32"  # every checkpoint records its arithmetic
    assert model(grids[:1]).shape == (1, 2, 32, 32, 32)  # 3 upsamplings of 4x4x4, cropped when written
    with torch.no_grad():  # the unseen grid's motion: -SHIFT along the first axis, none along the others
        ddf = utils.crop_to(model.logits_and_motion(grids[N:])[1], pairs.shape[2:]).mean((0, 2, 3, 4))
    assert -SHIFT - 0.5 < float(ddf[0]) < -SHIFT / 2 and float(ddf[1:].abs().max()) < 0.5, ddf


def test_decode_tokens_resumes_and_refuses_other_settings(decoded, run, tmp_path):
    tokens, data, out, manifest, _, again = decoded
    assert again["folds"] == manifest["folds"] and again["fitted_all"] and again["complete"]  # nothing refitted
    p = run("decode_tokens.py", tokens, "--data", data, "--out", out, "--preset", "demo", "--iters", 5)
    assert_one_line_error(p, str(out), "iters")
    other = tmp_path / "other"  # pairs, but none with a grid in the token file
    other.mkdir()
    for k in (1, 2):
        os.symlink(data / f"case_000_{k}.nii.gz", other / f"case_100_{k}.nii.gz")
    p = run("decode_tokens.py", tokens, "--data", other, "--out", tmp_path / "o", "--preset", "demo")
    assert_one_line_error(p, str(other), "token grid")
    p = run("decode_tokens.py", tokens, "--data", data, "--out", tmp_path / "o", "--folds", 1)
    assert_one_line_error(p, "--folds")


def test_generator_on_a_token_file_synthesises_through_its_decoder(decoded, run, tmp_path):
    """train_diffusion.py --decoder (tokens without a VQ-AE) -> synthesise.py decodes by the token
    decoder by default: occupancy pairs on the decoder's frame grid, codes only from the grids."""
    import synthesise
    import train_diffusion

    tokens, _, out, _, grids, _ = decoded
    ckpt = str(tmp_path / "diff.pth")
    train_diffusion.main(["4", tokens, "--preset", "demo", "--iters", "3", "--out", ckpt,
                          "--decoder", str(out / "decoder.pth")])
    synth = tmp_path / "synth"
    synthesise.main(["3", "--diffusion", ckpt, "--out", str(synth), "--batch", "2"])
    manifest = utils.read_json(str(synth / "manifest.json"))
    assert manifest["token_decoder"] == str(out / "decoder.pth") and "vqae" not in manifest and manifest["complete"]
    ids, pairs = utils.load_pairs(str(synth), 8, utils.LUNG250M4B)
    assert len(ids) == 3 and pairs.shape == (3, 2, 32, 26, 32) and 0 <= float(pairs.min()) and float(pairs.max()) <= 1
    assert np.allclose(nib.load(str(synth / "case_0000_1.nii.gz")).affine, utils.frame_affine(8, utils.LUNG250M4B))
    p = run("synthesise.py", 2, "--diffusion", ckpt, "--out", tmp_path / "s2", "--no-calibrate")
    assert_one_line_error(p, "--calibrate")
    p = run("synthesise.py", 2, "--diffusion", ckpt, "--out", tmp_path / "s2", "--vqae", ckpt, "--decoder", ckpt)
    assert_one_line_error(p, "--decoder")
    assert not os.path.exists(tmp_path / "s2")


@pytest.mark.parametrize("preset", sorted(decode_tokens.PRESETS))
def test_every_preset_decodes_the_reference_grids_on_meta(preset):
    """Each preset's decoder on the reference's 16x13x16 grids: a training step with no tensor on the
    CPU (CUDA readiness) and logits covering its frame grid."""
    meta = torch.device("meta")
    cfg = decode_tokens.config_of(preset, utils.REFERENCE_TOKENS)
    model = TokenDecoder.build(cfg).to(meta)
    size = utils.grid_shape(cfg["factor"], utils.LUNG250M4B)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    grids = torch.zeros(2, *utils.REFERENCE_TOKENS["grid_shape"], dtype=torch.long, device=meta)
    motion = torch.zeros(2, 3, *size, device=meta) if model.motion else None
    loss = decode_tokens.decoder_step(model, opt, scaler, grids, torch.zeros(2, 2, *size, device=meta), 4.0, motion)
    assert loss.device == meta
    assert all(a >= b for a, b in zip(model(grids).shape[2:], size))


def test_motion_decoder_warps_its_fixed_map():
    """TokenDecoder(motion=True): the moving logits are the fixed ones sampled at y + ddf(y)."""
    torch.manual_seed(0)
    model = TokenDecoder(num_codes=CODES, embed=8, width=8, blocks=1, up_channels=(8,), motion=True).eval()
    ids = torch.randint(CODES, (1, *GRID))
    with torch.no_grad():
        assert float(model.logits_and_motion(ids)[1].abs().max()) == 0  # training starts from no motion
        model.flow.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))
        logits, ddf = model.logits_and_motion(ids)
    assert logits.shape == (1, 2, 8, 8, 8) and ddf.shape == (1, 3, 8, 8, 8)
    assert torch.allclose(logits[0, 1, :6], logits[0, 0, 2:], atol=1e-5)  # 2 voxels along the first axis
