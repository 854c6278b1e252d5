"""Stage 6: evaluate a registration net on pairs with landmarks: TRE, Dice, folding, time.

    python evaluate_registration.py [ITER_TTA] [CKPT] [--preset cpu] [--data DATA] [--landmarks FOLDER]
                                    [--out PREFIX] [--seed S] [--overwrite] [--tre-direction reference|fixed]
                                    [--disp DIR] [--frame derived|lung250m4b] [--labels L | --classes L] [--device D]

CKPT = none evaluates an untrained net of --preset, i.e. pure instance optimisation (the "no
training data" baseline); a checkpoint names its own preset, frame and labels. DATA: a folder of
ID_1 / ID_2 pairs with landmark CSVs in frame voxels (--landmarks, default DATA/landmarks/ID.csv),
or a Learn2Reg dataset JSON: its registration_val pairs and their keypoints (voxels of each image).
TRE in mm (the frame's voxel spacing, from the NIfTI headers); a JSON whose pairs list no keypoints
(inter-subject sets such as OASIS) without --landmarks: Dice alone (per label with --classes, HD95,
SDlogJ). Writes PREFIX.csv (per landmark; without keypoints per pair, Dice),
PREFIX.json (summary) and PREFIX.png (MIPs); --disp DIR: DIR/disp_FFFF_MMMM.nii.gz per pair (FFFF,
MMMM: the fixed and moving case numbers), the Learn2Reg convention: a (H, W, D, 3) displacement in
voxels on the fixed image's grid and affine, fixed keypoint x maps to x + disp(x) in the moving image
(2D: (H, W, 2)).
"""
import argparse
import copy
import os
import re
import time
import warnings

import nibabel as nib
import numpy as np
import torch

import utils
from models import RegistrationNet
from train_registration import PRESETS, REG, TTA_LR, config_of, optimise

KEYS = ("initial", "net", "tta")


def load_model(ckpt, preset, seed=0, frame=None, classes=None):
    """A trained net from its checkpoint (which names its preset, frame and classes), or an untrained
    net of `preset` in `frame` for CKPT = none."""
    if ckpt == "none":
        utils.seed_all(seed)
        config = config_of(preset, frame, classes)
        net = RegistrationNet.build(config)
        net.config = config
        return net
    return RegistrationNet.from_checkpoint(ckpt, device=torch.device("cpu"))


def summary(values):
    """mean and 25/50/75 % of an array of TREs."""
    v = np.asarray(values)
    return {"mean": float(v.mean()), "p25": float(np.percentile(v, 25)),
            "p50": float(np.percentile(v, 50)), "p75": float(np.percentile(v, 75))}


def jacobian_stats(ddf):
    """(% voxels with det J <= 0, std of log det J) as in Learn2Reg (log of det+3, clipped)."""
    det = utils.jacobian_det(ddf.float())
    logj = torch.log((det + 3).clamp(1e-9, 1e9))
    return float((det <= 0).float().mean() * 100), float(logj.std())


def case_number(path):
    """The case number of an image for Learn2Reg's disp_FFFF_MMMM: NAME_0011_0000 -> 0011, case_032_1 -> 0032."""
    stem = utils.case_stem(path)
    digits = re.findall(r"\d+", stem)
    return digits[-1].zfill(4) if digits else stem


def disp_path(folder, pair):
    return os.path.join(folder, f"disp_{case_number(pair.fixed)}_{case_number(pair.moving)}.nii.gz")


def write_disp(folder, pair, ddf, frame):
    """DIR/disp_FFFF_MMMM.nii.gz of a pair: ddf (1, 3, ...) fixed -> moving on a pooled frame grid,
    written on the fixed image's grid with its affine (utils.displacement_on_image)."""
    img = nib.load(pair.fixed)
    disp = utils.displacement_on_image(ddf, frame, utils.image_shape(pair.fixed))
    path = disp_path(folder, pair)
    with utils.atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(disp, img.affine), tmp)
    return path


FIGURE_PAIRS = 3  # pairs shown in OUT.png


def framed(path, factor, frame, labels, classes):
    """A map as the net reads it: (1, 1, ...) or, with K classes, (1, K, ...)."""
    v = utils.framed_volume(path, factor, frame, labels=labels, classes=classes)
    return v[None] if classes else v[None, None]


