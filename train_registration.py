"""Stage 5: train the two-step inverse-consistent registration net on real or synthetic pairs.

    python train_registration.py [BATCH_SIZE] DATA [--preset paper|cpu|demo] [--iters N] [--out CKPT]
                                 [--seed S] [--frame derived|lung250m4b] [--labels L | --classes L]
                                 [--resume | --overwrite] [--device D] [--compile]

DATA: a folder of ID_1 / ID_2 .nii.gz pairs or a Learn2Reg dataset JSON (its training pairs):
original scans (binarised and framed) or synthetic / phantom volumes already on the pooled frame
grid (soft probabilities in [0, 1]). The frame (utils.data_frame) is stored in CKPT.
--augment (not in the paper; pipeline.py's free baseline "augmented"): every pair of every batch is
deformed by its own random affine + smooth field (utils.random_field), the same draw for its fixed
and moving map, of the pair's strength (utils.field_strengths: the motion a quick registration finds).
"""
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from models import RegistrationNet, model_config

LOG_EVERY = 10  # iterations between host synchronisations (progress bar, finiteness check)
LR, REG, TTA_LR = 0.015, 0.5, 0.005  # the reference's Adam rates (training, test-time adaptation), smoothness weight
# factor: input = frame average-pooled by it (2D frames: factor_2d, default 1, utils.preset_factor).
# model: RegistrationNet kwargs. iters None = the reference's rule.
PRESETS = {
    # the reference: half resolution, smooth velocity squared 12x at input resolution
    "paper": dict(factor=2, batch=8, iters=None, ckpt_every=500, model=dict(pool_strides=(2, 2, 1, 1), exp_at="input")),
    # quarter resolution; one stride-2 pooling keeps the velocity on the reference's physical 8 mm
    # grid (same smoothing); the smooth result is integrated and composed on a 16 mm grid and only
    # the final fields are upsampled (the cheap path, measured in tools/benchmark_registration.py)
    "cpu": dict(factor=4, batch=2, iters=300, ckpt_every=100,
                model=dict(pool_strides=(2, 1, 1), exp_at="velocity", exp_coarsen=2)),
    "demo": dict(factor=4, batch=2, iters=60, ckpt_every=50,
                 model=dict(pool_strides=(2, 1, 1), exp_at="velocity", exp_coarsen=2)),
}


def config_of(preset, frame, classes=None):
    """What the checkpoint stores next to the weights: enough to rebuild net and input grid."""
    p = PRESETS[preset]
    return model_config(preset, utils.preset_factor(p, frame), utils.model_kwargs(p["model"], frame, classes), frame=frame)


def smoothness(ddf):
    """Squared finite differences (diffusion regulariser) of a ddf in normalised units (the reference's)."""
    u = utils.scale_channels(ddf, [2 / n for n in ddf.shape[2:]])
    return sum((u.diff(dim=d) ** 2).mean() for d in range(2, ddf.ndim))


def pair_loss(fixed, moving, ddf, ddf_inv, reg):
    """L1(fixed, warped moving) + L1(moving, warped fixed) + reg x smoothness of both fields. K class
    channels: the L1 summed over them (times K), so a voxel of the wrong class costs what a binary one does."""
    sim = F.l1_loss(utils.warp(moving, ddf, padding="zeros"), fixed)
    sim = sim + F.l1_loss(utils.warp(fixed, ddf_inv, padding="zeros"), moving)
    if fixed.shape[1] > 1:
        sim = sim * fixed.shape[1]
    return sim + reg * (smoothness(ddf) + smoothness(ddf_inv))


def step_loss(net, step, fixed, moving, reg, device):
    """The reference's loss of one step: its UNet's full fields on the pair it sees -> (loss, v)."""
    with utils.autocast(device):
        v = net.step_velocity(step, fixed, moving)  # UNet in fp16 on CUDA; the fields in fp32
    size = fixed.shape[2:]
    ddf, ddf_inv = (utils.resize_ddf(net.exp(w, size), size) for w in (v, -v))
    return pair_loss(fixed, moving, ddf, ddf_inv, reg), v


