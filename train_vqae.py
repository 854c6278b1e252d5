"""Stage 1: train the paired 3D (or 2D) VQ-AE (models.VQAE) on fixed/moving vessel-mask pairs.

    python train_vqae.py [BATCH_SIZE] [--preset paper|cpu|demo] [--data DATA] [--val DATA] [--iters N]
                         [--out CKPT] [--seed S] [--diff-weight W] [--frame derived|lung250m4b]
                         [--labels L | --classes L] [--resume | --overwrite]

Both masks of a pair enter as two channels, so one token grid describes the pair. Each step:
a batch of pairs (paper: random 128^3 patches, same location in fixed and moving; cpu/demo: whole
quarter-resolution volumes), one random affine per pair (identity 3x4 + N(0, 0.05), nearest),
loss = 0.5 CE(fixed) + 0.5 CE(moving) with class weights (1, 2.5) + 0.1 codebook loss.
--diff-weight W (not in the paper; 0 = the reference) weighs each voxel by 1 + W |fixed - moving|:
the voxels that carry the pair's deformation, which a plain CE learns last (RESULTS.md).
At every validation: reconstruction Dice and the deformation the reconstructions keep (quick
registration displacement of reconstructed / real pairs, training and validation pairs).
DATA: a folder of ID_1 / ID_2 pairs or a Learn2Reg dataset JSON (its registration_val pairs are the
default --val). Writes CKPT (kind 'vqae': preset, model kwargs, data factor and frame in its
config), CKPT.csv, CKPT.png. 2D images make a 2D VQ-AE (2D convolutions, (h, w) token grids) at the
preset's factor_2d.
"""
import functools
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import utils
from models import VQAE, model_config

SAMPLES = 336000  # paper: 336000 // BATCH_SIZE iterations
PRESETS = {
    # factor: frame pooling (1 = 1 mm); patch: random cube side (None = whole volume); samples: iters x batch
    # factor_2d: the pooling of 2D frames (utils.preset_factor): none, a slice is small
    "paper": dict(factor=1, patch=128, samples=SAMPLES, batch=8, lr=5e-4, ckpt_every=3500, val_every=3500, model={}),
    # quarter res 64x52x64 padded to 64x56x64; stride 8 -> 8x7x8 = 448 tokens. The first layer already
    # strides by 2: a full-resolution stage costs far more time on 2 CPU cores for little Dice.
    # restart: every N iterations, codes unused since the last restart are moved onto encoder outputs
    # (not in the paper; without it the codebook collapses to ~12 codes within 200 iterations here).
    # diff_weight 4: the smallest weight tried (0, 4, 16) whose reconstructions of the training pairs
    # keep >= 80 % of their displacement with Dice(fixed, moving) within 0.1 of theirs (RESULTS.md).
    "cpu": dict(factor=4, patch=None, samples=24000, batch=2, lr=5e-4, ckpt_every=250, val_every=250, restart=50,
                diff_weight=4.0,
                model=dict(channels=(32, 64, 128, 128, 128), strides=(2, 2, 2, 1, 1), num_codes=512)),
    # demo: 1200 iterations with the cpu preset's diff_weight: the synthetic phantom pairs keep ~55 % of
    # the phantoms' motion, within the demo's time (RESULTS.md, "The demo")
    "demo": dict(factor=4, patch=None, samples=2400, batch=2, lr=2e-3, ckpt_every=300, val_every=300, restart=25,
                 diff_weight=4.0, model=dict(channels=(16, 32, 32, 32), strides=(2, 2, 2, 1), num_codes=128)),
}
CB_WEIGHT = 0.1
LOG_EVERY = 10  # iterations between log rows: the only host-device synchronisation of the loop
REALISM_FACTOR = 4  # deformation kept is measured at 4 mm, as in realism_report.py
LOG_FIELDS = ["iter", "loss", "codebook_loss", "dice_fixed", "dice_moving", "codes_used", "perplexity", "lr",
              "codes_restarted", "val_dice_fixed", "val_dice_moving", "val_codes_used", "train_disp_kept",
              "train_dice_fm", "val_disp_kept", "val_dice_fm", "seconds"]


