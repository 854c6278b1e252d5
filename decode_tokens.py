"""Decode a token file whose VQ-AE is not available (the reference's paper_tokens_97.pth) into pairs.

    python decode_tokens.py TOKENS --data DIR [--out DIR] [--preset paper|cpu|demo] [--iters N]
                            [--folds 5] [--seed S] [--device D] [--overwrite]

Not part of the paper: the reference trained its generator on 97 Lung250M-4B training pairs, and of
87 of them only the token grids of its VQ-AE are public. A models.TokenDecoder is fitted on the pairs
of DATA that have a grid in TOKENS (same case id; the reference's list maps to its cases in
utils.REFERENCE_CASES), then every grid is decoded into OUT/case_XXX_1.nii.gz (fixed) and _2
(moving): occupancies in [0, 1] on the frame grid pooled by the preset's factor, with the frame
affine, so OUT is directly a DATA_FOLDER of train_registration.py, and at cpu/demo (4 mm) also of
the cpu/demo generator stages. The decoder gives the fixed map and a smooth motion that warps it
into the moving map (TokenDecoder(motion=True), the motion learned from each pair's quick
registration): a decoded pair is one map, deformed, as a real pair is.

First a K-fold check over the fitted pairs (contiguous folds in sorted case order; K = 5 of 10 pairs
holds out 2 each): a decoder fitted without the held-out pairs decodes their grids, and the
held-out reconstruction Dice (0.5) and deformation kept (quick-registration displacement of the
decoded / of the real pair, utils.deformation_kept) say how faithful the decoded pairs of cases
without volumes are. OUT/manifest.json records the token file's SHA-256, the fitted cases, the
fold metrics and the settings; OUT/decoder.pth the final decoder; OUT/preview.png held-out pairs,
real and decoded. An interrupted run continues (finished folds and the final fit are kept).
"""
import argparse
import glob
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from models import TokenDecoder, model_config

# factor: output = frame average-pooled by it. diff_weight: voxel weights 1 + W |fixed - moving| in
# the BCE, as the cpu VQ-AE's (the voxels that carry the deformation). model: TokenDecoder kwargs;
# up_channels gives the widths of the x2 upsamplings, as many as the token grid needs (last repeated).
PRESETS = {
    "paper": dict(factor=2, batch=8, iters=3000, lr=1e-3, diff_weight=4.0,
                  model=dict(up_channels=(64, 32, 16), motion=True)),
    "cpu": dict(factor=4, batch=2, iters=1500, lr=1e-3, diff_weight=4.0, model=dict(up_channels=(32, 16), motion=True)),
    "demo": dict(factor=4, batch=2, iters=150, lr=3e-3, diff_weight=4.0,
                 model=dict(embed=16, width=16, blocks=1, up_channels=(16, 8), motion=True)),
}
WEIGHT_DECAY = 0.01
# a TokenDecoder(motion=True)'s ddf is pulled towards the real pair's quick-registration field (MSE in
# voxels of the factor grid, ~1-3 voxels of motion) next to the BCE, which refines it
MOTION_WEIGHT = 1.0


def config_of(preset, tokens):
    """The decoder's checkpoint config for a token file (read_tokens): as many x2 upsamplings as
    take its grid to the preset's frame grid (or just past it: the output is cropped)."""
    p = PRESETS[preset]
    factor = utils.preset_factor(p, tokens["frame"])
    size = utils.grid_shape(factor, tokens["frame"])
    ratio = max(s / g for s, g in zip(size, tokens["grid_shape"]))
    ups = max(0, math.ceil(math.log2(ratio) - 1e-9))
    widths = p["model"]["up_channels"]
    kwargs = dict(p["model"], num_codes=tokens["num_codes"],
                  up_channels=[widths[min(i, len(widths) - 1)] for i in range(ups)])
    return model_config(preset, factor, utils.model_kwargs(kwargs, tokens["frame"]), grid_shape=list(tokens["grid_shape"]),
                        frame=tokens["frame"])


