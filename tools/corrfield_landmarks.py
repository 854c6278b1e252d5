"""corrField keypoints -> landmark files in the frame, for checks on training pairs (pseudo ground truth).

    python tools/corrfield_landmarks.py KEYPOINTS_DIR DATA_DIR OUT_DIR [--overwrite]

KEYPOINTS_DIR/case_XXX.csv: corrField correspondences (no header; fixed i,j,k then moving i,j,k in
the voxel indices of the ORIGINAL volume DATA_DIR/case_XXX_1.nii.gz). Each is moved into the frame
by that volume's frame offsets (utils.frame_pads), keypoints outside the frame are dropped, and
OUT_DIR/case_XXX.csv is written as a landmark file of evaluate_registration.py (--landmarks OUT_DIR).
The held-out-keypoint measurements of RESULTS.md were made this way.
"""
import argparse
import glob
import os
import sys

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's scripts and modules

import utils


def read_corrfield(path, original_shape):
    """corrField keypoints of a volume of `original_shape` -> (fixed, moving) (N, 3) in frame voxels."""
    try:
        a = np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError) as e:
        raise utils.DataError(f"{path}: not a keypoint CSV ({e})")
    if a.shape[1] != 6:
        raise utils.DataError(f"{path}: expected 6 columns, got {a.shape[1]}")
    h1, _, w1, _, d1, _ = utils.frame_pads(original_shape, utils.LUNG250M4B)
    a = a + np.array([h1, w1, d1] * 2)
    keep = ((a >= 0) & (a <= np.array(tuple(utils.LUNG250M4B['shape']) * 2) - 1)).all(axis=1)
    return a[keep, :3], a[keep, 3:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("keypoints")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.keypoints, "*.csv")))
    if not files:
        raise utils.DataError(f"{args.keypoints}: no keypoint CSVs")
    for f in files:
        case = os.path.splitext(os.path.basename(f))[0]
        utils.check_output(os.path.join(args.out, f"{case}.csv"), args.overwrite)
        volume = os.path.join(args.data, f"{case}_1.nii.gz")
        if not os.path.exists(volume):
            raise utils.DataError(f"{volume}: missing (its keypoints are in {f})")
    for f in files:
        case = os.path.splitext(os.path.basename(f))[0]
        shape = nib.load(os.path.join(args.data, f"{case}_1.nii.gz")).shape[:3]
        fixed, moving = read_corrfield(f, shape)
        utils.write_landmarks(os.path.join(args.out, f"{case}.csv"), fixed, moving)
        print(f"{case}: {len(fixed)} keypoints in the frame")


if __name__ == "__main__":
    utils.run_main(main)
