"""VQAE (models.py), train_vqae.py and infer_vqae.py."""
import os

import pytest
import torch

import infer_vqae
import train_vqae
import utils
from conftest import assert_one_line_error
from models import VQAE


def tiny():
    return VQAE.build(train_vqae.config_of("demo", utils.LUNG250M4B))


@pytest.fixture(scope="module")
def pairs(phantoms):
    """The shared phantom pairs (conftest), 4 at 4 mm."""
    return phantoms


@pytest.mark.parametrize("preset,size,grid", [("paper", (32, 32, 48), (2, 2, 3)), ("cpu", (64, 56, 64), (8, 7, 8)),
                                              ("demo", (64, 56, 64), (8, 7, 8))])
def test_shapes_and_token_range(preset, size, grid):
    model = VQAE.build(train_vqae.config_of(preset, utils.LUNG250M4B))
    x = (torch.rand(1, 2, *size) > 0.9).float()
    with torch.no_grad():
        zq, loss, ids = model.encode(x)
        logits = model.decode(zq)
    assert zq.shape == (1, model.code_dim, *grid) and ids.shape == (1, *grid)
    assert logits.shape == (1, 4, *size) and loss.ndim == 0
    assert ids.min() >= 0 and ids.max() < model.num_codes and ids.dtype == torch.long
    assert model.token_grid(utils.grid_shape(4, utils.LUNG250M4B)) == (8, 7, 8) or preset == "paper"
    if preset == "paper":
        assert model.token_grid(utils.grid_shape(1, utils.LUNG250M4B)) == (16, 13, 16) and model.num_codes == 1024
        assert model.code_dim == 384 and 10.2e6 < sum(p.numel() for p in model.ae.parameters()) < 10.4e6
        cb = model.codebook.weight
        assert cb.abs().max() <= 1 / 1024 and cb.std() > 0.3 / 1024  # uniform(+-1/K)


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = tiny()
    x = (torch.rand(1, 2, 32, 24, 32) > 0.8).float()
    logits, cb, _ = model(x)
    logits[:, 1].mean().backward()  # the reconstruction alone (no codebook loss)
    g = model.ae.encode[0].conv.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert model.codebook.weight.grad is None or model.codebook.weight.grad.abs().sum() == 0


def test_codebook_loss_terms():
    """||sg[z_q] - z||^2 + 0.25 ||z_q - sg[z]||^2: equal values, gradients split 1 : 0.25 - each
    code's gradient is -0.25 x the sum of the encoder-output gradients of the tokens that chose it
    (exact also when two tokens share a code)."""
    torch.manual_seed(0)
    model = tiny()
    z = torch.randn(1, model.code_dim, 2, 2, 2, requires_grad=True)
    zq, loss, ids = model.quantise(z)
    e = model.codebook(ids).movedim(-1, 1)
    assert torch.allclose(zq, e, atol=1e-6)
    assert torch.allclose(loss, 1.25 * ((z - e) ** 2).mean(), rtol=1e-5)
    loss.backward()
    per_token = z.grad.movedim(1, -1).reshape(-1, model.code_dim)
    expected = torch.zeros_like(model.codebook.weight).index_add_(0, ids.flatten(), -0.25 * per_token)
    scale = float(per_token.abs().max())
    assert torch.allclose(model.codebook.weight.grad, expected, rtol=0, atol=1e-5 * scale)


def test_restart_moves_dead_codes_onto_encoder_outputs():
    model = tiny()
    model.train()
    model.encode((torch.rand(1, 2, 32, 24, 32) > 0.8).float())
    dead = torch.zeros(model.num_codes, dtype=torch.bool)
    dead[:5] = True
    before = model.codebook.weight.detach().clone()
    assert model.restart_codes(dead) == 5
    d = (model.codebook.weight[:5, None] - model.last_z[None]).abs().amax(-1)  # (5, N)
    assert d.min(1).values.max() < 1e-6  # each restarted code now equals an encoder output
    assert torch.equal(model.codebook.weight[5:], before[5:])  # live codes untouched


