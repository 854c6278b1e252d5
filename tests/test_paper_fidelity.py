"""The `paper` preset against the reference implementation (the paper's public code), and its
readiness for CUDA shown on the `meta` device: every training step and the sampler at paper shapes
with no tensor on the CPU and no host synchronisation in the hot path (meta tensors refuse both)."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import synthesise
import train_diffusion
import train_registration
import train_vqae
import utils
from models import RegistrationNet, TokenTransformer, VQAE

META = torch.device("meta")


# ---------------------------------------------------------------------------- registration loss
def reference_restatement(net, fix, mov, reg=0.5):
    """The reference's training iteration restated in its own terms (normalised grid_sample units,
    align_corners=False, fields that warp the FIXED image for the forward direction) -> the
    gradients of both UNets, each from its own step's loss."""
    B, _, H, W, D = fix.shape
    grid = F.affine_grid(torch.eye(3, 4).repeat(B, 1, 1), (B, 1, H, W, D), align_corners=False)

    def smooth(x):
        for stride in (2, 2, 1, 1):
            x = F.avg_pool3d(x, 7, stride=stride, padding=3)
        return F.interpolate(x, size=(H, W, D), mode="trilinear")

    def integrate(v):
        u = v / 2 ** 12
        for _ in range(12):
            u = F.grid_sample(u, u.permute(0, 2, 3, 4, 1) + grid, align_corners=False, padding_mode="border") + u
        return u

    def resample(img, u):
        return F.grid_sample(img, u.permute(0, 2, 3, 4, 1) + grid, align_corners=False)

    def roughness(u):
        return sum((u.diff(dim=d) ** 2).mean() for d in (2, 3, 4))

    grads = []
    for unet in net.unets:
        out_f = torch.tanh(unet(torch.cat((fix, mov), 1))) * 0.35
        out_b = torch.tanh(unet(torch.cat((mov, fix), 1))) * 0.35
        v_f, v_b = smooth(out_f - out_b), smooth(out_b - out_f)
        u_f, u_b = integrate(v_f), integrate(v_b)
        loss = F.l1_loss(mov, resample(fix, u_f)) + F.l1_loss(fix, resample(mov, u_b))
        loss = loss + reg * (roughness(u_f) + roughness(u_b))
        grads.append(torch.autograd.grad(loss, list(unet.parameters())))
        with torch.no_grad():  # mid-step warp, detached
            fix, mov = resample(fix, integrate(v_f / 2)), resample(mov, integrate(v_b / 2))
    return grads


def tiny_pair(size=(48, 40, 48)):
    g = torch.Generator().manual_seed(3)
    fix = F.avg_pool3d((torch.rand(1, 1, *size, generator=g) > 0.7).to(torch.get_default_dtype()), 3, 1, 1)
    mov = torch.roll(fix, shifts=(2, -1, 1), dims=(2, 3, 4))
    return fix, mov


def per_step_grads(net, fix, mov):
    opts = [torch.optim.SGD(u.parameters(), lr=0.0) for u in net.unets]  # keeps the weights
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_registration.train_step(net, opts, scaler, fix, mov, 0.5, torch.device("cpu"))
    return [[p.grad.clone() for p in u.parameters()] for u in net.unets]


@pytest.fixture
def float64():
    """Exact arithmetic for comparing two code paths of the same math: in float32 their rounding
    (12 squarings, instance norms) moves the gradients by ~5e-4 relative, by an amount that depends
    on the CPU's kernels; in float64 by ~1e-13."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_per_step_loss_equals_the_reference_iteration(float64):
    torch.manual_seed(0)
    net = RegistrationNet()  # the paper configuration: fields integrated at the input grid
    fix, mov = tiny_pair()
    ours = per_step_grads(net, fix, mov)
    ref = reference_restatement(net, fix, mov)
    for k in range(2):  # whole-UNet gradient vectors (biases before instance norms get ~0, noise only)
        a = torch.cat([g.flatten() for g in ours[k]])
        b = torch.cat([g.flatten() for g in ref[k]])
        assert a.dtype == torch.float64 and (a - b).norm() < 1e-9 * b.norm(), (k, float((a - b).norm() / b.norm()))


def test_unet2_gets_no_gradient_through_its_input():
    """Per-step: UNet 1's gradient comes from its own loss alone (the half-way pair UNet 2 sees is
    detached), while step 2's loss alone would also reach UNet 1 through that pair if it were not."""
    torch.manual_seed(0)
    net = RegistrationNet()
    fix, mov = tiny_pair()
    per_step = per_step_grads(net, fix, mov)
    loss1, v1 = train_registration.step_loss(net, 0, fix, mov, 0.5, torch.device("cpu"))
    alone = torch.autograd.grad(loss1, list(net.unets[0].parameters()), retain_graph=True)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(per_step[0], alone))
    loss2, _ = train_registration.step_loss(net, 1, *net.halfway(v1, fix, mov), 0.5, torch.device("cpu"))
    through = torch.autograd.grad(loss2, list(net.unets[0].parameters()), allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in through)  # the detach is what keeps it out