def decoder_loss(logits, x, diff_weight):
    """BCE of fixed and moving occupancy logits (B, 2, ...) against soft targets x (B, 2, ...), each
    voxel weighted by 1 + W |x_fixed - x_moving| / its mean (W = 0: the plain mean). Soft targets:
    the sigmoid's optimum is the occupancy itself, so no calibration is needed."""
    x = utils.fp32(x)
    v = 1 + diff_weight * (x[:, :1] - x[:, 1:]).abs()
    per_voxel = F.binary_cross_entropy_with_logits(utils.fp32(logits), x, reduction="none")
    return (per_voxel * v).mean() / v.mean()


def motion_targets(pairs):
    """The ddf a TokenDecoder(motion=True) learns for each pair (N, 2, H, W, D): (N, 3, H, W, D) with
    fixed(y + ddf(y)) ~ moving(y), utils.quick_field (the field deformation_kept measures)."""
    return torch.cat([utils.quick_field(p[1], p[0]) for p in pairs])


def decoder_step(model, opt, scaler, grids, x, diff_weight, motion=None):
    """One iteration on token grids (B, h, w, d) and their pairs x (B, 2, H, W, D) -> the loss
    (0-dim tensor on the device; the decoder under utils.autocast, the loss in fp32). scaler: a
    GradScaler, enabled on CUDA: a mean over ~1e7 voxels gives per-voxel gradients below fp16's range.
    motion: the pairs' motion_targets, for a decoder with `motion`."""
    with utils.autocast(x.device):
        logits, ddf = model.logits_and_motion(grids)
    loss = decoder_loss(utils.crop_to(logits, x.shape[2:]), x, diff_weight)
    if motion is not None:
        loss = loss + MOTION_WEIGHT * F.mse_loss(utils.fp32(utils.crop_to(ddf, x.shape[2:])), motion)
    utils.optimiser_step(loss, opt, scaler)
    return loss.detach()