def test_training_on_phantoms_raises_dice_and_tokens_round_trip(pairs, tmp_path):
    ids = utils.pair_ids(pairs)
    full = train_vqae.load_data(pairs, 4, utils.LUNG250M4B)
    data = full[..., 16:48, 12:36, 16:48]  # a central 32x24x32 block: 8x faster, still vessels
    torch.manual_seed(0)
    before = tiny().reconstruct(data)[1].mean()
    ck = str(tmp_path / "vq.pth")
    model = train_vqae.train(data=data, out=ck, preset="demo", batch_size=2, iters=60, val=data[:1], device="cpu")
    tok, dice, probs = model.reconstruct(data, keep_probs=True)
    assert dice.mean() > before + 0.1, (before, dice)  # a trajectory: a margin for other CPUs' rounding
    assert os.path.exists(ck[:-4] + ".csv") and os.path.exists(ck[:-4] + ".png")
    # tokens -> decode_tokens gives the same reconstruction as encode -> decode
    loaded = VQAE.from_checkpoint(ck, device=torch.device("cpu"))
    assert loaded.config == train_vqae.config_of("demo", utils.LUNG250M4B)
    with torch.no_grad():
        fp, mp = VQAE.pair_probs(loaded.decode_tokens(tok.reshape(len(tok), -1), tok.shape[1:]), data.shape[-3:],
                                 calibrate=True)
    assert torch.allclose(torch.stack([fp, mp], 1), probs, atol=1e-4)
    assert torch.equal(loaded.reconstruct(data)[0], tok)
    # stage 2 script: token file + augmented copies
    out = str(tmp_path / "tok.pth")
    res = infer_vqae.infer(ck, pairs, out, augment_k=2)  # whole 64x52x64 volumes -> 8x7x8
    t = torch.load(out)
    n = len(ids)
    assert t["tokens"].dtype == torch.int16 and t["tokens"].shape == (3 * n, 448) and t["grid_shape"] == (8, 7, 8)
    assert t["case_ids"][n:n + 2] == [ids[0] + "_aug00", ids[0] + "_aug01"] and t["config"]["preset"] == "demo"
    assert torch.equal(t["tokens"][:n].long(), loaded.reconstruct(full)[0].reshape(n, -1))
    assert res["dice"].shape == (3 * n, 2)
    assert not torch.equal(t["tokens"][n], t["tokens"][0])  # an augmented copy differs
    # resume with another preset's config is refused in one line
    with pytest.raises(utils.DataError, match="another preset"):
        train_vqae.train(data=data, out=ck, preset="cpu", batch_size=2, iters=1, resume=True)