def test_fields_warp_moving_onto_fixed_as_the_reference_backward_field():
    """Our ddf of one step is the reference's `field_bwd` integrated: it warps the moving image."""
    torch.manual_seed(1)
    net = RegistrationNet()
    fix, mov = tiny_pair()
    v = net.step_velocity(0, fix, mov)
    assert torch.allclose(v, -net.velocity(0, fix, mov))  # unet(moving, fixed) - unet(fixed, moving)


def test_tta_is_measured_on_the_last_forward_pass():
    """optimise() returns the velocities of its last iteration's forward pass (before that update),
    which is what the reference evaluates after TTA."""
    torch.manual_seed(0)
    net = RegistrationNet(channels=(4, 8, 8, 8, 8, 8))
    fix, mov = tiny_pair()
    seen = []
    orig = train_registration.train_step

    def spy(*args, **kw):
        out = orig(*args, **kw)
        seen.append(out[1].clone())
        return out

    train_registration.train_step = spy
    try:
        _, (v1, _) = train_registration.optimise(net, lambda i: (fix, mov), 3, 0.01, 0.5, torch.device("cpu"))
    finally:
        train_registration.train_step = orig
    assert torch.equal(v1, seen[-1]) and not torch.equal(seen[-1], seen[0])


# ---------------------------------------------------------------------------- synthesis and sampler
def test_paper_defaults_to_the_reference_sampler():
    assert synthesise.sampler_settings("paper") == {"steps": 256, "schedule": "reference", "batch": 2, "temp": 0.9}
    assert synthesise.sampler_settings("paper", "fast")["steps"] < 256
    assert synthesise.TEMP == 0.9


def small_models(tmp_path, ids=None):
    """An untrained demo-grid VQ-AE (v.pth, vessel logits raised) and diffusion model (d.pth), and
    token grids t.pth (random, or the given ids (N, L)) -> (vq, grid, ids)."""
    small = dict(channels=[4, 4, 4], strides=[2, 2, 2], num_codes=16)  # the demo token grid 8x7x8
    torch.manual_seed(0)
    vq = VQAE(**small)
    biases = [p for n, p in vq.ae.decode.named_parameters() if n.endswith("bias") and p.shape == (4,)]
    biases[-1].data[1::2] += 1.0  # vessel logits up: raw and calibrated maps clearly differ
    utils.save_checkpoint(str(tmp_path / "v.pth"), "vqae", {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B, "model": small},
                          vq.state_dict())
    grid = vq.token_grid(utils.grid_shape(4, utils.LUNG250M4B))
    cfg = train_diffusion.config_of("demo", {"grid_shape": grid, "num_codes": 16, "factor": 4, "frame": utils.LUNG250M4B})
    utils.save_checkpoint(str(tmp_path / "d.pth"), "diffusion", cfg, TokenTransformer.build(cfg).state_dict())
    ids = torch.randint(0, 16, (2, int(np.prod(grid)))) if ids is None else ids
    utils.write_tokens(str(tmp_path / "t.pth"), ids.view(len(ids), *grid), [f"c{i}" for i in range(len(ids))], 16,
                       {"preset": "demo", "factor": 4, "frame": utils.LUNG250M4B})
    return vq, grid, ids


def test_written_synthetic_maps_are_the_raw_softmax(tmp_path, monkeypatch):
    vq, grid, ids = small_models(tmp_path)
    with torch.no_grad():
        logits = vq.decode_tokens(ids, grid)
    monkeypatch.setattr(TokenTransformer, "sample", lambda self, n, *a, **k: ids[:n])  # these grids, not sampled ones
    assert synthesise.PRESETS["paper"]["calibrate"] is False  # the reference writes the raw softmax
    for k, (flag, calibrate) in enumerate(((["--no-calibrate"], False), (["--calibrate"], True), ([], True))):
        out = tmp_path / f"s{k}"  # the last: this demo checkpoint's preset default (occupancies)
        synthesise.main(["2", "--diffusion", str(tmp_path / "d.pth"), "--vqae", str(tmp_path / "v.pth"),
                         "--batch", "2", "--out", str(out), *flag])
        fp, mp = VQAE.pair_probs(logits, utils.grid_shape(4, utils.LUNG250M4B), calibrate=calibrate)
        for i in range(2):
            f = np.asarray(nib.load(str(out / f"case_{i:04d}_1.nii.gz")).dataobj)
            m = np.asarray(nib.load(str(out / f"case_{i:04d}_2.nii.gz")).dataobj)
            assert np.allclose(f, fp[i].numpy(), atol=1e-6) and np.allclose(m, mp[i].numpy(), atol=1e-6)
    raw, cal = VQAE.pair_probs(logits)[0], VQAE.pair_probs(logits, calibrate=True)[0]
    assert (raw - cal).abs().max() > 0.05