def fit(cfg, grids, pairs, iters, seed, device, desc="fit"):
    """A TokenDecoder fitted on token grids (N, h, w, d) and their pairs (N, 2, H, W, D): AdamW with a
    cosine learning rate, batches of distinct pairs -> the decoder (eval mode) and its last losses."""
    p = PRESETS[cfg["preset"]]
    utils.seed_all(seed)
    model = TokenDecoder.build(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    gen = torch.Generator().manual_seed(seed * 100003)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    batch = min(p["batch"], len(pairs))
    motion = motion_targets(pairs).to(device) if model.motion else None
    grids, pairs = grids.to(device), pairs.to(device)
    losses = []
    bar = tqdm(range(iters), desc=desc, leave=False)
    for i in bar:
        idx = torch.randperm(len(pairs), generator=gen)[:batch].to(device)
        target = None if motion is None else motion[idx]
        losses.append(decoder_step(model, opt, scaler, grids[idx], pairs[idx], p["diff_weight"], target))
        sched.step()
        if (i + 1) % 50 == 0 or i + 1 == iters:
            recent = float(torch.stack(losses[-50:]).mean())
            if not math.isfinite(recent):
                raise utils.DataError(f"{desc}: the loss became {recent} at iteration {i + 1}")
            bar.set_postfix(loss=f"{recent:.4f}")
    return model.eval(), recent


def decode(model, grids, size, device, batch=8):
    """Occupancies (N, 2, *size) on the CPU of token grids (N, h, w, d)."""
    out = []
    for c in range(0, len(grids), batch):
        with torch.no_grad(), utils.autocast(device):
            out.append(model.occupancy(grids[c:c + batch].to(device), size).cpu())
    return torch.cat(out)


def fold_metrics(real, recon, factor):
    """Held-out pairs: reconstruction Dice (fixed, moving) and deformation kept (utils.deformation_kept)."""
    dice = np.array([[utils.dice(r[k], q[k]) for k in (0, 1)] for r, q in zip(real, recon)])
    kept, dice_fm, real_dice_fm = utils.deformation_kept(real, recon, factor)
    return {"dice_fixed": float(dice[:, 0].mean()), "dice_moving": float(dice[:, 1].mean()), "kept": kept,
            "dice_fm": dice_fm, "real_dice_fm": real_dice_fm}


def fold_table(folds):
    """Markdown table of the fold check, with the mean over folds."""
    cols = ("dice_fixed", "dice_moving", "kept", "dice_fm", "real_dice_fm")
    lines = ["| fold | held out | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for k, f in enumerate(folds):
        lines.append(f"| {k} | {', '.join(f['held_out'])} | " + " | ".join(f"{f[c]:.3f}" for c in cols) + " |")
    lines.append("| mean | | " + " | ".join(f"{np.mean([f[c] for f in folds]):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def preview(path, shown):
    """MIPs of held-out pairs: real and decoded side by side. shown: [(case, real (2, ...), decoded)]."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, len(shown), figsize=(3.0 * len(shown), 6.4), squeeze=False)
    for j, (case, real, recon) in enumerate(shown):
        for i, (name, x) in enumerate((("real", real), ("decoded, held out", recon))):
            ax[i, j].imshow(utils.mip_rgb(x[0], x[1]))
            ax[i, j].set_title(f"{case} {name}", fontsize=7)
            ax[i, j].axis("off")
    utils.save_figure(fig, path)


def run(tokens_path, data, out, preset, iters=None, folds=5, seed=0, device=None, overwrite=False):
    """Fold check, final fit and decoding into `out`; returns the manifest."""
    utils.check_positive({"--iters": iters})
    utils.check_seed(seed)
    if folds < 0 or folds == 1:
        raise utils.DataError(f"--folds must be 0 (no check) or >= 2, got {folds}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise utils.DataError(f"{out}: is a file, --out must be a folder")
    mpath = os.path.join(out, "manifest.json")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(mpath) and not overwrite:
        raise utils.DataError(f"{out}: holds files that decode_tokens.py did not write (no manifest.json); "
                              "use another --out (or --overwrite)")
    tokens = utils.read_tokens(tokens_path)
    if ((tokens["config"] or {}).get("model") or {}).get("classes", 1) > 1:
        raise utils.DataError(f"{tokens_path}: tokens of a VQ-AE of label classes; a token decoder decodes one mask per map")
    frame = tokens["frame"]
    p = PRESETS[preset]
    iters = iters or p["iters"]
    device = utils.get_device(device)
    precision = utils.precision(device)
    cfg = config_of(preset, tokens)
    have = {p.id: p for p in utils.find_pairs(data)}
    fitted = sorted(c for c in tokens["case_ids"] if c in have)
    if len(fitted) < max(2, folds):
        raise utils.DataError(f"{data}: only {len(fitted)} of its pairs have a token grid in {tokens_path} "
                              f"(case ids {tokens['case_ids'][:2]} ...); need at least {max(2, folds)}")
    settings = {"tokens": os.path.abspath(tokens_path), "tokens_sha256": utils.sha256(tokens_path),
                "data": os.path.abspath(data), "fitted": fitted, "preset": preset, "iters": iters, "seed": seed,
                "num_folds": folds, "precision": precision, "config": cfg}
    old = {}
    if os.path.exists(mpath) and not overwrite:
        old = utils.read_json(mpath)
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise utils.DataError(f"{out}: holds pairs decoded with other {', '.join(diff)} (use --overwrite or another --out)")
    case_ids = tokens["case_ids"]
    grids = tokens["tokens"].reshape(-1, *tokens["grid_shape"])
    row = {c: i for i, c in enumerate(case_ids)}
    factor = cfg["factor"]
    size = utils.grid_shape(factor, frame)
    pairs = utils.load_pairs(data, factor, frame, [have[c] for c in fitted])[1]  # (n, 2, *size) occupancies
    fit_grids = grids[[row[c] for c in fitted]]
    print(f"decode_tokens: {len(grids)} grids {'x'.join(map(str, tokens['grid_shape']))} from {tokens_path}, "
          f"decoder fitted on {len(fitted)} pairs of {data} at {'x'.join(map(str, size))}, preset {preset}, "
          f"{iters} iterations, {precision} on {device}")
    if overwrite:  # pairs of an earlier run with other grids must not stay beside these
        for f in glob.glob(os.path.join(glob.escape(out), "*_[12].nii.gz")):
            if os.path.basename(f)[:-len("_1.nii.gz")] not in row:
                os.remove(f)

    manifest = {**settings, "folds": old.get("folds", []), "fitted_all": old.get("fitted_all", False),
                "complete": False}
    utils.write_json(mpath, manifest)
    shown = []
    for k, held in enumerate(np.array_split(np.arange(len(fitted)), folds) if folds else []):
        train = np.setdiff1d(np.arange(len(fitted)), held)
        if k >= len(manifest["folds"]):
            model, loss = fit(cfg, fit_grids[train], pairs[train], iters, seed + 1 + k, device, desc=f"fold {k}")
            recon = decode(model, fit_grids[held], size, device)
            m = {"held_out": [fitted[i] for i in held], "train_loss": loss, **fold_metrics(pairs[held], recon, factor)}
            manifest["folds"].append(m)
            utils.write_json(mpath, manifest)  # a finished fold survives an interruption
            shown.append((fitted[held[0]], pairs[held[0]], recon[0]))
            print(f"fold {k}: held out {', '.join(m['held_out'])}: Dice {m['dice_fixed']:.3f} / {m['dice_moving']:.3f}, "
                  f"deformation kept {100 * m['kept']:.0f} %")
    if manifest["folds"]:
        print(fold_table(manifest["folds"]))
        manifest["fold_mean"] = {c: float(np.mean([f[c] for f in manifest["folds"]]))
                                 for c in ("dice_fixed", "dice_moving", "kept", "dice_fm", "real_dice_fm")}
    if shown and len(shown) == len(manifest["folds"]):  # a resumed run keeps the earlier figure
        preview(os.path.join(out, "preview.png"), shown)

    ckpt = os.path.join(out, "decoder.pth")
    if old.get("fitted_all") and os.path.exists(ckpt):
        model = TokenDecoder.from_checkpoint(ckpt, device)
    else:
        model, loss = fit(cfg, fit_grids, pairs, iters, seed, device, desc="fit all")
        utils.save_checkpoint(ckpt, "tokendecoder", cfg, model.state_dict(), tokens=os.path.abspath(tokens_path),
                              cases=fitted, train_loss=loss, precision=precision)
        manifest["fitted_all"] = True
        utils.write_json(mpath, manifest)
    for c in range(0, len(grids), 8):
        occ = decode(model, grids[c:c + 8], size, device)
        for case, x in zip(case_ids[c:c + 8], occ):
            for k in (0, 1):
                utils.write_nifti(os.path.join(out, f"{case}_{k + 1}.nii.gz"), x[k].numpy(), factor, frame)
    utils.write_dataset_json(os.path.join(out, "decoded_dataset.json"), "decoded",
                             [{"fixed": f"{c}_1.nii.gz", "moving": f"{c}_2.nii.gz"} for c in case_ids], shape=size,
                             frame=frame, description="token grids decoded by decode_tokens.py: fixed *_1, moving *_2")
    manifest.update(complete=True, num_pairs=len(grids), factor=factor, shape=list(size), frame=frame)
    utils.write_json(mpath, manifest)
    print(f"{out}: {len(grids)} decoded pairs (reconstructions: blurrier than real masks)")
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokens", help="token file: infer_vqae.py's, or the reference's list of 97 grids")
    ap.add_argument("--data", required=True, help="folder of real pairs; those with a grid in TOKENS are fitted")
    ap.add_argument("--out", help="output folder (default decoded_<TOKENS name>)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--iters", type=int, help="fitting iterations (default: the preset's)")
    ap.add_argument("--folds", type=int, default=5, help="K of the K-fold check over the fitted pairs (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or "decoded_" + os.path.splitext(os.path.basename(args.tokens))[0]
    run(args.tokens, args.data, out, args.preset, args.iters, args.folds, args.seed, args.device, args.overwrite)


if __name__ == "__main__":
    utils.run_main(main)