def config_of(preset, frame, classes=None):
    """The checkpoint config: everything needed to rebuild the model and its input."""
    p = PRESETS[preset]
    return model_config(preset, utils.preset_factor(p, frame), utils.model_kwargs(p["model"], frame, classes), frame=frame)


def load_data(data, factor, frame, split="train", labels=None, classes=None):
    """DATA's pairs of `split` (or pairs already loaded) -> (N, 2, H, W, D) ((N, 2, H, W) in 2D; K classes:
    (N, 2K, ...)) float16 (exact for masks and for 1/64 steps of quarter-res occupancy); K hard label maps:
    utils.LabelPairs (uint8, one-hot per batch)."""
    if torch.is_tensor(data) or isinstance(data, utils.LabelPairs):
        return data.half()
    return utils.load_pairs(data, factor, frame, utils.find_pairs(data, split), labels=labels, classes=classes,
                            compact=True)[1].half()


def sample_batch(data, batch, patch, generator, part=slice(None)):
    """Random pairs (and patches) of `data` (N, 2, H, W, D), on data's device. The draws come from
    a CPU `generator` and index by Python ints: no host-device synchronisation. All `batch` draws
    are made; `part` (a slice) picks this process's share under torchrun."""
    idx = torch.randint(len(data), (batch,), generator=generator).tolist()
    if patch is None:
        return torch.stack([data[i] for i in idx[part]])
    corners = []
    for _ in idx:  # same patch location in fixed and moving (they are the two channels)
        corners.append([int(torch.randint(s - patch + 1, (1,), generator=generator)) for s in data.shape[2:]])
    out = [data[(i, slice(None), *(slice(v, v + patch) for v in c))] for i, c in zip(idx[part], corners[part])]
    return torch.stack(out)


@functools.lru_cache(maxsize=8)
def class_weights(device, classes=1):
    """(background, class 1, ..., class K) cross-entropy weights: the paper's vessel weight for every class."""
    return torch.tensor(VQAE.CLASS_WEIGHTS[:1] + VQAE.CLASS_WEIGHTS[1:] * classes, device=device)


def recon_loss(logits, x, soft, diff_weight=0.0):
    """0.5 CE(fixed) + 0.5 CE(moving), class weights (1, 2.5). soft (pooled) targets t are used as
    class probabilities, so the decoder learns the occupancy the registration net reads; binary
    (1 mm) masks as class labels, as the reference. With the weights the optimum of soft targets is
    2.5t / (1 + 1.5t), not t, which VQAE.pair_probs(calibrate=True) inverts.
    diff_weight W > 0: voxel weights v = 1 + W |t_fixed - t_moving| (normalised like the mean, so
    W = 0 is the plain loss); a voxel's weight scales both of its classes, so the optimum and the
    calibration stay the same. K classes: x (B, 2K, ...), a (K+1)-class CE per map, |fixed - moving|
    summed over the classes."""
    K = x.shape[1] // 2
    w = class_weights(logits.device, K)
    v = 1 + diff_weight * (utils.fp32(x[:, :K]) - utils.fp32(x[:, K:])).abs().sum(1) if diff_weight else None
    loss = 0
    for c in (0, 1):
        lg, t = utils.fp32(logits[:, c * (K + 1):(c + 1) * (K + 1)]), x[:, c * K:(c + 1) * K]
        if soft:
            tgt = torch.cat([1 - t.sum(1, keepdim=True), t], 1)
        else:  # class indices of binary maps; 0.5 ties to background, as (t > 0.5)
            tgt = torch.cat([torch.full_like(t[:, :1], 0.5), t], 1).argmax(1)
        if v is None:
            loss = loss + 0.5 * F.cross_entropy(lg, tgt, weight=w)
            continue
        per_voxel = F.cross_entropy(lg, tgt, weight=w, reduction="none")
        norm = v.mean() if soft else (v * w[tgt]).mean()  # what reduction="mean" divides by
        loss = loss + 0.5 * (per_voxel * v).mean() / norm
    return loss


