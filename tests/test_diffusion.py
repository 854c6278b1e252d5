"""TokenTransformer (absorbing diffusion), train_diffusion.py, synthesise.py, realism_report.py."""
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch

import realism_report
import synthesise
import train_diffusion
import utils
from conftest import assert_one_line_error
from models import VQAE, TokenTransformer

GRID = (8, 7, 8)  # cpu / demo token grid: 64x52x64 padded to 64x56x64, stride 8
TINY_VQAE = dict(channels=[4, 4, 4], strides=[2, 2, 2], num_codes=16, beta=0.25)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: a second thread only adds contention (5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the scripts run as subprocesses
    yield
    torch.set_num_threads(n)


def test_weighted_elbo_hand_checked():
    # K = 4 codes, uniform logits -> CE = ln 4 = 2 bits on every token
    logits = torch.zeros(2, 4, 4)
    x0 = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    masked = torch.tensor([[True, False, True, False], [True, True, True, True]])
    t = torch.tensor([0.25, 1.0])
    got = TokenTransformer.weighted_elbo(logits, x0, masked, t)
    # sample 0: 2 masked tokens x 2 ln 2 x (1 - 0.25) / (ln 2 x 4 tokens) = 0.75; sample 1: weight 1 - t = 0
    assert torch.allclose(got, torch.tensor([0.75, 0.0]))
    # a confident correct prediction on a masked token costs ~0, a wrong one ~its logit margin
    logits[0, 0, 0], logits[0, 2, 1] = 30.0, 30.0  # token 0 right (x0 = 0), token 2 wrong (x0 = 2)
    got = TokenTransformer.weighted_elbo(logits, x0, masked, t)
    expect = (0 + (30 + math.log(1 + 3 * math.exp(-30)))) * 0.75 / (math.log(2) * 4)
    assert got[0].item() == pytest.approx(expect, rel=1e-5)
    # unmasked tokens never count, however wrong
    logits[0, 1, 3] = 50.0
    assert TokenTransformer.weighted_elbo(logits, x0, masked, t)[0].item() == pytest.approx(expect, rel=1e-5)


def test_masking_and_training_loss():
    x0 = torch.randint(0, 16, (3, 4000))
    xt, m = TokenTransformer.mask_tokens(x0, torch.tensor([0.0, 0.3, 1.0]), 16)
    assert not m[0].any() and m[2].all() and abs(m[1].float().mean().item() - 0.3) < 0.03
    assert (xt[m] == 16).all() and torch.equal(xt[~m], x0[~m])
    # loss(): t ~ U{1..256}/256 per sample, then the masks, from the same generator
    model = TokenTransformer(num_codes=16, seq_len=56, dim=16, layers=1, heads=2, ff=32, dropout=0.0).eval()
    x0 = torch.randint(0, 16, (5, 56))
    got = model.loss(x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(1, 257, (5,), generator=g) / 256
    xt, m = TokenTransformer.mask_tokens(x0, t, 16, g)
    assert got.item() == pytest.approx(TokenTransformer.weighted_elbo(model(xt), x0, m, t).mean().item(), rel=1e-6)


@pytest.mark.parametrize("schedule, steps", [("seed", 256), ("cosine", 12), ("linear", 5)])
def test_sampler_unmasks_every_token_once(schedule, steps):
    torch.manual_seed(0)
    model = TokenTransformer(num_codes=16, seq_len=448, dim=16, layers=1, heads=2, ff=32)
    seen, events = [], torch.zeros(3, 448, dtype=torch.long)

    def on_step(k, x):
        prev = seen[-1] if seen else torch.full_like(x, 16)
        was = prev != 16
        assert torch.equal(x[was], prev[was]), f"step {k} changed an unmasked token"
        events.add_(((prev == 16) & (x != 16)).long())
        seen.append(x.clone())

    out = model.sample(3, steps=steps, schedule=schedule, generator=torch.Generator().manual_seed(1), on_step=on_step)
    assert len(seen) == steps and (events == 1).all() and (out < 16).all() and torch.equal(out, seen[-1])
    if schedule == "seed":  # the seed's schedule unmasks ~L/256 tokens per step, not all at once
        per_step = torch.stack([(s != 16).sum() for s in seen]).diff()
        assert per_step.max() < 40
    again = model.sample(3, steps=steps, schedule=schedule, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_attention_runs_on_sdpa_kernels():
    model = TokenTransformer(num_codes=16, seq_len=56, dim=32, layers=1, heads=2, ff=32)
    x = torch.randint(0, 16, (2, 56))

    def kernels(fn):
        with torch.profiler.profile() as p:
            fn()
        return {e.key for e in p.key_averages()}

    assert "aten::scaled_dot_product_attention" in kernels(lambda: model.loss(x).backward())
    no_attn_dropout = TokenTransformer(num_codes=16, seq_len=56, dim=32, layers=1, heads=2, ff=32, attn_dropout=0.0)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in kernels(lambda: no_attn_dropout.loss(x).backward())
    model.eval()
    with torch.no_grad():
        k = kernels(lambda: model(x))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in k and "aten::_native_multi_head_attention" not in k


# ---------------------------------------------------------------------------- files and scripts
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A randomly initialised tiny VQ-AE (grid 8x7x8, 16 codes), a demo-preset transformer for it,
    a token file, and a token file with the paper's grid."""
    d = tmp_path_factory.mktemp("diffusion")
    torch.manual_seed(0)
    vq = VQAE(**TINY_VQAE)
    utils.save_checkpoint(str(d / "vqae.pth"), "vqae", {"preset": "demo", "factor": 4, "model": TINY_VQAE}, vq.state_dict())
    utils.save_checkpoint(str(d / "vqae_b.pth"), "vqae", {"preset": "demo", "factor": 4, "model": TINY_VQAE},
                          VQAE(**TINY_VQAE).state_dict())  # same shapes, other weights
    other = dict(TINY_VQAE, num_codes=32)
    utils.save_checkpoint(str(d / "vqae32.pth"), "vqae", {"preset": "demo", "factor": 4, "model": other},
                          VQAE(**other).state_dict())
    cfg = train_diffusion.model_config("demo", GRID, 16)
    utils.save_checkpoint(str(d / "diff.pth"), "diffusion", cfg, train_diffusion.build(cfg).state_dict())
    tok = {"case_ids": [f"case_{i:03d}" for i in range(6)], "tokens": torch.randint(0, 16, (6, 448), dtype=torch.int16),
           "grid_shape": GRID, "num_codes": 16}
    torch.save(tok, d / "tokens.pth")
    torch.save([torch.randint(0, 1024, (3328,), dtype=torch.int16) for _ in range(3)], d / "paper_list.pth")
    return d


def test_token_files_and_preset_grid(ckpts):
    tokens, grid, codes, ids, _ = train_diffusion.load_tokens(str(ckpts / "paper_list.pth"), "paper")
    assert tokens.shape == (3, 3328) and grid == (16, 13, 16) and codes == 1024 and len(ids) == 3
    with pytest.raises(utils.DataError, match="does not match the 'cpu' preset"):
        train_diffusion.load_tokens(str(ckpts / "paper_list.pth"), "cpu")
    with pytest.raises(utils.DataError, match="16x13x16"):
        train_diffusion.load_tokens(str(ckpts / "tokens.pth"), "paper")


def test_train_then_synthesise(ckpts, run, tmp_path):
    out = tmp_path / "d.pth"
    train_diffusion.main(["2", str(ckpts / "tokens.pth"), "--val", str(ckpts / "tokens.pth"), "--vqae",
                          str(ckpts / "vqae.pth"), "--preset", "demo", "--iters", "3", "--out", str(out)])
    ck = utils.load_checkpoint(str(out), "diffusion")
    assert ck["config"]["grid_shape"] == list(GRID) and ck["config"]["num_codes"] == 16 and ck["iteration"] == 3
    assert os.path.exists(tmp_path / "d.csv") and os.path.exists(tmp_path / "d.png")
    # as a user runs it; the VQ-AE path stored in the checkpoint is the default
    p = run("synthesise.py", 2, "--diffusion", out, "--out", tmp_path / "s", "--steps", 4)
    assert p.returncode == 0, p.stderr
    assert utils.find_pairs(str(tmp_path / "s")) == ["case_0000", "case_0001"]
    with pytest.raises(utils.DataError, match="not the VQ-AE whose tokens trained"):  # same grid, other codebook
        synthesise.main(["1", "--diffusion", str(out), "--vqae", str(ckpts / "vqae_b.pth"), "--out", str(tmp_path / "t")])


def test_synthesise_files_seed_and_resume(ckpts, tmp_path, capsys):
    args = ["3", "--diffusion", str(ckpts / "diff.pth"), "--vqae", str(ckpts / "vqae.pth"), "--steps", "6", "--batch", "2"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, seed in ((a, 1), (b, 1), (c, 2)):
        synthesise.main(args + ["--out", str(folder), "--seed", str(seed)])
    assert utils.find_pairs(str(a)) == ["case_0000", "case_0001", "case_0002"]
    img = nib.load(str(a / "case_0001_2.nii.gz"))
    v = np.asarray(img.dataobj)
    assert v.shape == (64, 52, 64) and np.allclose(img.affine, utils.frame_affine(4)) and 0 <= v.min() and v.max() <= 1
    assert utils.framed_volume(str(a / "case_0001_2.nii.gz"), 4).shape == (64, 52, 64)  # a registration DATA_FOLDER
    m = json.load(open(a / "manifest.json"))
    assert m["seed"] == 1 and m["steps"] == 6 and m["complete"] and m["seconds_per_pair"] > 0
    assert os.path.exists(a / "preview.png")
    load = lambda f, c: np.asarray(nib.load(str(f / f"{c}.nii.gz")).dataobj)  # noqa: E731
    names = [f"case_000{i}_{k}" for i in range(3) for k in (1, 2)]
    assert all(np.array_equal(load(a, n), load(b, n)) for n in names)  # same --seed, same pairs
    assert not np.array_equal(load(a, "case_0000_1"), load(c, "case_0000_1"))
    # resume: a lost file is remade identically, complete pairs are kept
    os.remove(b / "case_0002_1.nii.gz")
    keep = os.path.getmtime(b / "case_0000_1.nii.gz")
    capsys.readouterr()
    synthesise.main(args + ["--out", str(b), "--seed", "1"])
    assert "1 pairs written (2 kept)" in capsys.readouterr().out
    assert np.array_equal(load(a, "case_0002_1"), load(b, "case_0002_1"))
    assert os.path.getmtime(b / "case_0000_1.nii.gz") == keep
    with pytest.raises(utils.DataError, match="other temp"):  # an unfinished folder with other settings
        synthesise.main(args + ["--out", str(b), "--seed", "1", "--temp", "0.5"])


@pytest.mark.parametrize("diffusion, vqae, message", [
    ("nope.pth", "vqae.pth", "checkpoint not found"),
    ("vqae.pth", "vqae.pth", "is a 'vqae' checkpoint, expected 'diffusion'"),
    ("diff.pth", "vqae32.pth", "does not match the diffusion model"),
    ("diff.pth", "diff.pth", "is a 'diffusion' checkpoint, expected 'vqae'"),
    ("junk.pth", "vqae.pth", "not a readable checkpoint"),
])
def test_synthesise_refuses_bad_checkpoints(ckpts, tmp_path, diffusion, vqae, message):
    (ckpts / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(utils.DataError, match=message):
        synthesise.main(["1", "--out", str(tmp_path / "s"), "--steps", "2", "--diffusion", str(ckpts / diffusion),
                         "--vqae", str(ckpts / vqae)])
    assert not os.path.exists(tmp_path / "s" / "case_0000_1.nii.gz")


def test_train_refuses_bad_tokens(ckpts, run, tmp_path):
    tr = ["2", "--preset", "demo", "--iters", "1", "--out", str(tmp_path / "d.pth")]
    with pytest.raises(utils.DataError, match="token grid 16x13x16 does not match the 'demo' preset"):
        train_diffusion.main([tr[0], str(ckpts / "paper_list.pth")] + tr[1:])
    with pytest.raises(utils.DataError, match="not found"):
        train_diffusion.main([tr[0], str(tmp_path / "none.pth")] + tr[1:])
    with pytest.raises(utils.DataError, match="differ from the tokens"):
        train_diffusion.main([tr[0], str(ckpts / "tokens.pth")] + tr[1:] + ["--vqae", str(ckpts / "vqae32.pth")])
    assert not os.path.exists(tmp_path / "d.pth")
    # as a user sees it: one line, no traceback
    assert_one_line_error(run("train_diffusion.py", tr[0], ckpts / "paper_list.pth", *tr[1:]), "paper_list.pth")


def test_realism_statistics():
    # a pair shifted by 2 voxels (8 mm): the quick registration must find a displacement of that order
    f = torch.zeros(64, 52, 64)
    f[20:44, 24:28, 10:54], f[30:34, 10:42, 10:54] = 1, 1
    m = torch.roll(f, 2, dims=0)
    disp, dice_reg = realism_report.quick_registration(f, m, 4)
    assert 4 < disp < 12 and dice_reg > utils.dice(f, m)
    same, _ = realism_report.quick_registration(f, f, 4)
    assert same < 1
    vols = torch.stack([f, m, torch.roll(f, 20, dims=2)])
    nn = realism_report.nn_dice(vols, torch.stack([f, m]), torch.tensor([[True, False], [False, True], [False, False]]))
    assert nn[0] == pytest.approx(utils.dice(f, m)) and nn[1] == pytest.approx(utils.dice(f, m)) and nn[2] < 0.8