def hd95(warped, fixed, spacing, factor):
    """Per class, the 95th-percentile Hausdorff distance in mm between the warped moving map and the
    fixed map (both (1, K, ...) occupancies, > 0.5; MONAI's compute_hausdorff_distance): nan where the
    fixed map lacks the class, the grid's diagonal where only the warped one does (a lost structure
    counts as the worst, not as missing)."""
    from monai.metrics import compute_hausdorff_distance

    mm = [s * factor for s in spacing]
    w, f = (warped > 0.5).float(), (fixed > 0.5).float()
    with warnings.catch_warnings():  # an empty class is handled below, not warned about
        warnings.simplefilter("ignore")
        d = compute_hausdorff_distance(w, f, include_background=True, percentile=95, spacing=mm)[0]
    diagonal = float(np.linalg.norm([n * m for n, m in zip(fixed.shape[2:], mm)]))
    return [float("nan") if not f[0, c].any() else diagonal if not w[0, c].any() else float(v) for c, v in enumerate(d)]


def evaluate_pair(net, pair, lms, iter_tta, device, direction="reference", labels=None, disp=None, classes=None):
    """Register one pair without and with test-time adaptation; returns metrics and fields.
    As the reference: the net alone under autocast; TTA adapts a copy of both UNets with the training
    loss and is measured on the fields of its last iteration's forward pass (before that update).
    disp: a folder for the final field in the Learn2Reg convention (write_disp). classes: K label values
    kept apart (the net's), Dice and HD95 per label."""
    frame = net.config["frame"]
    case = pair.id
    paths = [pair.fixed, pair.moving]
    fixed, moving = (framed(p, net.config["factor"], frame, labels, classes).to(device) for p in paths)
    size = fixed.shape[2:]
    t = time.time()
    net.eval()
    with torch.no_grad(), utils.autocast(device):
        fields_net = [d.float() for d in net(fixed, moving)]
    fields_tta = fields_net
    if iter_tta > 0:
        tta = copy.deepcopy(net).train()
        _, (v1, v2) = optimise(tta, lambda i: (fixed, moving), iter_tta, TTA_LR, REG, device, desc=case)
        with torch.no_grad():
            fields_tta = tta.fields(v1, v2, size)
    seconds = time.time() - t
    res = {"case": case, "seconds": seconds}
    other = [d for d in utils.TRE_DIRECTIONS if d != direction][0]
    for k, fields in zip(KEYS, (None, fields_net, fields_tta) if lms else ()):
        res[k] = utils.tre(fields, *lms, frame, direction=direction)
        res[f"{k}_{other}"] = utils.tre(fields, *lms, frame, direction=other)  # the other convention, for comparison
    if disp:
        write_disp(disp, pair, fields_tta[0], frame)
    # Dice of the masks at the finest resolution the files offer (the frame's voxels for real scans)
    f0 = utils.native_factor(paths[0], frame)
    fixed_mask, moving_mask = (framed(p, f0, frame, labels, classes) for p in paths)
    for k, fields in zip(KEYS, (None, fields_net, fields_tta)):
        if fields is None:
            warped = moving_mask
        else:
            warped = utils.warp(moving_mask, utils.resize_ddf(fields[0].cpu(), fixed_mask.shape[2:]))
        res[f"dice_{k}"] = utils.dice(fixed_mask, warped)
        if classes:  # per label, and the 95th-percentile Hausdorff distance in mm (MONAI's)
            res[f"dice_labels_{k}"] = [utils.dice(fixed_mask[0, c], warped[0, c]) for c in range(len(classes))]
            res[f"hd95_{k}"] = hd95(warped, fixed_mask, frame["spacing"], f0)
        if not lms:  # no keypoints: the pair's score is its Dice (mean over labels), higher is better
            res[k] = np.array([np.mean(res[f"dice_labels_{k}"]) if classes else res[f"dice_{k}"]])
    res["folding_pct"], res["std_logjac"] = jacobian_stats(fields_tta[0].cpu())
    fg = [m[0].sum(0).numpy() for m in (fixed_mask, moving_mask, warped)]  # each map's foreground
    res["mips"] = tuple(fg)  # warped = after TTA
    return res


def figure(results, path, n=FIGURE_PAIRS, tre=True):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results[:n]
    fig, ax = plt.subplots(len(rows), 2, figsize=(7, 3.3 * len(rows)), squeeze=False)
    for r, res in enumerate(rows):
        f, m, w = res["mips"]
        for c, (img, title) in enumerate(((utils.mip_rgb(f, m), "before"), (utils.mip_rgb(f, w), "after TTA"))):
            ax[r, c].imshow(img)
            score = res["initial" if c == 0 else "tta"].mean()
            ax[r, c].set_title(f"{res['case']} {title}: " + (f"TRE {score:.2f} mm" if tre else f"Dice {score:.3f}"))
            ax[r, c].axis("off")
    fig.suptitle("coronal MIP, fixed blue / moving orange")
    utils.save_figure(fig, path)