def vqae_step(model, opt, scaler, sched, x, soft, diff_weight=0.0, net=None):
    """One training iteration on a batch x (B, 2, H, W, D) -> (loss, codebook loss, logits, ids),
    all still on the device (no host synchronisation). A non-finite loss: the GradScaler skips
    the step on CUDA, as in the reference; the caller checks on the CPU. net: what runs the model
    (its DistributedDataParallel wrapper under torchrun)."""
    xp, size = utils.pad_to_multiple(x, model.stride)
    with utils.autocast(x.device):
        logits, cb, ids = (net or model)(xp)
        logits = utils.crop_to(logits, size)
        loss = recon_loss(logits, x, soft, diff_weight) + CB_WEIGHT * cb
    utils.optimiser_step(loss, opt, scaler)
    sched.step()
    return loss.detach(), cb.detach(), logits.detach(), ids


# torchrun collectives of the codebook restart and the logged code usage
def all_max_(t):
    """In place: t (an integer/bool tensor) -> its elementwise maximum over the processes."""
    if utils.world()[1] > 1:
        u = t.to(torch.int32)
        dist.all_reduce(u, op=dist.ReduceOp.MAX)
        t.copy_(u.to(t.dtype))
    return t


def all_cat(t):
    """Concatenate equal-shaped tensors of every process along dim 0, in rank order."""
    if utils.world()[1] == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(utils.world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_(t, src=0):
    """In place: every process gets process `src`'s t."""
    if utils.world()[1] > 1:
        dist.broadcast(t, src)
    return t


def restart_dead_codes(model, seen):
    """Move the codes no process used since the last restart (seen: bool (K,), this process's usage;
    reset here) onto encoder outputs. Under torchrun every process moves the same codes, then all
    take process 0's replacements: each process saw other encoder outputs, and the codebooks must
    stay identical. Returns the number of codes moved."""
    moved = model.restart_codes(~all_max_(seen))
    broadcast_(model.codebook.weight.data)
    seen[:] = False
    return moved


def plot_log(rows, path):
    import matplotlib.pyplot as plt

    col = {h: np.array([np.nan if r.get(h, "") == "" else float(r[h]) for r in rows]) for h in LOG_FIELDS}
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.5))
    panels = [("loss", ["loss", "codebook_loss"]), ("reconstruction Dice", ["dice_fixed", "dice_moving",
              "val_dice_fixed", "val_dice_moving"]), ("codebook usage", ["codes_used", "perplexity", "val_codes_used"]),
              ("deformation kept (recon / real)", ["train_disp_kept", "val_disp_kept"])]
    for panel, (title, keys) in zip(ax, panels):
        for k in keys:
            ok = ~np.isnan(col[k])  # validation columns are filled at intervals only
            style = dict(marker="o") if k.startswith("val") else dict(lw=0.5)
            panel.plot(col["iter"][ok], col[k][ok], label=k, **style)
        panel.set_title(title)
        panel.set_xlabel("iteration")
        panel.legend(fontsize=7)
    ax[0].set_yscale("log")
    utils.save_figure(fig, path)