def test_transformer_layers_start_independent():
    torch.manual_seed(0)
    m = TokenTransformer(num_codes=16, seq_len=8, dim=32, layers=3, heads=4, ff=64)
    w = [b.linear1.weight for b in m.blocks]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


# ---------------------------------------------------------------------------- data
def test_oversize_depth_is_cut_as_the_reference(tmp_path):
    a = np.zeros((268, 188, 451), np.uint8)
    a[100:150, 80:120, 50:60] = 1  # kept by the cut (first 280 slices), cropped by framing alone
    a[100:150, 80:120, 200:210] = 1  # kept by both
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "deep.nii.gz"))
    cut = utils.framed_volume(str(tmp_path / "deep.nii.gz"), 1, utils.LUNG250M4B, cut_deep=True)
    plain = utils.framed_volume(str(tmp_path / "deep.nii.gz"), 1, utils.LUNG250M4B)
    assert cut.sum() == a.sum() and plain.sum() == a.sum() / 2


def test_case_035_keeps_its_vessels(shared_data):
    path = os.path.join(shared_data, "dilated_vessels_10", "case_035_1.nii.gz")
    total = float((utils.load_volume(path) > 0).sum())
    kept = float(utils.framed_volume(path, 1, utils.LUNG250M4B, cut_deep=True).sum()) / total
    plain = float(utils.framed_volume(path, 1, utils.LUNG250M4B).sum()) / total
    assert kept > 0.9 and plain < 0.8, (kept, plain)


# ---------------------------------------------------------------------------- CUDA readiness on meta
def test_vqae_paper_step_on_meta():
    model = VQAE().to(META)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=6000, T_mult=2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x = utils.augment(torch.zeros(8, 2, 128, 128, 128, device=META))  # paper: batch 8 of 128^3 patches
    loss, cb, logits, ids = train_vqae.vqae_step(model, opt, scaler, sched, x, soft=False)
    assert loss.device == META and logits.shape == (8, 4, 128, 128, 128) and ids.shape == (8, 8, 8, 8)


def test_diffusion_paper_step_and_samplers_on_meta():
    model = TokenTransformer().to(META)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, i / 500))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x0 = torch.zeros(8, 3328, dtype=torch.long, device=META)
    loss = train_diffusion.diffusion_step(model, opt, scaler, sched, x0, 1 / 1024)
    assert loss.device == META
    for schedule, steps in (("reference", 3), ("cosine", 2)):
        ids = model.sample(2, steps=steps, schedule=schedule, device=META)
        assert ids.shape == (2, 3328) and ids.device == META


def test_synthesis_decode_on_meta():
    vq = VQAE().to(META)
    ids = torch.zeros(1, 3328, dtype=torch.long, device=META)
    fp, mp = VQAE.pair_probs(vq.decode_tokens(ids, (16, 13, 16)), utils.grid_shape(1, utils.LUNG250M4B))
    assert fp.shape == (1, 256, 208, 256)


def test_registration_paper_step_on_meta():
    net = RegistrationNet().to(META)
    opts = [torch.optim.Adam(u.parameters(), lr=0.015) for u in net.unets]
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    fixed = torch.zeros(8, 1, 128, 104, 128, device=META)  # paper: batch 8 at half resolution
    total, v1, v2 = train_registration.train_step(net, opts, scaler, fixed, fixed, 0.5, META)
    ddf, ddf_inv = net.fields(v1, v2, fixed.shape[2:])
    assert total.device == META and ddf.shape == (8, 3, 128, 104, 128)


def test_registration_activation_estimate_at_paper_batch():
    from tools import estimate_memory

    assert 4 * 2 ** 30 < estimate_memory.registration(8) <= 12 * 2 ** 30  # 11.0 GiB measured on an H200
    assert estimate_memory.registration(4) < estimate_memory.registration(8)


def test_compile_keeps_checkpoint_keys():
    """--compile compiles in place: a compiled model's state_dict loads into an eager one."""
    net = RegistrationNet(channels=(4, 8, 8, 8, 8, 8))
    keys = list(net.state_dict())
    utils.compile_modules(net.unets, True)
    assert list(net.state_dict()) == keys
    RegistrationNet(channels=(4, 8, 8, 8, 8, 8)).load_state_dict(net.state_dict())


def test_meta_catches_a_host_sync():
    """The premise of the tests above: a host synchronisation on a meta tensor fails."""
    with pytest.raises(RuntimeError):
        float(torch.zeros(1, device=META).sum())
    with pytest.raises(RuntimeError):
        nn.Linear(2, 2).to(META)(torch.zeros(1, 2))  # a tensor left on the CPU