def evaluate(iter_tta, ckpt, data, landmarks=None, out="eval", preset=None, overwrite=False, seed=0, log=print,
             direction="reference", device=None, disp=None, frame=None, labels=None, classes=None):
    """Evaluate DATA's pairs (a dataset JSON's registration_val) against their keypoints or the
    landmark CSVs in `landmarks` (none at all: by Dice alone); writes out.csv/json/png (and disp/
    fields), returns summary. classes: CKPT = none only (a checkpoint brings its own)."""
    utils.check_label_options(labels, classes)
    js = utils.dataset_json(data)
    landmarks = landmarks or utils.default_landmarks(data)
    if iter_tta < 0:
        raise utils.DataError(f"ITER_TTA must be >= 0, got {iter_tta}")
    utils.check_seed(seed)
    utils.check_output([out + ext for ext in (".csv", ".json", ".png")], overwrite)
    if disp and os.path.exists(disp) and not os.path.isdir(disp):
        raise utils.DataError(f"{disp}: is a file, --disp must be a folder")
    net = load_model(ckpt, preset or "cpu", seed, None if ckpt != "none" else utils.data_frame(data, frame), classes)
    frame = utils.check_frame(net.config.get("frame"), ckpt)
    if ckpt != "none":
        if labels and net.saved.get("classes"):
            raise utils.DataError(f"{ckpt}: trained on classes {net.saved['classes']}; --labels does not apply")
        if classes and classes != net.saved.get("classes"):
            raise utils.DataError(f"{ckpt}: trained on classes {net.saved.get('classes')}, not --classes "
                                  f"{','.join(map(str, classes))}")
        labels, classes = labels or net.saved.get("labels"), net.saved.get("classes")
    pairs = utils.find_pairs(data, "val" if js else "train")
    cases = [p.id for p in pairs]
    lms = utils.evaluation_landmarks(pairs, frame, landmarks)  # check all first
    if lms is None:
        log(f"note: {data}: no keypoints or landmarks; the pairs are scored by Dice alone")
    if disp:
        names = [disp_path(disp, p) for p in pairs]
        if len(set(names)) < len(names):
            raise utils.DataError(f"{data}: two pairs share the case numbers of {next(n for n in names if names.count(n) > 1)}")
        utils.check_output(names, overwrite)
    for p in pairs:  # and every volume, so a broken file never ends a run after hours of work
        for f in (p.fixed, p.moving):
            utils.load_volume(f, labels, classes)
    if preset is not None and net.config["preset"] != preset:
        log(f"note: {ckpt} is a '{net.config['preset']}' checkpoint; its preset is used, not --preset {preset}")
    rank, procs, device = utils.distributed(device)
    net.to(device)
    results = []
    for i in range(rank, len(cases), procs):  # under torchrun each pair on exactly one process
        c = cases[i]
        results.append(evaluate_pair(net, pairs[i], lms and lms[c], iter_tta, device, direction, labels, disp, classes))
        r = results[-1]
        if i >= FIGURE_PAIRS:
            del r["mips"]  # only the figure's pairs travel with their volumes
        tre = f"TRE {r['initial'].mean():6.2f} -> net {r['net'].mean():6.2f} -> tta {r['tta'].mean():6.2f} mm  " if lms else ""
        log(f"{c}: {tre}Dice {r['dice_initial']:.3f} -> {r['dice_tta']:.3f}  ({r['seconds']:.1f} s)")
    results = sorted(sum(utils.gather_objects(results), []), key=lambda r: cases.index(r["case"]))
    if not utils.is_main():
        return None  # process 0 writes the summary of all pairs
    # per landmark (TRE, mm) or, without keypoints, per pair (Dice, mean over labels)
    rows = [{"case": r["case"], **({"landmark": i} if lms else {}), **{k: f"{r[k][i]:.4f}" for k in KEYS}}
            for r in results for i in range(len(r["initial"]))]
    summ = {"checkpoint": ckpt, "preset": net.config["preset"], "iter_tta": iter_tta, "metric": "tre" if lms else "dice",
            **({"tre_direction": direction} if lms else {}), "frame": frame}
    for k in KEYS:
        if lms:
            s = summary(np.concatenate([r[k] for r in results]))
            summ.update({f"tre_{k}_{q}": v for q, v in s.items()})
            other = [d for d in utils.TRE_DIRECTIONS if d != direction][0]
            summ[f"tre_{k}_mean_{other}_direction"] = float(np.concatenate([r[f"{k}_{other}"] for r in results]).mean())
        summ[f"dice_{k}"] = float(np.mean([r[f"dice_{k}"] for r in results]))
        for j, v in enumerate(classes or []):  # per label: Dice and HD95 (mm) over the pairs (HD95: pairs where defined)
            summ[f"dice_label{v}_{k}"] = float(np.mean([r[f"dice_labels_{k}"][j] for r in results]))
            summ[f"hd95_label{v}_{k}"] = float(np.nanmean([r[f"hd95_{k}"][j] for r in results]))
        if classes:
            summ[f"hd95_{k}"] = float(np.nanmean([summ[f"hd95_label{v}_{k}"] for v in classes]))
            summ[f"dice_mean_labels_{k}"] = float(np.mean([summ[f"dice_label{v}_{k}"] for v in classes]))
    for k in ("folding_pct", "std_logjac", "seconds"):
        summ[k if k != "seconds" else "seconds_per_pair"] = float(np.mean([r[k] for r in results]))
    summ.update(num_pairs=len(results), num_landmarks=len(rows) if lms else 0, **({"classes": classes} if classes else {}))
    utils.write_csv(out + ".csv", ["case", *(["landmark"] if lms else []), *KEYS], rows)
    utils.write_json(out + ".json", summ)
    figure(results, out + ".png", tre=bool(lms))
    log(table(summ))
    return summ


