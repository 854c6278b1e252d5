"""Pair realism: real and synthetic fixed/moving pairs side by side (a table and a figure).

    python realism_report.py FOLDER [FOLDER ...] --reference REAL [--factor 4] [--max N]
                             [--out PREFIX] [--overwrite]

Per pair, all at frame/factor (default 4 mm) resolution:
  vf_fixed, vf_moving  vessel volume fraction (mean occupancy / probability over the frame)
  dice_fm              Dice(fixed, moving) at 0.5: how misaligned the pair is
  disp_mm              mean displacement (mm) over the fixed vessels that a quick registration finds:
                       40 Adam steps on a smooth ddf (8 mm images, 32 mm control grid, trilinearly
                       upsampled, utils.warp, MSE + diffusion regulariser) - cheap, self-contained
                       and identical for real and synthetic pairs (see quick_registration)
  dice_reg             Dice(fixed, registered moving): did that registration work
  nn_fixed, nn_moving  memorisation: highest Dice of the volume against every volume of the
                       REFERENCE (training) pairs; for the reference itself, against the other cases
Writes PREFIX.csv (per pair), PREFIX.json (summary), PREFIX.png; prints the table.
"""
import argparse
import os

import numpy as np

import utils

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


def report(folders, reference, out, factor=4, max_pairs=None, overwrite=False):
    for ext in (".csv", ".json", ".png"):
        utils.check_output(out + ext, overwrite)
    rids, ref = utils.load_pairs(reference, factor)
    name = "real " + os.path.basename(os.path.normpath(reference))
    groups = {name: utils.folder_stats(reference, factor, (rids, ref), progress=True)}
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        groups[name] = utils.folder_stats(folder, factor, (rids, ref), max_pairs, progress=True)
    rows = [{"group": name, "case": c, **{k: f"{g[k][i]:.5f}" for k in COLUMNS[2:]}}
            for name, g in groups.items() for i, c in enumerate(g["case"])]
    utils.write_csv(out + ".csv", COLUMNS, rows)
    utils.write_json(out + ".json", {n: {k: {"mean": float(g[k].mean()), "std": float(g[k].std()), "n": len(g[k])}
                                         for k in utils.REALISM_STATS} for n, g in groups.items()})
    figure(groups, out + ".png")
    text = utils.realism_table(groups, baseline=next(iter(groups)))
    print(text)
    return groups, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="folders of case_XXX_{1,2}.nii.gz pairs (synthetic or real)")
    ap.add_argument("--reference", required=True, help="the real training pairs (memorisation reference)")
    ap.add_argument("--factor", type=int, default=4, help="compare at frame/factor (default 4 mm)")
    ap.add_argument("--max", type=int, help="at most N pairs per folder")
    ap.add_argument("--out", default="realism", help="output prefix")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    report(a.folders, a.reference, a.out, a.factor, a.max, a.overwrite)


if __name__ == "__main__":
    utils.run_main(main)
