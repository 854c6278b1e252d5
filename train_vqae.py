"""Stage 1: train the paired 3D VQ-AE (models.VQAE) on fixed/moving vessel-mask pairs.

    python train_vqae.py BATCH_SIZE [--preset paper|cpu|demo] [--data DIR] [--val DIR] [--iters N]
                         [--out CKPT] [--seed S] [--resume | --overwrite]

Both masks of a pair enter as two channels, so one token grid describes the pair. Each step:
a batch of pairs (paper: random 128^3 patches, same location in fixed and moving; cpu/demo: whole
quarter-resolution volumes), one random affine per pair (identity 3x4 + N(0, 0.05), nearest),
loss = 0.5 CE(fixed) + 0.5 CE(moving) with class weights (1, 2.5) + 0.1 codebook loss.
Writes CKPT (kind 'vqae': preset, model kwargs and data factor in its config), CKPT.csv, CKPT.png.
"""
import argparse
import functools
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from models import VQAE

SAMPLES = 336000  # paper: 336000 // BATCH_SIZE iterations
PRESETS = {
    # factor: frame pooling (1 = 1 mm); patch: random cube side (None = whole volume); samples: iters x batch
    "paper": dict(factor=1, patch=128, samples=SAMPLES, lr=5e-4, ckpt_every=3500, val_every=3500, model={}),
    # quarter res 64x52x64 padded to 64x56x64; stride 8 -> 8x7x8 = 448 tokens. The first layer already
    # strides by 2: a full-resolution stage costs ~5x the time on 2 CPU cores for little Dice.
    # samples 24000 = 12000 iterations of batch 2 at ~10 it/s: ~19 min on 2 idle cores (issue budget 30 min);
    # validation Dice was still rising at 3000 iterations (0.03) and flattens near 0.16 by 12000.
    # restart: every N iterations, codes unused since the last restart are moved onto encoder outputs
    # (not in the paper; without it the codebook collapses to ~12 codes within 200 iterations here).
    "cpu": dict(factor=4, patch=None, samples=24000, lr=5e-4, ckpt_every=250, val_every=250, restart=50,
                model=dict(channels=(32, 64, 128, 128, 128), strides=(2, 2, 2, 1, 1), num_codes=512)),
    "demo": dict(factor=4, patch=None, samples=600, lr=2e-3, ckpt_every=100, val_every=50, restart=25,
                 model=dict(channels=(16, 32, 32, 32), strides=(2, 2, 2, 1), num_codes=128)),
}
AUG_STD, CB_WEIGHT = 0.05, 0.1
LOG_EVERY = 10  # iterations between log rows: the only host-device synchronisation of the loop
LOG_HEADER = ["iter", "loss", "codebook_loss", "dice_fixed", "dice_moving", "codes_used", "perplexity", "lr",
              "codes_restarted", "val_dice_fixed", "val_dice_moving", "val_codes_used", "seconds"]


def model_config(preset):
    """The checkpoint config: everything needed to rebuild the model and its input."""
    p = PRESETS[preset]
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in p["model"].items()}
    return {"preset": preset, "factor": p["factor"], "model": kw}


def build(config):
    return VQAE(**config["model"])


def default_data(preset):
    """cpu/paper: the user's folder; demo: phantom pairs, made on first use."""
    if preset != "demo":
        return "dilated_vessels"
    folder = os.path.join("runs", "demo_phantoms")
    if not os.path.isdir(folder):
        import make_phantoms

        make_phantoms.make_pairs(folder, 8, size=utils.grid_shape(4))
    return folder


def load_data(folder, factor):
    """(N, 2, H, W, D) float16 (exact for masks and for 1/64 steps of quarter-res occupancy)."""
    ids, x = utils.load_pairs(folder, factor)
    return ids, x.half()


def augment(x, std=AUG_STD, generator=None):
    """One random affine per pair (identity 3x4 + N(0, std)), the same for fixed and moving,
    nearest-neighbour resampling (the reference's choice: keeps masks binary). Drawn on x's device
    (`generator` must live there), so a GPU step needs no host-to-device copy."""
    theta = torch.eye(3, 4, device=x.device).repeat(len(x), 1, 1)
    theta = theta + std * torch.randn(theta.shape, generator=generator, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)


def sample_batch(data, batch, patch, generator):
    """Random pairs (and patches) of `data` (N, 2, H, W, D), on data's device. The draws come from
    a CPU `generator` and index by Python ints: no host-device synchronisation."""
    idx = torch.randint(len(data), (batch,), generator=generator).tolist()
    if patch is None:
        return torch.stack([data[i] for i in idx])
    out = []
    for i in idx:  # same patch location in fixed and moving (they are the two channels)
        c = [int(torch.randint(s - patch + 1, (1,), generator=generator)) for s in data.shape[-3:]]
        out.append(data[i, :, c[0]:c[0] + patch, c[1]:c[1] + patch, c[2]:c[2] + patch])
    return torch.stack(out)


