"""Pair realism: real and synthetic fixed/moving pairs side by side (a table and a figure).

    python realism_report.py [FOLDER ...] --reference REAL [--val DATA] [--vqae CKPT] [--out PREFIX]
                             [--frame derived|lung250m4b] [--overwrite]

Groups: the real training pairs (REFERENCE, the baseline), each FOLDER (e.g. synthetic pairs),
with --val the validation pairs, with --vqae the VQ-AE's reconstructions of the training (and
validation) pairs. Together they decompose the deformation synthetic pairs lose: the part the
autoencoder already loses (recon vs real) and the part the diffusion model loses on top
(synthetic vs recon of the training pairs).

REAL, FOLDER: folders of ID_1 / ID_2 pairs or Learn2Reg dataset JSONs (--val: a JSON's
registration_val pairs), placed in the VQ-AE's frame or REAL's (utils.data_frame; FOLDERs written by
this project record theirs). Per pair, all at the frame pooled by FACTOR = 4 (4 mm on Lung250M-4B):
  vf_fixed, vf_moving  vessel volume fraction (mean occupancy / probability over the frame)
  dice_fm              Dice(fixed, moving) at 0.5: how misaligned the pair is
  disp_mm              mean displacement (mm) over the fixed vessels that a quick registration finds:
                       40 Adam steps on a smooth ddf (8 mm images, 32 mm control grid, trilinearly
                       upsampled, utils.warp, MSE + diffusion regulariser) - cheap, self-contained
                       and identical for real and synthetic pairs (see quick_registration)
  dice_reg             Dice(fixed, registered moving): did that registration work
  nn_fixed, nn_moving  memorisation: highest Dice of the volume against every volume of the
                       REFERENCE (training) pairs; for the reference itself, against the other cases
                       and other images (inter-subject pairs share images)
Writes PREFIX.csv (per pair), PREFIX.json (summary), PREFIX.png, PREFIX.md (the table, printed too).
"""
import argparse
import os

import numpy as np

import utils
from models import VQAE

FACTOR = 4  # every comparison at 4 mm: the cpu and demo presets' resolution, and cheap at the paper's
COLUMNS = ["group", "case"] + utils.REALISM_STATS[:5] + ["nn_fixed", "nn_moving"]


def figure(groups, path):
    import matplotlib.pyplot as plt

    cols = [c for c in utils.REALISM_STATS if all(c in g for g in groups.values())]
    fig, ax = plt.subplots(1, len(cols), figsize=(3 * len(cols), 3.4))
    for a, c in zip(np.atleast_1d(ax), cols):
        a.boxplot([g[c] for g in groups.values()], showmeans=True)
        a.set_xticks(range(1, len(groups) + 1), list(groups), rotation=45, fontsize=7)
        a.set_title(c)
    utils.save_figure(fig, path)


def folder_stats(folder, frame, reference=None, progress=False, labels=None):
    """utils.pair_stats of every pair of a folder at frame/4. reference: (ids, pairs (M, 2, ...)) of the
    training pairs, for the memorisation statistic. labels: the label values that form the masks."""
    ids, x = utils.load_pairs(folder, FACTOR, frame, progress=progress, labels=labels)
    return utils.pair_stats(ids, x, FACTOR, reference, progress, frame["spacing"])