def train_step(net, opts, scaler, fixed, moving, reg, device):
    """One iteration on a batch (B, 1, H, W, D) each ((B, 1, H, W) in 2D) -> (summed loss (0-dim tensor, no host sync),
    v1, v2 detached: net.fields(v1, v2, size) are the fields this iteration computed). As the
    reference: UNet 1 is optimised on its own full fields, then the pair is warped half-way by step 1
    and detached, and UNet 2 is optimised on that pair with its own loss."""
    total, vs = 0, []
    for step, o in enumerate(opts):
        loss_k, v = step_loss(net, step, fixed, moving, reg, device)
        utils.optimiser_step(loss_k, o, scaler)
        total = total + loss_k.detach()
        vs.append(v.detach())
        if step == 0:
            with torch.no_grad():
                fixed, moving = net.halfway(vs[0], fixed, moving)
    return total, vs[0], vs[1]


def optimise(net, batches, iters, lr, reg, device, desc="train", on_step=None, start=0, opt_state=None,
             reduce=False):
    """Adam on both UNets (one optimiser per UNet, as the reference). `batches(i)` -> (fixed, moving).
    Used for training and for test-time adaptation alike; reduce: the logged loss is averaged over
    torchrun's processes (training; a test-time adaptation runs on one process's own pair). Returns (optimisers, (v1, v2) of the
    last iteration's forward pass, i.e. before its update, as the reference evaluates TTA)."""
    opts = [torch.optim.Adam(u.parameters(), lr=lr) for u in net.unets]
    if opt_state:
        for o, s in zip(opts, opt_state):
            o.load_state_dict(s)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    bar = tqdm(range(start, iters), desc=desc, initial=start, total=iters, leave=False,
                disable=iters - start < 2 or not utils.is_main())
    last = None
    for i in bar:
        fixed, moving = batches(i)
        total, *last = train_step(net, opts, scaler, fixed, moving, reg, device)
        if on_step:
            on_step(i + 1, opts, total)
        if (i + 1) % LOG_EVERY == 0 or i + 1 == iters:  # the only host synchronisation
            value = utils.all_mean([total], device)[0] if reduce else total.item()
            if device.type != "cuda" and not math.isfinite(value):
                raise RuntimeError(f"registration loss became {value} at iteration {i + 1}")
            bar.set_postfix(loss=f"{value:.4f}")
    return opts, last


def augment_pairs(x, motion, frame, generator):
    """x (B, 2, H, W, D) (K classes: (B, 2K, ...)) on a pooled frame grid: each pair warped by its own
    random affine + smooth field (utils.random_field, magnitude motion[b] mm over its fixed map), both
    maps by the same one."""
    out = []
    K = x.shape[1] // 2
    for pair, mm in zip(x, motion):
        u = utils.random_field(frame, float(mm), utils.field_weight(pair[:K].sum(0).cpu(), frame), generator, utils.AFFINE_STD)
        out.append(utils.random_warp(pair[None], u))
    return torch.cat(out)


