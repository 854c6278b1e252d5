"""Free baselines: new pairs made from the real ones by random smooth deformations (not in the paper).

    python deform_pairs.py KIND DATA [NUM_PAIRS] [--preset paper|cpu|demo] [--out DIR] [--seed S]
                           [--frame derived|lung250m4b] [--labels L | --classes L] [--overwrite]

What a generator has to beat without any training. KIND:
  warped    a real map (the fixed or the moving map of a random pair) and that map warped by a random
            smooth diffeomorphic field: real anatomy, synthetic motion (SynthMorph-style);
  deformed  a real pair with one random smooth field (after a small random affine) applied to both
            maps: new anatomy, the pair's own motion.
Each field is utils.random_field (velocity noise at the registration nets' velocity grid, their
smoothing, scaling and squaring): its spatial scale is fixed; its strength (utils.field_strengths)
makes a quick registration find as much motion in a new pair as in its source pair
(realism_report.py's disp_mm) - taken from DATA alone.
The framed maps are warped at the finest resolution DATA offers (1 mm scans), then pooled to the
preset's factor (the synthetic pairs' grid). A field that folds anywhere is drawn again (10 tries).
Writes OUT/case_XXXX_1.nii.gz / _2 exactly as synthesise.py (frame affine), OUT/KIND_dataset.json
(Learn2Reg, with the frame), OUT/manifest.json (settings, per-pair source and field strength, how
many fields were drawn and how many folded) and OUT/preview.png; a stopped run continues (each pair has its own seed).
"""
import argparse
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import synthesise
import train_vqae
import utils

KINDS = ("warped", "deformed")
DRAWS = 10  # fields drawn for one pair before a folding one is an error
# the output grid: the preset's synthetic pairs', i.e. its VQ-AE's factor (num_pairs: synthesise.py's);
# only what this script reads: the table is part of a pipeline stage's record
PRESETS = {k: {f: p[f] for f in ("factor", "factor_2d") if f in p} for k, p in train_vqae.PRESETS.items()}


def load_maps(data, frame, labels=None, classes=None):
    """The training pairs of DATA as (ids, maps (N, 2, H, W, D) at their finest frame grid (K classes:
    (N, 2K, ...)), factor): binary masks (scans) kept in float16, exactly and in half the memory; soft maps
    in float32."""
    pairs = utils.find_pairs(data)
    factors = {utils.native_factor(f, frame) for p in pairs for f in (p.fixed, p.moving)}
    if len(factors) > 1:
        raise utils.DataError(f"{data}: holds volumes on different grids (frame factors {sorted(factors)})")
    f0 = factors.pop()
    ids, maps = utils.load_pairs(data, f0, frame, pairs, labels=labels, classes=classes)  # refuses empty / all-zero maps
    binary = bool(((maps == 0) | (maps == 1)).all())
    return ids, maps.half() if binary else maps, f0


def make_pair(kind, source, motion, frame, generator):
    """One new pair from a real pair `source` (2, H, W, D) at frame/f0 (K classes: (2K, ...)) -> (the same
    shape, float32; ddf on the field grid). warped: one of the two maps (drawn) and that map warped by a
    field of `motion` mm; deformed: both maps warped by one affine + field of `motion` mm."""
    K = len(source) // 2
    if kind == "warped":
        i = int(torch.randint(2, (1,), generator=generator))
        base = source[i * K:(i + 1) * K].float()
        u = utils.random_field(frame, motion, utils.field_weight(base.sum(0), frame), generator)
        return torch.cat([base, utils.random_warp(base[None], u)[0]]), u
    u = utils.random_field(frame, motion, utils.field_weight(source[:K].sum(0), frame), generator, utils.AFFINE_STD)
    return utils.random_warp(source.float()[None], u)[0], u