def table(s):
    tre = s.get("metric", "tre") == "tre"
    head = f"{'':10s}" + (f"{'TRE mean':>9s}{'25%':>7s}{'50%':>7s}{'75%':>7s}" if tre else "") + f"{'Dice':>7s}"
    lines = [head] + [f"{k:10s}" + "".join(f"{s[f'tre_{k}_{q}']:{w}.2f}" for q, w in
                                          (("mean", 9), ("p25", 7), ("p50", 7), ("p75", 7)) if tre) + f"{s[f'dice_{k}']:7.3f}"
                      for k in KEYS]
    lines.append(f"{s['num_pairs']} pairs" + (f", {s['num_landmarks']} landmarks" if tre else " (no keypoints)") +
                 f"; folding {s['folding_pct']:.3f} %, "
                 f"std log|J| {s['std_logjac']:.3f}, {s['seconds_per_pair']:.1f} s per pair")
    if s.get("classes"):
        lines.append("per label Dice / HD95 mm (initial -> net -> tta): " + "; ".join(
            f"{v}: " + " -> ".join(f"{s[f'dice_label{v}_{k}']:.3f} / {s[f'hd95_label{v}_{k}']:.2f}" for k in KEYS)
            for v in s["classes"]))
    if not tre:
        return "\n".join(lines)
    other = [d for d in utils.TRE_DIRECTIONS if d != s["tre_direction"]][0]
    lines.append(f"TRE direction {s['tre_direction']}; in the {other} direction: net "
                 f"{s[f'tre_net_mean_{other}_direction']:.2f}, tta {s[f'tre_tta_mean_{other}_direction']:.2f} mm")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("iter_tta", type=int, nargs="?", default=50)
    ap.add_argument("ckpt", nargs="?", default="regnets_state_dilated_vessels.pth")
    ap.add_argument("--preset", choices=PRESETS, help="net and resolution for CKPT = none (default cpu); "
                    "a checkpoint brings its own")
    ap.add_argument("--data", default="dilated_vessels", help="folder of ID_{1,2}.nii.gz pairs or a Learn2Reg dataset JSON")
    ap.add_argument("--landmarks", help="folder of ID.csv in frame voxels (default DATA/landmarks; a dataset "
                    "JSON's keypoints otherwise)")
    ap.add_argument("--out", default="eval", help="output prefix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--tre-direction", choices=utils.TRE_DIRECTIONS, default="reference",
                    help="reference: moving landmarks mapped to fixed, the reference's sampling (paper_tre_val.csv); "
                         "fixed: fixed landmarks mapped to moving (Lung250M-4B / Learn2Reg)")
    ap.add_argument("--disp", metavar="DIR", help="write DIR/disp_FFFF_MMMM.nii.gz (Learn2Reg) for every pair")
    utils.data_options(ap)
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    a = ap.parse_args(argv)
    evaluate(a.iter_tta, a.ckpt, a.data, a.landmarks, a.out, a.preset, a.overwrite, a.seed, direction=a.tre_direction,
             device=a.device, disp=a.disp, frame=a.frame, labels=a.labels, classes=a.classes)


if __name__ == "__main__":
    utils.run_main(main)