@functools.lru_cache(maxsize=8)
def class_weights(device):
    return torch.tensor(VQAE.CLASS_WEIGHTS, device=device)


def recon_loss(logits, x, soft):
    """0.5 CE(fixed) + 0.5 CE(moving), class weights (1, 2.5). soft (pooled) targets t are used as
    class probabilities, so the decoder learns the occupancy the registration net reads; binary
    (1 mm) masks as class labels, as the reference. With the weights the optimum of soft targets is
    2.5t / (1 + 1.5t), not t, which VQAE.pair_probs(calibrate=True) inverts."""
    w = class_weights(logits.device)
    loss = 0
    for c in (0, 1):
        lg, t = logits[:, 2 * c:2 * c + 2].float(), x[:, c]
        tgt = torch.stack([1 - t, t], 1) if soft else (t > 0.5).long()
        loss = loss + 0.5 * F.cross_entropy(lg, tgt, weight=w)
    return loss


def vqae_step(model, opt, scaler, sched, x, soft):
    """One training iteration on a batch x (B, 2, H, W, D) -> (loss, codebook loss, logits, ids),
    all still on the device (no host synchronisation). A non-finite loss: the GradScaler skips
    the step on CUDA, as in the reference; the caller checks on the CPU."""
    xp, size = utils.pad_to_multiple(x, model.stride)
    with utils.autocast(x.device):
        logits, cb, ids = model(xp)
        logits = utils.crop_to(logits, size)
        loss = recon_loss(logits, x, soft) + CB_WEIGHT * cb
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.detach(), cb.detach(), logits.detach(), ids


def codebook_stats(ids, num_codes):
    """(number of codes used, perplexity = exp(entropy of the code histogram))."""
    p = torch.bincount(ids.reshape(-1).cpu(), minlength=num_codes).double()
    p = p[p > 0] / p.sum()
    return int(len(p)), float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def reconstruct(model, pairs, keep_probs=False):
    """Whole pairs (N, 2, H, W, D) -> token ids (N, h, w, d), Dice (N, 2) [fixed, moving] of the
    reconstruction (threshold 0.5 on both) and, if asked, probabilities (N, 2, H, W, D) on the CPU."""
    model.eval()
    dev = next(model.parameters()).device
    ids, dices, probs = [], [], []
    for x in pairs:
        x = x[None].to(dev).float()
        xp, size = utils.pad_to_multiple(x, model.stride)
        with utils.autocast(dev):
            zq, _, t = model.encode(xp)
            fp, mp = VQAE.pair_probs(model.decode(zq), size, calibrate=True)
        ids.append(t[0].cpu())
        dices.append([utils.dice(fp[0], x[0, 0]), utils.dice(mp[0], x[0, 1])])
        if keep_probs:
            probs.append(torch.stack([fp[0], mp[0]]).cpu())
    model.train()
    return torch.stack(ids), np.array(dices), (torch.stack(probs) if keep_probs else None)


def plot_log(rows, path):
    import matplotlib.pyplot as plt

    a = np.array([[np.nan if v == "" else float(v) for v in r] for r in rows])
    col = {h: a[:, i] for i, h in enumerate(LOG_HEADER)}
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.5))
    panels = [("loss", ["loss", "codebook_loss"]), ("reconstruction Dice", ["dice_fixed", "dice_moving",
              "val_dice_fixed", "val_dice_moving"]), ("codebook usage", ["codes_used", "perplexity", "val_codes_used"])]
    for x, (title, keys) in zip(ax, panels):
        for k in keys:
            ok = ~np.isnan(col[k])  # validation columns are filled at intervals only
            x.plot(col["iter"][ok], col[k][ok], **(dict(marker="o") if k[:3] == "val" else dict(lw=0.5)), label=k)
        x.set_title(title), x.set_xlabel("iteration"), x.legend(fontsize=7)
    ax[0].set_yscale("log")
    utils.save_figure(fig, path)