def test_bad_inputs_are_one_line_errors(run, pairs, tmp_path):
    """As a user sees them: one `error:` line, exit 2, no traceback."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "case_001_1.nii.gz").write_bytes(b"not a nifti")
    (bad / "case_001_2.nii.gz").write_bytes(b"not a nifti")
    assert_one_line_error(run("train_vqae.py", "2", "--preset", "demo", "--data", bad, "--out", tmp_path / "a.pth"),
                          "case_001_1.nii.gz")
    other = tmp_path / "other.pth"
    utils.save_checkpoint(str(other), "registration", {}, {})
    assert_one_line_error(run("infer_vqae.py", other, "--data", pairs, "--out", tmp_path / "t.pth"), "vqae")


@pytest.fixture(scope="module")
def bad_files(pairs, tmp_path_factory):
    """A half pair, a truncated file, a demo checkpoint, one with wrong weights, an existing output."""
    d = tmp_path_factory.mktemp("bad")
    (d / "half").mkdir()
    os.link(os.path.join(pairs, "case_000_1.nii.gz"), d / "half" / "case_000_1.nii.gz")
    (d / "trunc.pth").write_bytes(b"\x80\x02garbage")
    utils.save_checkpoint(str(d / "demo.pth"), "vqae", train_vqae.config_of("demo", utils.LUNG250M4B), tiny().state_dict())
    utils.save_checkpoint(str(d / "broken.pth"), "vqae", train_vqae.config_of("demo", utils.LUNG250M4B), {"x": torch.zeros(1)})
    (d / "exists.pth").write_bytes(b"x")
    return d


@pytest.mark.parametrize("script, argv, match", [
    (train_vqae, ["2", "--preset", "demo", "--data", "{d}/half", "--out", "{d}/b.pth"], "missing"),
    (train_vqae, ["0", "--preset", "demo", "--data", "{pairs}", "--out", "{d}/c.pth"], "BATCH_SIZE must be >= 1"),
    (train_vqae, ["2", "--preset", "demo", "--iters", "-5", "--data", "{pairs}", "--out", "{d}/c.pth"], "--iters"),
    (train_vqae, ["2", "--preset", "demo", "--data", "{pairs}", "--out", "{d}/exists.pth"], "exists"),
    (infer_vqae, ["{d}/trunc.pth", "--data", "{pairs}"], "trunc.pth"),
    (infer_vqae, ["{d}/demo.pth", "--preset", "cpu", "--data", "{pairs}", "--out", "{d}/t.pth"], "'demo'"),
    (infer_vqae, ["{d}/demo.pth", "--data", "{pairs}", "--out", "{d}/exists.pth"], "exists"),
    (infer_vqae, ["{d}/broken.pth", "--data", "{pairs}", "--out", "{d}/u.pth"], "weights"),
])
def test_refusals(bad_files, pairs, script, argv, match):
    with pytest.raises(utils.DataError, match=match):
        script.main([a.format(d=bad_files, pairs=pairs) for a in argv])


def test_difference_weighted_loss_by_hand():
    """Two voxels, soft targets: fixed (1, 0), moving (1, 1); only voxel 2 differs (|f - m| = 1)."""
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 2, 2, 1, 1)
    logits = torch.zeros(1, 4, 2, 1, 1)  # every softmax 0.5: CE = ln 2 per class weight
    w0, w1 = VQAE.CLASS_WEIGHTS
    ce_fixed = torch.tensor([w1, w0]) * torch.log(torch.tensor(2.0))  # per voxel (targets vessel, background)
    ce_moving = torch.tensor([w1, w1]) * torch.log(torch.tensor(2.0))
    plain = 0.5 * ce_fixed.mean() + 0.5 * ce_moving.mean()
    assert train_vqae.recon_loss(logits, x, True) == pytest.approx(float(plain))
    v = torch.tensor([1.0, 1.0 + 3.0])  # 1 + W |f - m| with W = 3
    weighted = 0.5 * (ce_fixed * v).mean() / v.mean() + 0.5 * (ce_moving * v).mean() / v.mean()
    assert train_vqae.recon_loss(logits, x, True, 3.0) == pytest.approx(float(weighted))
    assert float(weighted) != pytest.approx(float(plain))
    same = torch.stack([x[:, 1], x[:, 1]], 1)  # a pair without any difference: the weight changes nothing
    assert train_vqae.recon_loss(logits, same, True, 3.0) == pytest.approx(float(train_vqae.recon_loss(logits, same, True)))
    hard = train_vqae.recon_loss(logits, x, False, 3.0)  # binary (1 mm) targets take the same path
    assert torch.isfinite(hard)


def test_deformation_kept_tells_a_kept_from_a_lost_deformation():
    f = torch.zeros(64, 52, 64)
    f[20:44, 24:28, 10:54], f[30:34, 10:42, 10:54] = 1, 1
    real = torch.stack([f, torch.roll(f, 2, dims=0)])[None]  # moving = fixed shifted by 8 mm
    kept, dice_fm, real_fm = utils.deformation_kept(real, real.clone(), 4)
    assert kept == pytest.approx(1.0) and dice_fm == pytest.approx(real_fm)
    lost, dice_lost, _ = utils.deformation_kept(real, torch.stack([f, f])[None], 4)  # the same tree twice
    assert lost < 0.2 and dice_lost == 1.0


def test_vqae_logs_deformation_kept_and_the_report_adds_reconstructions(pairs, tmp_path, monkeypatch):
    import realism_report

    monkeypatch.setitem(train_vqae.PRESETS, "demo", dict(train_vqae.PRESETS["demo"], val_every=2, ckpt_every=2))
    out = str(tmp_path / "v.pth")
    train_vqae.train(data=pairs, val=pairs, out=out, preset="demo", batch_size=1, iters=2, diff_weight=2.0)
    ck = utils.load_checkpoint(out, "vqae")
    row = ck["log"][-1]
    assert ck["diff_weight"] == 2.0
    assert 0 <= row["train_disp_kept"] and 0 <= row["val_dice_fm"] <= 1
    with pytest.raises(utils.DataError, match="diff_weight 2.0 -> 1.0"):
        train_vqae.train(data=pairs, out=out, preset="demo", batch_size=1, iters=2, resume=True, diff_weight=1.0)
    groups, text = realism_report.report([], pairs, str(tmp_path / "r"), vqae=out)
    name = os.path.basename(pairs)
    assert list(groups) == [f"real {name}", f"recon {name}"] and "VQ-AE keeps" in text
    assert open(tmp_path / "r.md").read().strip() == text