def run(kind, data, out, n, preset, seed=0, frame_name=None, labels=None, overwrite=False, progress=True, classes=None):
    """Write n pairs of `kind` into `out` with a manifest; the settings of an unfinished run must match.
    classes (K > 1 label values): label maps in, label maps out."""
    utils.check_label_options(labels, classes)
    if kind not in KINDS:
        raise utils.DataError(f"{kind}: not a kind of baseline ({', '.join(KINDS)})")
    frame = utils.data_frame(data, frame_name)
    factor = utils.preset_factor(PRESETS[preset], frame)
    mpath = os.path.join(out, "manifest.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise utils.DataError(f"{out}: is a file, --out must be a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(mpath) and not overwrite:
        raise utils.DataError(f"{out}: holds files that deform_pairs.py did not write (no manifest.json); "
                              "use another --out (or --overwrite)")
    settings = {"kind": kind, "data": os.path.abspath(data), "seed": seed, "factor": factor, "labels": labels,
                "frame": frame, "field": {"factor": utils.FIELD_FACTOR, "kernel": utils.FIELD_KERNEL,
                                          "passes": utils.FIELD_PASSES, "squarings": utils.FIELD_SQUARINGS,
                                          "affine_std": utils.AFFINE_STD if kind == "deformed" else 0.0}}
    if classes:
        settings["classes"] = classes
    old = utils.read_json(mpath) if os.path.exists(mpath) and not overwrite else {}
    diff = [k for k in [*settings, "classes"] if old and old.get(k) != settings.get(k)]
    if diff:
        raise utils.DataError(f"{out}: holds pairs made with other {', '.join(diff)} (use --overwrite or another --out)")
    ids, maps, f0 = load_maps(data, frame, labels, classes)
    if factor % f0:
        raise utils.DataError(f"{data}: its maps are at frame/{f0}, coarser than the output's frame/{factor}")
    if 4 % f0:
        raise utils.DataError(f"{data}: its maps are at frame/{f0}; the field strength is measured at frame/4")
    motion, disp, ratio = utils.field_strengths(utils.foreground(maps, classes), f0, frame, torch.Generator().manual_seed(seed))
    os.makedirs(out, exist_ok=True)
    utils.write_json(mpath, {**settings, "num_pairs": n, "complete": False})
    t0 = time.time()
    rows, folding, made = [], [], 0
    for i in tqdm(range(n), desc=f"{kind} pairs", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # resuming reproduces the same pairs
        j = int(torch.randint(len(ids), (1,), generator=gen))
        for draw in range(DRAWS):  # a field that folds is drawn again (the stream goes on: still reproducible)
            pair, u = make_pair(kind, maps[j], motion[j], frame, gen)
            fold = float((utils.jacobian_det(utils.resize_ddf(u, utils.grid_shape(factor, frame))) <= 0).float().mean())
            folding.append(fold)
            if fold == 0:
                break
        if fold > 0:
            raise utils.DataError(f"{data}: {DRAWS} random fields for pair {i} (from {ids[j]}, {motion[j]:.1f} mm) fold, the "
                                  f"last {100 * fold:.3f} % of its voxels; no pair was written for it")
        rows.append({"pair": i, "source": ids[j], "field_mm": round(motion[j], 3), "draws": draw + 1})
        paths = synthesise.pair_paths(out, i)
        if overwrite or not all(map(os.path.exists, paths)):
            # clamped: interpolation rounding above 1 would make later stages read a label map
            pooled = utils.pool(pair, factor // f0, utils.spatial_dims(frame)).clamp(0, 1)
            for path, vol in zip(paths, pooled.chunk(2) if classes and len(classes) > 1 else pooled):
                utils.write_nifti(path, utils.label_map(vol, classes) if vol.ndim > len(frame["shape"]) else vol.numpy(),
                                  factor, frame)
            made += 1
    dataset = [{k: os.path.basename(p) for k, p in zip(("fixed", "moving"), synthesise.pair_paths(out, i))} for i in range(n)]
    utils.write_dataset_json(os.path.join(out, f"{kind}_dataset.json"), kind, dataset,
                             shape=utils.grid_shape(factor, frame), frame=frame,
                             description=f"{kind} pairs of deform_pairs.py from {len(ids)} real pairs: fixed *_1, "
                                         f"moving *_2, {'label maps' if classes and len(classes) > 1 else 'occupancies in [0, 1]'}"
                                         f" on the frame pooled by {factor}")
    utils.write_json(mpath, {**settings, "num_pairs": n, "complete": True, "source_pairs": ids,
                             "source_disp_mm": [round(m, 3) for m in disp], "quick_registration_share": round(ratio, 4),
                             "fields_drawn": len(folding), "fields_folding": sum(f > 0 for f in folding),
                             "seconds": round(time.time() - t0, 1), "pairs": rows})
    synthesise.preview(out)
    print(f"{out}: {made} {kind} pairs written ({n - made} kept) from {len(ids)} real pairs; fields of {np.mean(motion):.2f} mm "
          f"on average (the pairs' quick-registration displacement {np.mean(disp):.2f} mm / {ratio:.2f}, the share of "
          f"a random field's it finds); {sum(f > 0 for f in folding)} of {len(folding)} fields drawn folded")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("data", help="folder of ID_{1,2}.nii.gz pairs or a Learn2Reg dataset JSON (its training pairs)")
    ap.add_argument("num_pairs", type=int, nargs="?", help="default: the preset's synthetic pairs (paper 256)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the output grid: the preset's synthetic pairs'")
    ap.add_argument("--out", help="default: KIND")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    utils.data_options(ap)
    args = ap.parse_args(argv)
    n = synthesise.PRESETS[args.preset]["num_pairs"] if args.num_pairs is None else args.num_pairs
    utils.check_positive({"NUM_PAIRS": n})
    utils.check_seed(args.seed)
    run(args.kind, args.data, args.out or args.kind, n, args.preset, args.seed, args.frame, args.labels, args.overwrite,
        classes=args.classes)


if __name__ == "__main__":
    utils.run_main(main)
