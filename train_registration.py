"""Stage 5: train the two-step inverse-consistent registration net on real or synthetic pairs.

    python train_registration.py BATCH_SIZE DATA_FOLDER [--preset paper|cpu|demo] [--iters N]
                                 [--out CKPT] [--seed S] [--resume] [--overwrite]

DATA_FOLDER holds case_XXX_1 / case_XXX_2 .nii.gz pairs: original scans (binarised and framed) or
synthetic / phantom volumes already on the pooled frame grid (soft probabilities in [0, 1]).
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from models import RegistrationNet

# factor: input = frame average-pooled by it. net: RegistrationNet kwargs. iters None = seed rule.
PRESETS = {
    # the seed: half resolution, smooth velocity squared 12x at input resolution
    "paper": dict(factor=2, lr=0.015, reg=0.5, iters=None, ckpt_every=500, tta_lr=0.005,
                  net=dict(pool_strides=(2, 2, 1, 1), exp_at="input")),
    # quarter resolution; one stride-2 pooling keeps the velocity on the seed's physical 8 mm
    # grid (same smoothing); the smooth result is integrated and composed on a 16 mm grid and only
    # the final fields are upsampled (the cheap path, measured in benchmark_registration.py)
    "cpu": dict(factor=4, lr=0.015, reg=0.5, iters=300, ckpt_every=100, tta_lr=0.005,
                net=dict(pool_strides=(2, 1, 1), exp_at="velocity", exp_coarsen=2)),
    "demo": dict(factor=4, lr=0.015, reg=0.5, iters=60, ckpt_every=50, tta_lr=0.005,
                 net=dict(pool_strides=(2, 1, 1), exp_at="velocity", exp_coarsen=2)),
}


def config_of(preset):
    """What the checkpoint stores next to the weights: enough to rebuild net and input grid."""
    p = PRESETS[preset]
    return {"preset": preset, "factor": p["factor"], **{k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in p["net"].items()}}


def build_net(config):
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k not in ("preset", "factor")}
    return RegistrationNet(**kw)


def smoothness(ddf):
    """Squared finite differences (diffusion regulariser) of a ddf in normalised units (the seed's)."""
    u = ddf * 2 / torch.tensor(ddf.shape[2:], dtype=ddf.dtype, device=ddf.device).view(1, 3, 1, 1, 1)
    return sum((u.diff(dim=d) ** 2).mean() for d in (2, 3, 4))


def registration_loss(net, fixed, moving, reg):
    """L1(moving, warped fixed) + L1(fixed, warped moving) + reg x smoothness of both fields."""
    ddf, ddf_inv = net(fixed, moving)
    sim = F.l1_loss(utils.warp(moving, ddf), fixed) + F.l1_loss(utils.warp(fixed, ddf_inv), moving)
    return sim + reg * (smoothness(ddf) + smoothness(ddf_inv)), (ddf, ddf_inv)


def optimise(net, batches, iters, lr, reg, device, desc="train", on_step=None, start=0, opt_state=None):
    """Adam on both UNets (one optimiser per UNet, as the seed). `batches(i)` -> (fixed, moving).
    Used for training and for test-time adaptation alike."""
    opts = [torch.optim.Adam(u.parameters(), lr=lr) for u in net.unets]
    if opt_state:
        for o, s in zip(opts, opt_state):
            o.load_state_dict(s)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    bar = tqdm(range(start, iters), desc=desc, initial=start, total=iters, leave=False, disable=iters - start < 2)
    for i in bar:
        fixed, moving = batches(i)
        with utils.autocast(device):
            loss, _ = registration_loss(net, fixed, moving, reg)
        for o in opts:
            o.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for o in opts:
            scaler.step(o)
        scaler.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step:
            on_step(i + 1, opts, loss.item())
    return opts


def train(batch_size, data, preset="cpu", iters=None, out=None, seed=0, resume=False, overwrite=False, log=print):
    """Train on all pairs of `data`; returns the checkpoint path."""
    p, cfg = PRESETS[preset], config_of(preset)
    iters = iters or p["iters"] or 2500 // batch_size * 4
    out = out or f"regnets_state_{os.path.basename(os.path.normpath(data))}.pth"
    if not resume:
        utils.check_output(out, overwrite)
    ids, pairs = utils.load_pairs(data, p["factor"])  # (N, 2, H, W, D), kept in memory
    utils.seed_all(seed)
    device = utils.get_device()
    net, start, opt_state = build_net(cfg).to(device), 0, None
    if resume and os.path.exists(out):
        ck = utils.load_checkpoint(out, "regnet", cfg)
        net.load_state_dict(ck["state"])
        start, opt_state = ck["iteration"], ck["optimisers"]
        torch.set_rng_state(ck["rng"])
    gen = torch.Generator().manual_seed(seed * 100003 + start)  # fresh draws after a resume

    def batches(i):
        idx = torch.randint(len(ids), (batch_size,), generator=gen)
        x = pairs[idx].to(device)
        return x[:, :1], x[:, 1:]

    def on_step(i, opts, loss):
        if i % p["ckpt_every"] == 0 or i == iters:
            utils.save_checkpoint(out, "regnet", cfg, net.state_dict(), iteration=i, loss=loss,
                                  optimisers=[o.state_dict() for o in opts], rng=torch.get_rng_state(),
                                  data=os.path.abspath(data), cases=ids, seed=seed, batch_size=batch_size)

    t = time.time()
    log(f"train_registration: {len(ids)} pairs from {data} at {pairs.shape[2:]}, preset {preset}, "
        f"{iters} iterations of batch {batch_size} on {device}")
    optimise(net, batches, iters, p["lr"], p["reg"], device, desc=f"train {preset}", on_step=on_step,
             start=start, opt_state=opt_state)
    if start >= iters:
        log(f"{out} already holds {start} >= {iters} iterations")
    log(f"wrote {out} ({time.time() - t:.0f} s, {(time.time() - t) / max(iters - start, 1):.2f} s/iteration)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("batch_size", type=int)
    ap.add_argument("data")
    ap.add_argument("--preset", choices=PRESETS, default="paper")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    if a.batch_size < 1:
        raise utils.DataError(f"BATCH_SIZE must be >= 1, got {a.batch_size}")
    train(a.batch_size, a.data, a.preset, a.iters, a.out, a.seed, a.resume, a.overwrite)


if __name__ == "__main__":
    utils.run_main(main)
