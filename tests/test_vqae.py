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
    return VQAE.build(train_vqae.config_of("demo"))


@pytest.fixture(scope="module")
def pairs(phantoms):
    """The shared phantom pairs (conftest), 4 at 4 mm."""
    return phantoms


@pytest.mark.parametrize("preset,size,grid", [("paper", (32, 32, 48), (2, 2, 3)), ("cpu", (64, 56, 64), (8, 7, 8)),
                                              ("demo", (64, 56, 64), (8, 7, 8))])
def test_shapes_and_token_range(preset, size, grid):
    model = VQAE.build(train_vqae.config_of(preset))
    x = (torch.rand(1, 2, *size) > 0.9).float()
    with torch.no_grad():
        zq, loss, ids = model.encode(x)
        logits = model.decode(zq)
    assert zq.shape == (1, model.code_dim, *grid) and ids.shape == (1, *grid)
    assert logits.shape == (1, 4, *size) and loss.ndim == 0
    assert ids.min() >= 0 and ids.max() < model.num_codes and ids.dtype == torch.long
    assert model.token_grid(utils.grid_shape(4)) == (8, 7, 8) or preset == "paper"
    if preset == "paper":
        assert model.token_grid(utils.grid_shape(1)) == (16, 13, 16) and model.num_codes == 1024
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
    """||sg[z_q] - z||^2 + 0.25 ||z_q - sg[z]||^2: equal values, gradients split 1 : 0.25."""
    model = tiny()
    z = torch.randn(1, model.code_dim, 2, 2, 2, requires_grad=True)
    zq, loss, ids = model.quantise(z)
    e = model.codebook(ids).movedim(-1, 1)
    assert torch.allclose(zq, e, atol=1e-6)
    assert torch.allclose(loss, 1.25 * ((z - e) ** 2).mean(), rtol=1e-5)
    loss.backward()
    gz = z.grad.abs().sum()
    ge = model.codebook.weight.grad.abs().sum()
    assert torch.allclose(ge, 0.25 * gz, rtol=1e-4)


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
    ids = utils.find_pairs(pairs)
    full = train_vqae.load_data(pairs, 4)
    data = full[..., 16:48, 12:36, 16:48]  # a central 32x24x32 block: 8x faster, still vessels
    torch.manual_seed(0)
    before = tiny().reconstruct(data)[1].mean()
    ck = str(tmp_path / "vq.pth")
    model = train_vqae.train(data=data, out=ck, preset="demo", batch_size=2, iters=60, val=data[:1], device="cpu")
    tok, dice, probs = model.reconstruct(data, keep_probs=True)
    assert dice.mean() > before + 0.15, (before, dice)
    assert os.path.exists(ck[:-4] + ".csv") and os.path.exists(ck[:-4] + ".png")
    # tokens -> decode_tokens gives the same reconstruction as encode -> decode
    loaded = VQAE.from_checkpoint(ck, device=torch.device("cpu"))
    assert loaded.config == train_vqae.config_of("demo")
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
    utils.save_checkpoint(str(d / "demo.pth"), "vqae", train_vqae.config_of("demo"), tiny().state_dict())
    utils.save_checkpoint(str(d / "broken.pth"), "vqae", train_vqae.config_of("demo"), {"x": torch.zeros(1)})
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
