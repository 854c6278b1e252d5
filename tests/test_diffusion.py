"""TokenTransformer (absorbing diffusion), train_diffusion.py, synthesise.py, the realism statistics."""
import json
import math
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("schedule, steps", [("reference", 256), ("cosine", 12)])
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
    if schedule == "reference":  # the reference's schedule unmasks ~L/256 tokens per step, not all at once
        per_step = torch.stack([(s != 16).sum() for s in seen]).diff()
        assert per_step.max() < 40
    again = model.sample(3, steps=steps, schedule=schedule, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_attention_runs_on_the_fused_sdpa_kernel(monkeypatch):
    """forward() keeps attention on F.scaled_dot_product_attention (not the inference fast path), and
    without attention dropout the fused flash kernel serves training too (SDPA's backend switch
    raises when the chosen kernel cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x = torch.randint(0, 16, (2, 56))
    model = TokenTransformer(num_codes=16, seq_len=56, dim=32, layers=2, heads=2, ff=32, attn_dropout=0.0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model.loss(x).backward()
        model.eval()
        with torch.no_grad():
            model(x)
    assert len(calls) == 4  # 2 layers, training and inference
    dropout = TokenTransformer(num_codes=16, seq_len=56, dim=32, layers=1, heads=2, ff=32)  # attention dropout 0.1
    with pytest.raises(RuntimeError), sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's own explanation, expected here
        dropout.loss(x)  # CPU flash has no dropout: SDPA falls back to the math kernel (attn_dropout=0 at cpu)


# ---------------------------------------------------------------------------- files and scripts
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A randomly initialised tiny VQ-AE (grid 8x7x8, 16 codes), a demo-preset transformer for it,
    a token file, and a token file with the paper's grid."""
    d = tmp_path_factory.mktemp("diffusion")
    torch.manual_seed(0)
    vq = VQAE(**TINY_VQAE)
    utils.save_checkpoint(str(d / "vqae.pth"), "vqae", {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B, "model": TINY_VQAE}, vq.state_dict())
    utils.save_checkpoint(str(d / "vqae_b.pth"), "vqae", {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B, "model": TINY_VQAE},
                          VQAE(**TINY_VQAE).state_dict())  # same shapes, other weights
    other = dict(TINY_VQAE, num_codes=32)
    utils.save_checkpoint(str(d / "vqae32.pth"), "vqae", {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B, "model": other},
                          VQAE(**other).state_dict())
    cfg = train_diffusion.config_of("demo", {"grid_shape": GRID, "num_codes": 16, "factor": 4, "frame": utils.LUNG250M4B})
    utils.save_checkpoint(str(d / "diff.pth"), "diffusion", cfg, TokenTransformer.build(cfg).state_dict())
    vq_config = {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B, "model": TINY_VQAE}
    utils.write_tokens(str(d / "tokens.pth"), torch.randint(0, 16, (6, *GRID)), [f"case_{i:03d}" for i in range(6)],
                       16, vq_config)
    torch.save([torch.randint(0, 1024, (3328,), dtype=torch.int16) for _ in range(3)], d / "paper_list.pth")
    return d


def test_token_files(ckpts, tmp_path):
    d = utils.read_tokens(str(ckpts / "paper_list.pth"))  # the reference's format: grid, codes and factor implied
    assert d["tokens"].shape == (3, 3328) and d["grid_shape"] == (16, 13, 16) and d["num_codes"] == 1024
    assert d["factor"] == 1 and len(d["case_ids"]) == 3 and d["config"] is None
    d = utils.read_tokens(str(ckpts / "tokens.pth"))
    assert d["tokens"].shape == (6, 448) and d["grid_shape"] == GRID and d["factor"] == 4
    # the grid comes from the file, so a preset accepts any grid, but not tokens of another preset's VQ-AE
    assert train_diffusion.read_tokens(str(ckpts / "paper_list.pth"), "cpu")["grid_shape"] == (16, 13, 16)
    with pytest.raises(utils.DataError, match="tokens of a 'demo' VQ-AE"):
        train_diffusion.read_tokens(str(ckpts / "tokens.pth"), "paper")
    bad = {"short": dict(d, tokens=d["tokens"][:, :100]), "empty": dict(d, tokens=d["tokens"][:0]),
           "range": dict(d, tokens=d["tokens"] + 16)}
    for name, content in bad.items():
        torch.save(content, tmp_path / f"{name}.pth")
    for name, message in (("short", "100 tokens per grid, but the grid 8x7x8 has 448"), ("empty", "no token grids"),
                          ("range", "outside")):
        with pytest.raises(utils.DataError, match=message):
            utils.read_tokens(str(tmp_path / f"{name}.pth"))


def test_train_then_synthesise(ckpts, run, tmp_path):
    out = tmp_path / "d.pth"
    train_diffusion.main(["2", str(ckpts / "tokens.pth"), "--val", str(ckpts / "tokens.pth"), "--vqae",
                          str(ckpts / "vqae.pth"), "--preset", "demo", "--iters", "3", "--out", str(out)])
    ck = utils.load_checkpoint(str(out), "diffusion")
    assert ck["config"]["grid_shape"] == list(GRID) and ck["config"]["model"]["num_codes"] == 16 and ck["iteration"] == 3
    assert ck["config"]["factor"] == 4  # from the token file
    assert os.path.exists(tmp_path / "d.csv") and os.path.exists(tmp_path / "d.png")
    # as a user runs it; the VQ-AE path stored in the checkpoint is the default
    p = run("synthesise.py", 2, "--diffusion", out, "--out", tmp_path / "s", "--steps", 4)
    assert p.returncode == 0, p.stderr
    assert utils.pair_ids(str(tmp_path / "s")) == ["case_0000", "case_0001"]
    with pytest.raises(utils.DataError, match="not the VQ-AE whose tokens trained"):  # same grid, other codebook
        synthesise.main(["1", "--diffusion", str(out), "--vqae", str(ckpts / "vqae_b.pth"), "--out", str(tmp_path / "t")])


def test_synthesise_files_seed_and_resume(ckpts, tmp_path, capsys):
    args = ["3", "--diffusion", str(ckpts / "diff.pth"), "--vqae", str(ckpts / "vqae.pth"), "--steps", "6", "--batch", "2"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, seed in ((a, 1), (b, 1), (c, 2)):
        synthesise.main(args + ["--out", str(folder), "--seed", str(seed)])
    assert utils.pair_ids(str(a)) == ["case_0000", "case_0001", "case_0002"]
    img = nib.load(str(a / "case_0001_2.nii.gz"))
    v = np.asarray(img.dataobj)
    assert v.shape == (64, 52, 64) and np.allclose(img.affine, utils.frame_affine(4, utils.LUNG250M4B)) and 0 <= v.min() and v.max() <= 1
    assert utils.framed_volume(str(a / "case_0001_2.nii.gz"), 4, utils.LUNG250M4B).shape == (64, 52, 64)  # a registration DATA_FOLDER
    m = json.load(open(a / "manifest.json"))
    assert m["seed"] == 1 and m["steps"] == 6 and m["complete"] and m["seconds_per_pair"] > 0
    assert os.path.exists(a / "preview.png")

    def load(folder, case):
        return np.asarray(nib.load(str(folder / f"{case}.nii.gz")).dataobj)

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
    ("diff.pth", "vqae32.pth", "VQ-AE of 8x7x8 token grids with 32 codes, not 8x7x8 with 16"),
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
    with pytest.raises(utils.DataError, match="tokens of a 'demo' VQ-AE, not of the 'cpu' preset"):
        train_diffusion.main([tr[0], str(ckpts / "tokens.pth")] + tr[1:] + ["--preset", "cpu"])
    with pytest.raises(utils.DataError, match="not found"):
        train_diffusion.main([tr[0], str(tmp_path / "none.pth")] + tr[1:])
    with pytest.raises(utils.DataError, match="VQ-AE of 8x7x8 token grids with 32 codes"):
        train_diffusion.main([tr[0], str(ckpts / "tokens.pth")] + tr[1:] + ["--vqae", str(ckpts / "vqae32.pth")])
    assert not os.path.exists(tmp_path / "d.pth")
    # as a user sees it: one line, no traceback
    assert_one_line_error(run("train_diffusion.py", tr[0], ckpts / "tokens.pth", *tr[1:], "--preset", "cpu"), "tokens.pth")


def test_realism_statistics():
    # a pair shifted by 2 voxels (8 mm): the quick registration must find a displacement of that order
    f = torch.zeros(64, 52, 64)
    f[20:44, 24:28, 10:54], f[30:34, 10:42, 10:54] = 1, 1
    m = torch.roll(f, 2, dims=0)
    disp, dice_reg = utils.quick_registration(f, m, 4)
    assert 4 < disp < 12 and dice_reg > utils.dice(f, m)
    same, _ = utils.quick_registration(f, f, 4)
    assert same < 0.25 * disp  # a zero-loss pair moves by rounding noise (Adam-normalised): a fraction of a voxel
    vols = torch.stack([f, m, torch.roll(f, 20, dims=2)])
    nn = utils.nn_dice(vols, torch.stack([f, m]), torch.tensor([[True, False], [False, True], [False, False]]))
    assert nn[0] == pytest.approx(utils.dice(f, m)) and nn[1] == pytest.approx(utils.dice(f, m)) and nn[2] < 0.8


def test_sampler_benchmark_reports_both_samplers(ckpts, capsys):
    from tools import benchmark_sampler

    benchmark_sampler.main(["--diffusion", str(ckpts / "diff.pth"), "--vqae", str(ckpts / "vqae.pth"), "--pairs", "2"])
    out = capsys.readouterr().out
    assert "reference: 256 steps" in out and "fast: 16 steps" in out
    assert "fast mean within reference mean ± std" in out and out.strip().splitlines()[-1].startswith("speedup: ")


def test_grouped_positions_for_the_reference_grid():
    """group 2 (cpu preset, the reference's 16x13x16 grids): one position per 2x2x2 block, blocks_of
    and tokens_of invert each other, and a few steps on grids with a block structure lower the loss;
    group 1 (paper) keeps the paper's parameters and computes head(norm(blocks(tok + pos)))."""
    cfg = train_diffusion.config_of("cpu", utils.REFERENCE_TOKENS)["model"]
    assert cfg["group"] == 2 and cfg["grid_shape"] == [16, 13, 16]
    assert "group" not in train_diffusion.config_of("paper", utils.REFERENCE_TOKENS)["model"]
    assert "group" not in train_diffusion.config_of("cpu", dict(grid_shape=GRID, num_codes=512, factor=4, frame=utils.LUNG250M4B))["model"]
    torch.manual_seed(0)
    m = TokenTransformer(num_codes=8, seq_len=3328, dim=32, layers=1, heads=2, ff=64, dropout=0.0,
                         grid_shape=(16, 13, 16), group=2)
    assert m.pos.shape[1] == 8 * 7 * 8
    x = torch.arange(3328)[None]
    blocks = m.blocks_of(x, -1)
    assert blocks.shape == (1, 448, 8) and blocks[0, 0].tolist() == [0, 1, 16, 17, 208, 209, 224, 225]
    assert (blocks == -1).sum() == 448 * 8 - 3328 and torch.equal(m.tokens_of(blocks), x)
    coarse = torch.randint(8, (16, 8, 7, 8))  # grids made of 2x2x2 blocks of one code: predictable
    grids = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :13].reshape(16, -1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = m.loss(grids, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    ids = m.sample(2, steps=4, schedule="cosine", generator=torch.Generator().manual_seed(1))
    assert ids.shape == (2, 3328) and 0 <= int(ids.min()) and int(ids.max()) < 8
    plain = TokenTransformer(num_codes=8, seq_len=448, dim=32, layers=1, heads=2, ff=64, dropout=0.0).eval()
    assert plain.tok.weight.shape == (9, 32) and plain.head.weight.shape == (8, 32)
    ids = torch.randint(9, (2, 448))
    with torch.no_grad():  # allclose: the direct call may take the layers' fused inference path
        assert torch.allclose(plain(ids), plain.head(plain.norm(plain.blocks(plain.tok(ids) + plain.pos))), atol=1e-5)


def test_compact_vocab_is_the_full_model_restricted_to_the_used_codes():
    """compact (cpu/demo): a model over the codes its grids use computes the full model's logits at
    those codes (weights copied row for row, grouped positions), takes and returns codebook ids;
    the paper keeps every code. The loss equals the full model's CE with the unused codes removed."""
    grids = torch.randint(5, (4, 3328)) * 7 + 3  # codes 3, 10, ..., 31 of 64
    tokens = dict(utils.REFERENCE_TOKENS, tokens=grids, num_codes=64)
    vocab = train_diffusion.config_of("cpu", tokens)["model"]["vocab"]
    assert vocab == sorted(set(grids.flatten().tolist())) and len(vocab) == 5
    assert "vocab" not in train_diffusion.config_of("paper", tokens)["model"]
    kw = dict(num_codes=64, seq_len=3328, dim=32, layers=1, heads=2, ff=64, dropout=0.0, grid_shape=(16, 13, 16), group=2)
    torch.manual_seed(0)
    full = TokenTransformer(**kw).eval()
    compact = TokenTransformer(**kw, vocab=vocab).eval()
    v = torch.tensor(vocab)
    slots = torch.arange(8)[:, None]
    with torch.no_grad():
        compact.load_state_dict({k: w for k, w in full.state_dict().items() if k not in ("tok.weight", "head.weight")},
                                strict=False)
        compact.tok.weight.copy_(full.tok.weight[(slots * 65 + torch.cat([v, torch.tensor([64])])).flatten()])
        compact.head.weight.copy_(full.head.weight[(slots * 64 + v).flatten()])
        x = grids[:2].clone()
        x[:, ::3] = 64  # partly masked, in codebook ids
        xc = compact.classes_of(x.clamp(max=63))
        xc[:, ::3] = compact.mask_id
        assert torch.allclose(compact(xc), full(x)[..., v], atol=1e-5)
        gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same draws of t and masks in both
        g = gen()
        t = torch.randint(1, 257, (2,), generator=g) / 256
        xt, masked = TokenTransformer.mask_tokens(grids[:2], t, 64, g)
        ref = TokenTransformer.weighted_elbo(full(xt)[..., v], compact.classes_of(grids[:2]), masked, t).mean()
        assert compact.loss(grids[:2], gen()) == pytest.approx(float(ref), rel=1e-5)
    ids = compact.sample(2, steps=3, schedule="cosine", generator=torch.Generator().manual_seed(1))
    assert set(ids.unique().tolist()) <= set(vocab)
    with pytest.raises(ValueError, match="distinct codebook ids"):
        TokenTransformer(**kw, vocab=[3, 3])


def test_vocab_benchmark_runs(tmp_path, capsys):
    from tools import benchmark_diffusion

    grids = torch.randint(4, (3, *GRID)) * 5
    utils.write_tokens(str(tmp_path / "t.pth"), grids, ["a", "b", "c"], 128, {"factor": 4, "frame": utils.LUNG250M4B})
    benchmark_diffusion.main([str(tmp_path / "t.pth"), "--preset", "demo", "--steps", "1", "--batch", "2"])
    out = capsys.readouterr().out
    assert "128 codes, 4 used" in out and out.strip().splitlines()[-1].startswith("speedup: train ")


def test_resume_refuses_grids_outside_the_checkpoints_vocab(ckpts, tmp_path):
    """The compact vocab is part of the config and comes from the training grids alone: validation
    grids of other codes leave it as it is, training grids of other codes are refused on resume."""
    small = str(tmp_path / "small.pth")  # grids of codes 0-3 only: a checkpoint predicting those four
    utils.write_tokens(small, torch.randint(0, 4, (4, *GRID)), list("abcd"), 16, {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B})
    out = str(tmp_path / "e.pth")
    train_diffusion.main(["2", small, "--preset", "demo", "--out", out, "--iters", "2"])
    assert utils.load_checkpoint(out, "diffusion")["config"]["model"]["vocab"] == [0, 1, 2, 3]
    train_diffusion.main(["2", small, "--val", str(ckpts / "tokens.pth"), "--preset", "demo", "--out", out,
                          "--iters", "3", "--resume"])  # validation grids of codes 0-15: the vocab stays
    assert utils.load_checkpoint(out, "diffusion")["config"]["model"]["vocab"] == [0, 1, 2, 3]
    with pytest.raises(utils.DataError, match="trained with other settings \\(tokens"):
        train_diffusion.main(["2", str(ckpts / "tokens.pth"), "--preset", "demo", "--out", out, "--iters", "4", "--resume"])