def train(*, data, out, preset, batch_size, iters=None, seed=0, resume=False, overwrite=False, val=None, device=None,
          compile=False, diff_weight=None, frame=None, labels=None, classes=None):
    """Train on the pairs of DATA at the preset's factor (`val`: DATA for validation Dice at
    intervals, default a dataset JSON's registration_val pairs; either may also be pairs already
    loaded, see load_data, in the frame given as a dict, default lung250m4b). frame: see
    utils.data_frame. diff_weight: see recon_loss (None: the preset's, 0 = the reference). classes: label
    values kept apart (utils.load_pairs), recorded in the checkpoint. Returns the model."""
    p = PRESETS[preset]
    utils.check_label_options(labels, classes)
    data_path = os.path.abspath(data) if isinstance(data, str) else None  # None: pairs already loaded
    frame = utils.data_frame(data, frame) if data_path else utils.check_frame(frame or utils.LUNG250M4B, "frame")
    config = config_of(preset, frame, classes)
    if val is None and data_path and utils.dataset_json(data) and utils.read_dataset(utils.dataset_json(data))["val"]:
        val = data
    # another preset -> one-line error; the learning-rate schedule was planned for the checkpoint's iterations
    ck, batch_size, seed = utils.start_training(out, "vqae", resume=resume, overwrite=overwrite, batch_size=batch_size,
                                                seed=seed, iters=iters, default_batch=p["batch"], config=config,
                                                outputs=utils.log_paths(out), fixed_iters=True, diff_weight=diff_weight,
                                                data=data_path, labels=labels, classes=classes)
    if ck is not None:
        diff_weight = ck["diff_weight"]
    diff_weight = p.get("diff_weight", 0.0) if diff_weight is None else float(diff_weight)
    if not math.isfinite(diff_weight) or diff_weight < 0:
        raise utils.DataError(f"--diff-weight must be a finite number >= 0, got {diff_weight}")
    factor, dims = config["factor"], utils.spatial_dims(frame)
    train_data = load_data(data, factor, frame, labels=labels, classes=classes)
    val = None if val is None else load_data(val, factor, frame, utils.val_split(val) if isinstance(val, str) else None,
                                             labels, classes)
    if p["patch"] and any(s < p["patch"] for s in train_data.shape[2:]):
        raise utils.DataError(f"{data}: volumes {tuple(train_data.shape[2:])} smaller than the {p['patch']}^{dims} patch")
    rank, _, device = utils.distributed(device)
    local = utils.local_batch(batch_size)
    part = slice(rank * local, (rank + 1) * local)  # this process's share of every global batch
    iters = iters or p["samples"] // batch_size
    utils.seed_all(seed)
    model = VQAE.build(config).to(device)
    utils.compile_modules([model], compile)
    net = utils.parallel(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, iters // 7), T_mult=2)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    utils.seed_all(seed)
    gen = torch.Generator().manual_seed(seed)  # batch and patch draws (CPU)
    aug_gen = torch.Generator(device).manual_seed(seed)  # augmentation, drawn on the device
    seen = torch.zeros(model.num_codes, dtype=torch.bool, device=device)  # codes used since the last restart
    start, rows = 0, []
    if ck is not None:
        utils.resume_state(ck, out, model, opt, sched, scaler)  # ck: read and checked above
        utils.set_rng_state(ck["rng"], [gen, aug_gen])
        start, rows, iters = ck["iteration"], ck["log"], ck["iters"]
        seen = ck["seen"].to(device)
    # pooled occupancies (cpu/demo) or binary 1 mm masks (label maps held as indices are never soft)
    soft = not isinstance(train_data, utils.LabelPairs) and bool(((train_data > 0) & (train_data < 1)).any())
    to_realism = REALISM_FACTOR // factor
    real_def = {}  # the real pairs' deformation (quick-registration displacement, Dice(f, m)), measured once
    if val is not None:
        pooled = {k: torch.cat([utils.pool(utils.foreground(x[i:i + 1], classes), to_realism, dims) for i in range(len(x))])
                  for k, x in (("train", train_data), ("val", val))}  # pair by pair: label maps stay uint8 meanwhile
        real_def = {k: utils.pair_stats(range(len(x)), x, REALISM_FACTOR) for k, x in pooled.items()}
    train_data = utils.to_device_if_fits(train_data, device)
    base = os.path.splitext(out)[0]
    log_every = p.get("log_every", LOG_EVERY)

    def save(it):
        all_max_(seen)  # codes used by any process
        if not utils.is_main():
            return utils.barrier()  # one writer; nobody reads before it has written
        utils.save_checkpoint(out, "vqae", config, model.state_dict(), optimizer=opt.state_dict(),
                              scheduler=sched.state_dict(), scaler=scaler.state_dict(), iteration=it,
                              iters=iters, batch=batch_size, seed=seed, log=rows, rng=utils.rng_state([gen, aug_gen]),
                              seen=seen.cpu(), diff_weight=diff_weight, data=data_path, labels=labels, classes=classes,
                              precision=utils.precision(device))
        utils.write_csv(base + ".csv", LOG_FIELDS, rows)
        plot_log(rows, base + ".png")
        utils.barrier()

    t0 = time.time() - (rows[-1]["seconds"] if rows else 0)
    bad = 0  # consecutive logged non-finite losses
    bar = tqdm(range(start, iters), desc=f"vqae {preset}", initial=start, total=iters, disable=not utils.is_main())
    for it in bar:
        batch = sample_batch(train_data, batch_size, p["patch"], gen, part).to(device, non_blocking=True)
        x = utils.augment(batch, generator=aug_gen, share=utils.world())
        loss, cb, logits, ids = vqae_step(model, opt, scaler, sched, x, soft, diff_weight, net)
        seen[ids.reshape(-1)] = True
        restarted = ""
        if p.get("restart") and (it + 1) % p["restart"] == 0 and it + 1 <= 0.8 * iters:  # settle at the end
            restarted = restart_dead_codes(model, seen)
        checkpoint = (it + 1) % p["ckpt_every"] == 0 or it + 1 == iters
        if (it + 1) % log_every and not checkpoint and not restarted:
            continue  # the logging below synchronises with the device
        fixed, moving = VQAE.pair_probs(logits, calibrate=True)
        K = model.classes
        loss_v, cb_v, dice_f, dice_m = utils.all_mean([loss, cb, utils.dice(fixed, x[:, :K].squeeze(1)),
                                                       utils.dice(moving, x[:, K:].squeeze(1))], device)
        if not math.isfinite(loss_v):
            bad += 1
            if device.type != "cuda" or bad >= 10:  # without a GradScaler nothing skips the step
                raise RuntimeError(f"VQ-AE loss became {loss_v} at iteration {it + 1}")
            continue
        bad = 0
        used, ppl = utils.codebook_stats(all_cat(ids), model.num_codes)
        row = {"iter": it + 1, "loss": loss_v, "codebook_loss": cb_v, "dice_fixed": dice_f, "dice_moving": dice_m,
               "codes_used": used, "perplexity": ppl, "lr": sched.get_last_lr()[0], "codes_restarted": restarted}
        if val is not None and utils.is_main() and ((it + 1) % p["val_every"] == 0 or it + 1 == iters):
            kept = []
            for k, x_real in (("train", train_data), ("val", val)):
                vids, vd, recon = model.reconstruct(x_real, keep_probs=True, pool=to_realism)
                row[f"{k}_disp_kept"], row[f"{k}_dice_fm"], real_fm = utils.deformation_kept(real_def[k], recon,
                                                                                                REALISM_FACTOR)
                kept.append(f"{k} {100 * row[f'{k}_disp_kept']:.0f} % (Dice(f, m) {row[f'{k}_dice_fm']:.2f} vs "
                            f"{real_fm:.2f})")
            row["val_dice_fixed"] = float(vd[:, 0].mean())  # vids, vd: the validation pairs' (last in the loop)
            row["val_dice_moving"] = float(vd[:, 1].mean())
            row["val_codes_used"] = utils.codebook_stats(vids, model.num_codes)[0]
            tqdm.write(f"iter {it + 1}: val Dice fixed {row['val_dice_fixed']:.3f} moving {row['val_dice_moving']:.3f}, "
                       f"codes used {row['val_codes_used']}; deformation kept: " + ", ".join(kept))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        if checkpoint:
            save(it + 1)
        dice = (row["dice_fixed"] + row["dice_moving"]) / 2
        bar.set_postfix(loss=f"{row['loss']:.3f}", dice=f"{dice:.3f}", codes=used, ppl=f"{ppl:.0f}")
    return model


def main(argv=None):
    ap = utils.training_parser(__doc__, PRESETS, "vqae_<preset>.pth")
    ap.add_argument("--data", default="dilated_vessels", help="folder of ID_{1,2}.nii.gz pairs or a Learn2Reg dataset JSON")
    ap.add_argument("--val", help="validation pairs (Dice and deformation kept at intervals; default: "
                    "a dataset JSON's registration_val)")
    utils.data_options(ap)
    ap.add_argument("--diff-weight", type=float, help="extra CE weight on voxels where fixed and moving differ "
                    "(default: the preset's; 0 = the reference)")
    args = ap.parse_args(argv)
    out = args.out or f"vqae_{args.preset}.pth"
    model = train(data=args.data, out=out, preset=args.preset, batch_size=args.batch_size, iters=args.iters,
                  seed=args.seed, resume=args.resume, overwrite=args.overwrite, val=args.val, device=args.device,
                  compile=args.compile, diff_weight=args.diff_weight, frame=args.frame, labels=args.labels,
                  classes=args.classes)
    utils.main_print(f"wrote {out}{utils.peak_memory(model.codebook.weight.device)}")


if __name__ == "__main__":
    utils.run_main(main)
