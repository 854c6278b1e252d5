"""Stage 2: encode every framed pair of a folder into its token grid with a trained VQ-AE.

    python infer_vqae.py CKPT [--data DIR] [--out TOKENS] [--augment K] [--seed S] [--preset P] [--overwrite]

Whole volumes, not patches: a 256x208x256 pair gives 16x13x16 = 3328 tokens at the paper preset,
a 64x52x64 pair (padded to 64x56x64) 8x7x8 = 448 at cpu/demo. Writes TOKENS (.pth):
  case_ids   ['case_032', ..., 'case_032_aug00', ...]
  tokens     (N, h*w*d) int16 ids, row-major over grid_shape (as paper_tokens_97.pth, but stacked)
  grid_shape (h, w, d); num_codes; size (H, W, D) the decoder output is cropped to; dice (N, 2)
  config     the checkpoint config (preset, factor, model kwargs): rebuild with load_vqae(CKPT)
and TOKENS.csv (per-case reconstruction Dice, fixed and moving) and TOKENS.png (MIP, input vs
reconstruction, fixed blue / moving orange). --augment K adds K randomly affine-augmented copies of
every pair (same augmentation as training) to enlarge the token set for the diffusion model.
"""
import argparse
import os

import numpy as np
import torch

import utils
from train_vqae import augment, build, codebook_stats, default_data, load_data, reconstruct


def load_vqae(path, preset=None, device=None):
    """Rebuild a trained VQ-AE from its checkpoint alone -> (model in eval mode, config)."""
    ck = utils.load_checkpoint(path, "vqae")
    cfg = ck["config"]
    if preset is not None and cfg["preset"] != preset:
        raise utils.DataError(f"{path}: is a '{cfg['preset']}' VQ-AE checkpoint, expected '{preset}'")
    model = build(cfg)
    try:
        model.load_state_dict(ck["state"])
    except RuntimeError:
        raise utils.DataError(f"{path}: weights do not match the stored model config")
    return model.to(device or utils.get_device()).eval(), cfg


def encode_pairs(model, pairs):
    """Pairs (N, 2, H, W, D) at the model's factor -> token ids (N, h, w, d) (int64)."""
    return reconstruct(model, pairs)[0]


def augmented_pairs(pairs, ids, k, seed=0):
    """K affine-augmented copies of every pair -> (pairs (N*K, 2, ...), ids 'case_XXX_augKK')."""
    gen = torch.Generator().manual_seed(seed)
    out, names = [], []
    for x, c in zip(pairs, ids):
        for j in range(k):
            out.append(augment(x[None], generator=gen)[0].to(pairs.dtype))
            names.append(f"{c}_aug{j:02d}")
    return torch.stack(out), names


def figure(pairs, probs, ids, dice, path, n=4):
    import matplotlib.pyplot as plt

    n = min(n, len(ids))
    fig, ax = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for i in range(n):
        ax[i, 0].imshow(utils.mip_rgb(pairs[i, 0].float(), pairs[i, 1].float()))
        ax[i, 1].imshow(utils.mip_rgb(probs[i, 0], probs[i, 1]))
        ax[i, 0].set_title(f"{ids[i]} input", fontsize=8)
        ax[i, 1].set_title(f"reconstruction  Dice {dice[i, 0]:.2f} / {dice[i, 1]:.2f}", fontsize=8)
        for a in ax[i]:
            a.axis("off")
    utils.save_figure(fig, path)


def infer(ckpt, data, out, augment_k=0, seed=0, preset=None, overwrite=False):
    """Encode a folder; returns the saved dict."""
    utils.check_output(out, overwrite)
    model, cfg = load_vqae(ckpt, preset)
    ids, pairs = load_data(data or default_data(cfg["preset"]), cfg["factor"])
    tokens, dice, probs = reconstruct(model, pairs, keep_probs=True)
    for c, d in zip(ids, dice):
        print(f"{c}: Dice fixed {d[0]:.3f} moving {d[1]:.3f}")
    print(f"mean ({len(ids)} pairs): Dice fixed {dice[:, 0].mean():.3f} moving {dice[:, 1].mean():.3f}")
    all_ids, all_tok, all_dice = list(ids), [tokens], [dice]
    if augment_k:
        apairs, aids = augmented_pairs(pairs, ids, augment_k, seed)
        atok, adice, _ = reconstruct(model, apairs)
        print(f"augmented ({len(aids)} pairs): Dice fixed {adice[:, 0].mean():.3f} moving {adice[:, 1].mean():.3f}")
        all_ids += aids
        all_tok.append(atok), all_dice.append(adice)
    tokens, dice = torch.cat(all_tok), np.concatenate(all_dice)
    used, ppl = codebook_stats(tokens, model.num_codes)
    print(f"codebook: {used} of {model.num_codes} codes used, perplexity {ppl:.1f}; token grid {tuple(tokens.shape[1:])}")
    res = {"case_ids": all_ids, "tokens": tokens.reshape(len(tokens), -1).to(torch.int16),
           "grid_shape": tuple(tokens.shape[1:]), "num_codes": model.num_codes,
           "size": tuple(pairs.shape[-3:]), "dice": torch.tensor(dice), "config": cfg}
    base = os.path.splitext(out)[0]
    utils.write_csv(base + ".csv", ["case", "dice_fixed", "dice_moving"],
                    [[c, f"{d[0]:.4f}", f"{d[1]:.4f}"] for c, d in zip(all_ids, dice)])
    figure(pairs, probs, ids, dice, base + ".png")
    with utils.atomic_path(out) as tmp:
        torch.save(res, tmp)
    print(f"wrote {out} ({len(all_ids)} token grids)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--data", help="folder of case_XXX_{1,2}.nii.gz pairs (default: the preset's)")
    ap.add_argument("--out", help="token file (default tokens_<preset>.pth)")
    ap.add_argument("--augment", type=int, default=0, metavar="K", help="also encode K augmented copies per pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", help="refuse a checkpoint of another preset")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    if a.augment < 0:
        raise utils.DataError("--augment must be >= 0")
    preset = a.preset or utils.load_checkpoint(a.ckpt, "vqae")["config"]["preset"]
    infer(a.ckpt, a.data, a.out or f"tokens_{preset}.pth", a.augment, a.seed, a.preset, a.overwrite)


if __name__ == "__main__":
    utils.run_main(main)