def report(folders, reference, out, overwrite=False, val=None, vqae=None, frame=None, labels=None):
    """labels: the label values that form each map (the union of the classes of a run with --classes);
    with `vqae`, its own labels or classes."""
    for ext in (".csv", ".json", ".png", ".md"):
        utils.check_output(out + ext, overwrite)
    model = None if vqae is None else VQAE.from_checkpoint(vqae)
    frame = utils.data_frame(reference, frame) if model is None else model.config["frame"]
    sp, dims = frame["spacing"], utils.spatial_dims(frame)
    load_factor = FACTOR if model is None else model.config["factor"]  # real pairs are read once, at the VQ-AE's
    if FACTOR % load_factor:
        raise utils.DataError(f"{vqae}: works at frame/{load_factor}, cannot compare at /{FACTOR}")
    groups, kept, memo = {}, [], None  # kept: (real group, its reconstruction group)
    for real, split in [(reference, "train")] + ([(val, utils.val_split(val))] if val else []):
        classes = None if model is None else model.saved.get("classes")  # the VQ-AE reads its classes apart
        merged = labels if model is None else model.saved.get("labels")
        pairs = utils.find_pairs(real, split)
        images = [(p.fixed, p.moving) for p in pairs]  # inter-subject pairs share images: never a map's own neighbour
        ids, x = utils.load_pairs(real, load_factor, frame, pairs, labels=merged, classes=classes)
        recon = None if model is None else model.reconstruct(x, keep_probs=True, pool=FACTOR // load_factor)[2]
        x = utils.foreground(x, classes)  # the statistics compare each map's foreground
        if memo is None:
            memo = (ids, utils.pool(x, FACTOR // load_factor, dims), images)  # the memorisation reference
        real_name = "real " + os.path.basename(os.path.normpath(real)).removesuffix(".json") + ("" if split == "train" else " val")
        if real_name in groups:
            real_name += " (val)"  # same folder name in another place
        groups[real_name] = utils.pair_stats(ids, utils.pool(x, FACTOR // load_factor, dims), FACTOR, memo, True, sp, images)
        if model is not None:
            groups["recon " + real_name[5:]] = utils.pair_stats(ids, recon, FACTOR, memo, True, sp, images)
            kept.append((real_name, "recon " + real_name[5:]))
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        groups[name] = folder_stats(folder, utils.recorded_frame(folder) or frame, memo, True,
                                    labels or (model.saved.get("labels") or model.saved.get("classes") if model else None))
    rows = [{"group": name, "case": c, **{k: f"{g[k][i]:.5f}" for k in COLUMNS[2:]}}
            for name, g in groups.items() for i, c in enumerate(g["case"])]
    utils.write_csv(out + ".csv", COLUMNS, rows)
    utils.write_json(out + ".json", {n: {k: {"mean": float(g[k].mean()), "std": float(g[k].std()), "n": len(g[k])}
                                         for k in utils.REALISM_STATS} for n, g in groups.items()})
    figure(groups, out + ".png")
    text = utils.realism_table(groups, baseline=next(iter(groups)))
    for real_name, recon_name in kept:
        r, q = groups[real_name], groups[recon_name]
        text += (f"\nVQ-AE keeps {100 * q['disp_mm'].mean() / max(r['disp_mm'].mean(), 1e-9):.0f} % of {real_name}'s "
                 f"displacement ({q['disp_mm'].mean():.2f} of {r['disp_mm'].mean():.2f} mm); Dice(f, m) "
                 f"{q['dice_fm'].mean():.2f} vs {r['dice_fm'].mean():.2f}")
    with utils.atomic_path(out + ".md") as tmp:
        open(tmp, "w").write(text + "\n")
    print(text)
    return groups, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="*", help="folders of ID_{1,2}.nii.gz pairs or dataset JSONs (synthetic or real)")
    ap.add_argument("--reference", required=True, help="the real training pairs (memorisation reference)")
    ap.add_argument("--val", help="validation pairs: their statistics (and reconstructions, with --vqae)")
    ap.add_argument("--vqae", help="a VQ-AE checkpoint: add its reconstructions of the real pairs")
    ap.add_argument("--out", default="realism", help="output prefix")
    ap.add_argument("--frame", choices=utils.FRAME_NAMES, help="REAL's frame without --vqae (utils.data_frame)")
    ap.add_argument("--labels", type=utils.label_list, help="label values that form the masks (default: all > 0; "
                    "with --vqae its own)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    report(a.folders, a.reference, a.out, a.overwrite, a.val, a.vqae, a.frame, a.labels)


if __name__ == "__main__":
    utils.run_main(main)
