"""Stage 2: encode every framed training pair of DATA into its token grid with a trained VQ-AE.

    python infer_vqae.py CKPT [--data DATA] [--split train|val] [--out TOKENS] [--augment K] [--seed S]
                         [--preset P] [--overwrite]

Whole volumes, not patches: a 256x208x256 pair gives 16x13x16 = 3328 tokens at the paper preset,
a 64x52x64 pair (padded to 64x56x64) 8x7x8 = 448 at cpu/demo. Writes TOKENS (.pth):
  case_ids   ['case_032', ..., 'case_032_aug00', ...]
  tokens     (N, h*w*d) int16 ids, row-major over grid_shape (as paper_tokens_97.pth, but stacked)
  grid_shape (h, w, d); num_codes; factor (the VQ-AE's frame pooling); dice (N, 2)
  config     the VQ-AE checkpoint's config (preset, factor, model kwargs, frame); frame
and TOKENS.csv (per-case reconstruction Dice, fixed and moving) and TOKENS.png (MIP, input vs
reconstruction, fixed blue / moving orange). DATA (a folder or a Learn2Reg dataset JSON) is
placed in the VQ-AE's frame with its labels or classes (recorded in CKPT); --split val encodes a dataset
JSON's registration_val pairs (validation tokens). --augment K adds K randomly affine-augmented copies of
every pair (same augmentation as training) to enlarge the token set for the diffusion model.
"""
import argparse
import os

import numpy as np
import torch

import utils
from models import VQAE

FIGURE_PAIRS = 4  # pairs shown in OUT.png


def augmented_pairs(pairs, ids, k, seed=0):
    """K affine-augmented copies of every pair -> (pairs (N*K, 2, ...), ids 'case_XXX_augKK')."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    names = []
    for x, c in zip(pairs, ids):
        for j in range(k):
            out.append(utils.augment(x[None], generator=gen)[0].to(pairs.dtype))
            names.append(f"{c}_aug{j:02d}")
    return torch.stack(out), names


def reconstruct(model, pairs, keep_probs=0):
    """VQAE.reconstruct of every pair -> (ids, Dice, probabilities of the first `keep_probs` pairs).
    Under torchrun each pair on exactly one process; every process gets all results."""
    rank, procs = utils.world()
    mine = list(range(rank, len(pairs), procs))
    ids, dice, probs = model.reconstruct(pairs[mine], keep_probs=bool(keep_probs)) if mine else (None, None, None)
    keep = [j for j, i in enumerate(mine) if i < keep_probs]
    parts = utils.gather_objects((mine, ids, dice, None if probs is None else probs[keep]))
    where = sorted((i, k, j) for k, part in enumerate(parts) for j, i in enumerate(part[0]))  # pair order
    ids = torch.stack([parts[k][1][j] for _, k, j in where])
    dice = np.stack([parts[k][2][j] for _, k, j in where])
    probs = None
    if keep_probs:
        probs = torch.stack([parts[k][3][j] for i, k, j in where if i < keep_probs])
    return ids, dice, probs


def figure(pairs, probs, ids, dice, path, n=FIGURE_PAIRS):
    import matplotlib.pyplot as plt

    n = min(n, len(ids))
    fig, ax = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for i in range(n):
        ax[i, 0].imshow(utils.mip_rgb(pairs[i, 0].float(), pairs[i, 1].float()))
        ax[i, 1].imshow(utils.mip_rgb(probs[i, 0], probs[i, 1]))
        ax[i, 0].set_title(f"{ids[i]} input", fontsize=8)
        ax[i, 1].set_title(f"reconstruction  Dice {dice[i, 0]:.2f} / {dice[i, 1]:.2f}", fontsize=8)
        for panel in ax[i]:
            panel.axis("off")
    utils.save_figure(fig, path)


def infer(ckpt, data, out, augment_k=0, seed=0, preset=None, overwrite=False, split="train"):
    """Encode DATA's pairs of `split`; returns the saved dict."""
    utils.check_output(utils.log_paths(out), overwrite)
    utils.check_seed(seed)
    model = VQAE.from_checkpoint(ckpt, utils.distributed()[2], preset)
    cfg = model.config
    frame = utils.check_frame(cfg.get("frame"), ckpt)
    ids, pairs = utils.load_pairs(data, cfg["factor"], frame, utils.find_pairs(data, split), labels=model.saved.get("labels"),
                                  classes=model.saved.get("classes"))
    pairs = pairs.half()  # as training sees them
    tokens, dice, probs = reconstruct(model, pairs, keep_probs=FIGURE_PAIRS)
    for c, d in zip(ids, dice):
        utils.main_print(f"{c}: Dice fixed {d[0]:.3f} moving {d[1]:.3f}")
    utils.main_print(f"mean ({len(ids)} pairs): Dice fixed {dice[:, 0].mean():.3f} moving {dice[:, 1].mean():.3f}")
    all_ids = list(ids)
    all_tokens = [tokens]
    all_dice = [dice]
    if augment_k:
        apairs, aids = augmented_pairs(pairs, ids, augment_k, seed)
        atok, adice, _ = reconstruct(model, apairs)
        utils.main_print(f"augmented ({len(aids)} pairs): Dice fixed {adice[:, 0].mean():.3f} moving {adice[:, 1].mean():.3f}")
        all_ids += aids
        all_tokens.append(atok)
        all_dice.append(adice)
    tokens = torch.cat(all_tokens)
    dice = np.concatenate(all_dice)
    used, ppl = utils.codebook_stats(tokens, model.num_codes)
    utils.main_print(f"codebook: {used} of {model.num_codes} codes used, perplexity {ppl:.1f}; token grid {tuple(tokens.shape[1:])}")
    if not utils.is_main():
        return None  # process 0 writes
    base = os.path.splitext(out)[0]
    rows = [{"case": c, "dice_fixed": f"{d[0]:.4f}", "dice_moving": f"{d[1]:.4f}"} for c, d in zip(all_ids, dice)]
    utils.write_csv(base + ".csv", ["case", "dice_fixed", "dice_moving"], rows)
    figure(utils.foreground(pairs, model.saved.get("classes")), probs, ids, dice, base + ".png")
    res = utils.write_tokens(out, tokens, all_ids, model.num_codes, cfg, dice=torch.tensor(dice))
    print(f"wrote {out} ({len(all_ids)} token grids)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--data", default="dilated_vessels", help="folder of ID_{1,2}.nii.gz pairs or a Learn2Reg dataset JSON")
    ap.add_argument("--split", choices=("train", "val"), default="train",
                    help="a dataset JSON's training_paired_images or registration_val pairs")
    ap.add_argument("--out", help="token file (default tokens_<preset>.pth)")
    ap.add_argument("--augment", type=int, default=0, metavar="K", help="also encode K augmented copies per pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", help="refuse a checkpoint of another preset")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.augment < 0:
        raise utils.DataError("--augment must be >= 0")
    preset = args.preset or utils.load_checkpoint(args.ckpt, "vqae")["config"]["preset"]
    infer(args.ckpt, args.data, args.out or f"tokens_{preset}.pth", args.augment, args.seed, args.preset, args.overwrite,
          args.split)


if __name__ == "__main__":
    utils.run_main(main)
