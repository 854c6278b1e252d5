"""The shared Lung250M-4B vessel pairs -> a Learn2Reg data set (dataset JSON, imagesTr, keypointsTr).

    python tools/lung250m4b_to_learn2reg.py SHARED_DIR OUT_DIR [--name NAME] [--overwrite]

SHARED_DIR is ../shared/data/lung250m4b (its README.md describes it). Training pairs are
dilated_vessels_10/case_XXX_{1,2}.nii.gz with the corrField keypoints of corrfield_10/case_XXX.csv
where that file exists; validation pairs (registration_val) are dilated_vessels_val with the
landmarks of landmarks_val/case_XXX.csv. Written into OUT_DIR, a scratch folder outside this
repository: imagesTr/NAME_XXXX_0000.nii.gz (fixed, case_XXX_1) and _0001 (moving, case_XXX_2), copied
byte for byte; keypointsTr/NAME_XXXX_0000.csv / _0001.csv (i,j,k voxel indices of that image, no
header); NAME_dataset.json. Learn2Reg keypoints are voxels of each original image, so the frame
coordinates of landmarks_val are moved back by the frame offsets (utils.frame_pads of the lung250m4b
frame); corrField keypoints already are original voxels and are written as given.
OUT_DIR (or OUT_DIR/NAME_dataset.json) is then DATA for utils.find_pairs: the training pairs by
default, the validation pairs with split "val".
"""
import argparse
import glob
import os
import re
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's scripts and modules

import utils

TRAIN, CORRFIELD, VAL, LANDMARKS = "dilated_vessels_10", "corrfield_10", "dilated_vessels_val", "landmarks_val"
DEFAULT_NAME = "Lung250M4B"


def repository_root():
    """The git repository this tool lives in (the folder above tools/ when it is not a git checkout)."""
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    d = here
    while not os.path.exists(os.path.join(d, ".git")):
        if os.path.dirname(d) == d:
            return here
        d = os.path.dirname(d)
    return d


def inside(path, folder):
    """Whether `path` is `folder` or lies below it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_dir(out, shared, overwrite, name):
    """Refuse, before anything is written, an OUT_DIR that would put data into the repository or
    the shared folder, or that already holds something (unless overwrite)."""
    if inside(out, repository_root()):
        raise utils.DataError(f"{out}: lies inside the git repository {repository_root()}; write it to a "
                              "scratch folder (data never go into the repository)")
    if inside(out, shared):
        raise utils.DataError(f"{out}: lies inside SHARED_DIR {shared}; write it to a scratch folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise utils.DataError(f"{out}: is a file; OUT_DIR must be a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise utils.DataError(f"{out}: exists and is not empty (use --overwrite)")
    # a second *_dataset.json would make OUT_DIR ambiguous as DATA (utils.dataset_json)
    ours = os.path.join(out, f"{name}_dataset.json")
    others = [f for f in glob.glob(os.path.join(glob.escape(out), "*_dataset.json")) if os.path.basename(f) != os.path.basename(ours)]
    if others:
        raise utils.DataError(f"{others[0]}: another data set's JSON is in OUT_DIR; use a fresh folder")


def case_number(pair):
    """case_032 -> 32 (the number of its Learn2Reg names)."""
    m = re.fullmatch(r"case_(\d+)", pair.id)
    if not m:
        raise utils.DataError(f"{pair.fixed}: expected case_XXX_1.nii.gz / case_XXX_2.nii.gz file names")
    return int(m.group(1))


def read_cases(shared):
    """[(number, Pair of the shared files, fixed keypoints, moving keypoints or None)] for the
    training and the validation split; keypoints (N, 3) in voxels of the original images."""
    train, val = [], []
    for p in utils.find_pairs(os.path.join(shared, TRAIN)):
        csv = os.path.join(shared, CORRFIELD, f"{p.id}.csv")
        kp = utils.read_points(csv, 6) if os.path.exists(csv) else None
        train.append((case_number(p), p, None if kp is None else kp[:, :3], None if kp is None else kp[:, 3:]))
    for p in utils.find_pairs(os.path.join(shared, VAL)):
        csv = os.path.join(shared, LANDMARKS, f"{p.id}.csv")
        if not os.path.exists(csv):
            raise utils.DataError(f"{csv}: missing (validation pair {p.id} needs its landmarks)")
        fixed, moving = utils.read_landmarks(csv, utils.LUNG250M4B)
        # frame -> original voxels; fixed and moving share a grid (find_pairs checks), hence one offset
        offset = np.array(utils.frame_pads(utils.image_shape(p.fixed), utils.LUNG250M4B)[::2])
        val.append((case_number(p), p, fixed - offset, moving - offset))
    numbers = [c[0] for c in train + val]
    twice = sorted({n for n in numbers if numbers.count(n) > 1})
    if twice:
        raise utils.DataError(f"{shared}: case {twice[0]:03d} is in more than one split (or folder); its files would collide")
    return train, val


def write_case(out, name, number, pair, fixed_kp, moving_kp):
    """One pair's images and keypoints into OUT_DIR; returns its learn2reg_paths."""
    paths = utils.learn2reg_paths(name, number)
    for key, src in (("fixed", pair.fixed), ("moving", pair.moving)):
        with utils.atomic_path(os.path.join(out, paths[key])) as tmp:
            shutil.copyfile(src, tmp)
    for key, pts in (("fixed_kp", fixed_kp), ("moving_kp", moving_kp)):
        path = os.path.join(out, paths[key])
        if pts is not None:
            utils.write_keypoints(path, pts)
        elif os.path.exists(path):
            os.remove(path)  # left by an earlier run (--overwrite): read_dataset would take it as this pair's
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shared", metavar="SHARED_DIR")
    ap.add_argument("out", metavar="OUT_DIR")
    ap.add_argument("--name", default=DEFAULT_NAME, help=f"the data set's name, prefix of every file (default {DEFAULT_NAME})")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"\w[\w-]*", args.name):
        raise utils.DataError(f"--name {args.name!r}: use letters, digits, '_' and '-' only (it prefixes file names)")
    missing = [d for d in (TRAIN, CORRFIELD, VAL, LANDMARKS) if not os.path.isdir(os.path.join(args.shared, d))]
    if missing:
        raise utils.DataError(f"{args.shared}: no {', '.join(missing)} folder; expected the shared Lung250M-4B "
                              "data (../shared/data/lung250m4b)")
    check_out_dir(args.out, args.shared, args.overwrite, args.name)
    # everything is read and checked before the first file is written
    train, val = read_cases(args.shared)
    train_paths = [write_case(args.out, args.name, *c) for c in train]
    val_paths = [write_case(args.out, args.name, *c) for c in val]
    # the JSON last: a run stopped halfway leaves no data set that looks complete
    json_path = os.path.join(args.out, f"{args.name}_dataset.json")
    utils.write_dataset_json(json_path, args.name, train_paths, val_paths,
                             description="Lung250M-4B dilated vessel masks (labels 0/1/2), 1 = inspiration (fixed), "
                                         "2 = expiration (moving); keypoints: corrField (training), landmarks (validation)")
    with_kp = sum(c[2] is not None for c in train)
    points = sum(len(c[2]) for c in train + val if c[2] is not None)
    print(f"{len(train)} training pairs ({with_kp} with keypoints), {len(val)} validation pairs, "
          f"{points} keypoint pairs written; data set: {json_path}")


if __name__ == "__main__":
    utils.run_main(main)