def train(preset, data, out, batch, iters=None, val=None, seed=0, resume=False, overwrite=False, device=None,
          compile=False):
    """Train on `data` (N, 2, H, W, D) at the preset's factor; `val` likewise or None. Returns the model."""
    p, config = PRESETS[preset], model_config(preset)
    device = utils.get_device(device)
    iters = iters or p["samples"] // batch
    utils.seed_all(seed)
    model = build(config).to(device)
    utils.compile_modules([model], compile)
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, iters // 7), T_mult=2)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    start, rows = 0, []
    if resume and os.path.exists(out):
        ck = utils.load_checkpoint(out, "vqae", config)  # another preset -> one-line error
        model.load_state_dict(ck["state"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        utils.load_scaler_state(scaler, ck["scaler"])
        start, rows, iters = ck["iteration"], ck["log"], ck["iters"]
    else:
        utils.check_output(out, overwrite)
    utils.seed_all(seed + start)
    gen = torch.Generator().manual_seed(seed + start)  # batch and patch draws (CPU)
    aug_gen = torch.Generator(device).manual_seed(seed + start)  # augmentation, drawn on the device
    soft = bool(((data > 0) & (data < 1)).any())  # pooled occupancies (cpu/demo) or binary 1 mm masks
    data = utils.to_device_if_fits(data, device)
    base = os.path.splitext(out)[0]
    seen = torch.zeros(model.num_codes, dtype=torch.bool, device=device)  # codes used since the last restart
    log_every = p.get("log_every", LOG_EVERY)

    def save(it):
        utils.save_checkpoint(out, "vqae", config, model.state_dict(), optimizer=opt.state_dict(),
                              scheduler=sched.state_dict(), scaler=scaler.state_dict(), iteration=it,
                              iters=iters, batch=batch, seed=seed, log=rows)
        utils.write_csv(base + ".csv", LOG_HEADER, rows)
        plot_log(rows, base + ".png")

    t0 = time.time() - (rows[-1][-1] if rows else 0)
    bad = 0  # consecutive logged non-finite losses
    bar = tqdm(range(start, iters), desc=f"vqae {preset}", initial=start, total=iters)
    for it in bar:
        x = augment(sample_batch(data, batch, p["patch"], gen).to(device, non_blocking=True), generator=aug_gen)
        loss, cb, logits, ids = vqae_step(model, opt, scaler, sched, x, soft)
        seen[ids.reshape(-1)] = True
        restarted = ""
        if p.get("restart") and (it + 1) % p["restart"] == 0 and it + 1 <= 0.8 * iters:  # settle at the end
            restarted = model.restart_codes(~seen)
            seen[:] = False
        if (it + 1) % log_every and it + 1 != iters and not restarted:
            continue  # the logging below synchronises with the device
        if not math.isfinite(loss.item()):
            bad += 1
            if device.type != "cuda" or bad >= 10:  # without a GradScaler nothing skips the step
                raise RuntimeError(f"VQ-AE loss became {loss.item()} at iteration {it + 1}")
            continue
        bad = 0
        fp, mp = VQAE.pair_probs(logits, calibrate=True)
        used, ppl = codebook_stats(ids, model.num_codes)
        row = [it + 1, loss.item(), cb.item(), utils.dice(fp, x[:, 0]), utils.dice(mp, x[:, 1]), used, ppl,
               sched.get_last_lr()[0], restarted, "", "", ""]
        if val is not None and ((it + 1) % p["val_every"] == 0 or it + 1 == iters):
            vids, vd, _ = reconstruct(model, val)
            row[9:12] = [float(vd[:, 0].mean()), float(vd[:, 1].mean()), codebook_stats(vids, model.num_codes)[0]]
            tqdm.write(f"iter {it + 1}: val Dice fixed {row[9]:.3f} moving {row[10]:.3f}, codes used {row[11]}")
        rows.append(row + [round(time.time() - t0, 1)])
        bar.set_postfix(loss=f"{row[1]:.3f}", dice=f"{(row[3] + row[4]) / 2:.3f}", codes=used, ppl=f"{ppl:.0f}")
        if (it + 1) % p["ckpt_every"] == 0 or it + 1 == iters:
            save(it + 1)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("batch_size", type=int)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--data", help="folder of case_XXX_{1,2}.nii.gz pairs")
    ap.add_argument("--val", help="validation pairs (Dice at intervals)")
    ap.add_argument("--iters", type=int, help="default: preset samples // BATCH_SIZE")
    ap.add_argument("--out", help="checkpoint (default vqae_<preset>.pth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from --out")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the network(s) in place, as the reference does (checkpoints unchanged)")
    a = ap.parse_args(argv)
    if a.batch_size < 1 or (a.iters is not None and a.iters < 1):
        raise utils.DataError("BATCH_SIZE and --iters must be positive")
    out = a.out or f"vqae_{a.preset}.pth"
    if not a.resume:
        utils.check_output(out, a.overwrite)  # fail before the (slow) data loading
    factor = PRESETS[a.preset]["factor"]
    _, data = load_data(a.data or default_data(a.preset), factor)
    val = load_data(a.val, factor)[1] if a.val else None
    patch = PRESETS[a.preset]["patch"]
    if patch and any(s < patch for s in data.shape[-3:]):
        raise utils.DataError(f"{a.data}: volumes {tuple(data.shape[-3:])} smaller than the {patch}^3 patch")
    model = train(a.preset, data, out, a.batch_size, a.iters, val, a.seed, a.resume, a.overwrite, a.device,
                  a.compile)
    print(f"wrote {out}{utils.peak_memory(model.codebook.weight.device)}")


if __name__ == "__main__":
    utils.run_main(main)