def train(*, data, out, preset, batch_size, iters=None, seed=0, resume=False, overwrite=False, device=None,
          compile=False, log=utils.main_print, frame=None, labels=None, augment=False, classes=None):
    """Train on the training pairs of DATA placed in `frame` (utils.data_frame); returns the net.
    augment: every batch through augment_pairs. classes: label values kept apart (utils.load_pairs)."""
    utils.check_label_options(labels, classes)
    p, cfg = PRESETS[preset], config_of(preset, utils.data_frame(data, frame), classes)
    # a constant learning rate: a larger --iters simply trains on to the new target
    ck, batch_size, seed = utils.start_training(out, "regnet", resume=resume, overwrite=overwrite, batch_size=batch_size,
                                                seed=seed, iters=iters, default_batch=p["batch"], config=cfg,
                                                data=os.path.abspath(data), labels=labels, classes=classes)
    if ck is not None and ck.get("augment", False) != augment:
        raise utils.DataError(f"{out}: trained {'with' if ck.get('augment') else 'without'} --augment; resume the same way "
                              "or write a new --out")
    iters = iters or p["iters"] or 2500 // batch_size * 4
    ids, pairs = utils.load_pairs(data, cfg["factor"], cfg["frame"], labels=labels, classes=classes,
                                  compact=True)  # (N, 2, H, W, D); K classes (N, 2K, ...), label maps one-hot per batch
    K = len(classes or [1])
    rank, _, device = utils.distributed(device)
    local = utils.local_batch(batch_size)
    pairs = utils.to_device_if_fits(pairs.half(), device)  # exact for masks pooled by 2 or 4; fp16 maps as the reference
    utils.seed_all(seed)
    net = RegistrationNet.build(cfg).to(device)
    utils.compile_modules(net.unets, compile)
    net.parallel(device)
    gen = torch.Generator().manual_seed(seed * 100003)  # batch draws
    # augmentation: its own stream (the batch draws stay those of a run without it)
    gens = [gen, torch.Generator().manual_seed(seed * 100003 + 1)] if augment else [gen]
    motion = None
    if augment and ck is not None:
        motion = torch.tensor(ck["motion"])  # as measured at the start: a resumed run draws the same fields
    elif augment:
        strengths, disp, r = utils.field_strengths(utils.foreground(pairs, classes), cfg["factor"], cfg["frame"], gens[1])
        motion = torch.tensor(strengths)
        log(f"augmentation: random affine (std {utils.AFFINE_STD}) + smooth field per pair of {motion.mean():.2f} mm on "
            f"average (the pairs' quick-registration displacement {sum(disp) / len(disp):.2f} mm / {r:.2f}, the share "
            "of a random field's it finds)")
    start = 0
    opt_state = None
    if ck is not None:
        net.load_weights(ck["state"], out)
        utils.set_rng_state(ck["rng"], gens)
        start = ck["iteration"]
        opt_state = ck["optimisers"]

    def batches(i):
        # distinct pairs in a batch (the reference's randperm) when there are enough
        if batch_size <= len(ids):
            idx = torch.randperm(len(ids), generator=gen)[:batch_size]
        else:
            idx = torch.randint(len(ids), (batch_size,), generator=gen)
        if augment:  # every process draws the whole global batch's fields, then keeps its share
            x = pairs[idx.to(pairs.device)].to(device, non_blocking=True).float()
            x = augment_pairs(x, motion[idx], cfg["frame"], gens[1])[rank * local:(rank + 1) * local]
            return x[:, :K], x[:, K:]
        idx = idx[rank * local:(rank + 1) * local]  # the global batch's draws, this process's share
        x = pairs[idx.to(pairs.device)].to(device, non_blocking=True).float()
        return x[:, :K], x[:, K:]

    def on_step(i, opts, total):
        if i % p["ckpt_every"] and i != iters:
            return
        loss_value = utils.all_mean([total], device)[0]
        if utils.is_main():
            utils.save_checkpoint(out, "regnet", cfg, net.state_dict(), iteration=i, loss=loss_value,
                                  optimisers=[o.state_dict() for o in opts], rng=utils.rng_state(gens), iters=iters,
                                  data=os.path.abspath(data), cases=ids, seed=seed, batch=batch_size, labels=labels,
                                  classes=classes,
                                  augment=augment, motion=None if motion is None else motion.tolist(),
                                  precision=utils.precision(device))
        utils.barrier()  # nobody reads the checkpoint before it is written

    t = time.time()
    log(f"train_registration: {len(ids)} pairs from {data} at {tuple(pairs.shape[2:])}, preset {preset}, "
        f"{iters} iterations of batch {batch_size} on {device}")
    optimise(net, batches, iters, LR, REG, device, desc=f"train {preset}", on_step=on_step, start=start,
             opt_state=opt_state, reduce=True)
    if start >= iters:
        log(f"{out} already holds {start} >= {iters} iterations")
    log(f"wrote {out} ({time.time() - t:.0f} s, {(time.time() - t) / max(iters - start, 1):.2f} s/iteration"
        f"{utils.peak_memory(device)})")
    return net


def main(argv=None):
    ap = utils.training_parser(__doc__, PRESETS, "regnets_state_<DATA name>.pth")
    ap.add_argument("data", help="folder of ID_{1,2}.nii.gz pairs or a Learn2Reg dataset JSON")
    utils.data_options(ap)
    ap.add_argument("--augment", action="store_true",
                    help="a random affine + smooth field per pair and batch, the same for both maps (not in the paper)")
    args = ap.parse_args(argv)
    name = os.path.basename(os.path.normpath(args.data)).removesuffix(".json")
    out = args.out or f"regnets_state_{name}.pth"
    train(data=args.data, out=out, preset=args.preset, batch_size=args.batch_size, iters=args.iters, seed=args.seed,
          resume=args.resume, overwrite=args.overwrite, device=args.device, compile=args.compile, frame=args.frame,
          labels=args.labels, augment=args.augment, classes=args.classes)


if __name__ == "__main__":
    utils.run_main(main)
