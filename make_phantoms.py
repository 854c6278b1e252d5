"""Procedural phantom pairs with exact landmark ground truth: the embedded default data of the demo
and the tests.

    python make_phantoms.py OUT_DIR NUM_PAIRS [--seed S] [--size H W D] [--motion SCALE] [--overwrite]
                            [--learn2reg NAME --spacing X Y Z [--val K]]

Fixed ("inspiration"): a random branching vessel tree (tubes of decreasing radius) in two
lung-shaped ellipsoids. Moving ("expiration"): the same analytic tree seen through a smooth
breathing-like deformation w, moving(y) = tree(y + w(y)), so a moving landmark y corresponds
exactly to the fixed landmark y + w(y). Everything is computed in 1 mm frame coordinates (i, j, k);
--size is the 256x208x256 frame pooled by an integer factor (default 4 mm: 64 52 64). --motion scales w
(the same trees, stronger breathing: a test of generalising to larger deformations).
--learn2reg NAME writes a Learn2Reg data set instead (OUT_DIR/NAME_dataset.json, imagesTr/ binary
uint8 masks, keypointsTr/ in each image's voxels; the last K pairs are registration_val): images of
--size voxels (each case up to 8 voxels larger per axis, as scans differ) at --spacing mm, the
phantom world stretched to fill them, so TRE against the exact keypoints is in the images' mm.
"""
import argparse
import os

import nibabel as nib
import numpy as np
from tqdm import tqdm

import utils

WORLD = tuple(utils.LUNG250M4B["shape"])  # the phantoms' world: the lung frame, 1 mm
LUNGS = [np.array([72.0, 108, 128]), np.array([184.0, 108, 128])]  # ellipsoid centres (i, j, k), mm
SEMI = np.array([50.0, 72, 110])                                      # and semi-axes, like the real frame


def lung(p, voxel):
    """Soft lung mask at points p (..., 3): 1 inside either ellipsoid, a one-voxel ramp at the wall."""
    q = np.minimum(*(np.linalg.norm((p - c) / SEMI, axis=-1) for c in LUNGS))
    return np.clip((1 - q) * SEMI.min() / voxel + 0.5, 0, 1)


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def random_tree(rng, generations=9, root_length=20.0, shrink=(0.8, 0.92), r0=6.5, decay=0.75, tries=8):
    """Segments (starts, ends, radii) of one tree per lung: six trunks from the hilum, then a
    bifurcation at every node, grown a generation at a time (vectorised over its nodes). Radius
    1 + r0 * decay^g mm: 7.5 mm trunks; the +1 mm mimics the one-voxel dilation of the real masks."""
    trunks = np.array([[0.2, 0, -1], [0.2, 0.1, 1], [1, 0.8, 0], [1, -0.8, -0.2], [1, 0.4, -0.7], [1, -0.4, 0.7]])
    mirror = [np.array([np.sign(c[0] - 128), 1, 1]) for c in LUNGS]  # lateral is -i in the left lung
    h = a = np.concatenate([np.tile(c - s * [22, 0, -5], (len(trunks), 1)) for c, s in zip(LUNGS, mirror)])
    d = unit(np.concatenate([trunks * s for s in mirror]) + rng.normal(0, 0.15, h.shape))
    length, segs = np.full(len(a), root_length), []  # segs: (start, end, radius) per generation
    crowd = np.zeros([s // 8 for s in WORLD])  # branch ends per 8 mm cell: steers children to gaps

    def cell(p):
        return tuple(np.clip(p // 8, 0, np.array(crowd.shape) - 1).astype(int).T)

    for g in range(generations):
        b = a + d * length[:, None]
        segs.append((a, b, np.full(len(a), 1 + r0 * decay ** g)))
        np.add.at(crowd, cell(b), 1)
        # `tries` candidates per child: turned 20-50 degrees from the parent in a random plane (the two
        # children to opposite sides), a little away from the hilum; the one in the least crowded cell wins
        n, sgn = len(a), np.array([-1.0, 1.0]).reshape(1, 2, 1, 1)
        ortho = unit(np.cross(d[:, None, None], rng.normal(size=(n, 1, tries, 3))))
        ang = np.deg2rad(rng.uniform(20, 50, (n, 2, tries, 1)))
        nd = unit(np.cos(ang) * d[:, None, None] + sgn * np.sin(ang) * ortho + 0.15 * unit(b - h)[:, None, None])
        nl = length[:, None, None] * rng.uniform(*shrink, (n, 2, tries))
        end = b[:, None, None] + nd * nl[..., None]
        inside = lung(end, 1) >= 1
        score = rng.uniform(0, 0.5, inside.shape) - crowd[cell(end.reshape(-1, 3))].reshape(inside.shape)
        k = np.where(inside, score, -np.inf).argmax(-1)
        i, c = np.nonzero(inside.any(-1) & (g + 1 < generations))  # a child with no try inside the lung ends
        a, h, d, length = b[i], h[i], nd[i, c, k[i, c]], nl[i, c, k[i, c]]
    return [np.concatenate(x) for x in zip(*segs)]  # starts (M, 3), ends (M, 3), radii (M,)


def random_motion(rng):
    """Parameters of w: superior-inferior compression about kc that is strongest at the base
    (low k, the diaphragm side, as in the real frame), anterior-posterior compression, 3 bumps."""
    return dict(a=rng.uniform(7, 9), b=rng.uniform(1.5, 3), kc=rng.uniform(118, 138),
                sj=rng.uniform(0.04, 0.06), jc=rng.uniform(150, 170),
                centres=rng.uniform([40, 40, 40], [216, 168, 216], (3, 3)),
                amps=rng.uniform(-3, 3, (3, 3)), sigma=rng.uniform(25, 40))


def displacement(p, m):
    """w at moving points p (..., 3), mm: the fixed point corresponding to moving point y is y + w(y)."""
    p = np.asarray(p, np.float64)
    w = np.zeros_like(p)
    t = (p[..., 2] - m["kc"]) / 100
    w[..., 2] = m["a"] * t - m["b"] * t ** 2  # base moves a + b mm, apex a - b mm
    w[..., 1] = m["sj"] * (p[..., 1] - m["jc"])
    for c, amp in zip(m["centres"], m["amps"]):
        w += amp * np.exp(-np.sum((p - c) ** 2, axis=-1, keepdims=True) / (2 * m["sigma"] ** 2))
    return w


def case_motion(seed, index, scale=1.0):
    """The motion parameters of case `index` of a run with `seed` (drawn first from its generator)."""
    return scaled(random_motion(np.random.default_rng([seed, index])), scale)


def scaled(m, scale):
    """Motion parameters whose displacement is `scale` times that of m."""
    return {**m, "a": scale * m["a"], "b": scale * m["b"], "sj": scale * m["sj"], "amps": scale * m["amps"]}


def render(segs, pts, axes, voxel, w_range=(0, 0)):
    """Soft occupancy of the tree at points pts (H, W, D, 3) = grid `axes` + w with w_range[0] <= w <=
    w_range[1] per axis: a ramp of one voxel across each tube wall, per segment in its bounding box."""
    occ = np.zeros(pts.shape[:3], np.float32)
    for a, b, r in zip(*segs):  # grid point y can reach the segment's box [lo, hi] only if y + w(y) lies in it
        lo, hi = np.minimum(a, b) - r - voxel - w_range[1], np.maximum(a, b) + r + voxel - w_range[0]
        box = tuple(slice(np.searchsorted(x, l), np.searchsorted(x, h, "right")) for x, l, h in zip(axes, lo, hi))
        q = pts[box] - a
        ab = b - a
        t = np.clip(q @ ab / (ab @ ab), 0, 1)
        dist = np.linalg.norm(q - t[..., None] * ab, axis=-1)
        occ[box] = np.maximum(occ[box], np.clip((r - dist) / voxel + 0.5, 0, 1))
    return occ * lung(pts, voxel)  # clipped to the lungs


def landmarks(rng, segs, m, n=100, spacing=12.0):
    """~n exact pairs on centrelines of vessels thick enough to see at 4 mm, `spacing` mm apart:
    fixed x on a centreline, moving y solves y + w(y) = x (fixed-point iteration, w is a
    contraction), then fixed := y + w(y) exactly (with y rounded as the CSV stores it)."""
    a, b, r = segs
    k, t = rng.choice(np.flatnonzero(r >= 2.4), 20 * n), rng.uniform(0.1, 0.9, (20 * n, 1))
    x = a[k] + t * (b[k] - a[k])
    y = x = x[lung(x, 1) >= 1]
    for _ in range(40):
        y = x - displacement(y, m)
    y = np.round(y, 3)
    x = y + displacement(y, m)
    hi = np.array(WORLD) - 1
    ok = np.all((x >= 0) & (x <= hi) & (y >= 0) & (y <= hi), axis=1)
    chosen = []
    for i in rng.permutation(np.flatnonzero(ok)):  # greedy: keep a point unless one kept is too close
        if not chosen or np.min(np.sum((y[chosen] - y[i]) ** 2, 1)) >= spacing ** 2:
            chosen.append(i)
        if len(chosen) == n:
            break
    return x[chosen], y[chosen]


def make_pair(seed, index, size, motion=1.0, scale=None):
    """Fixed and moving volume at `size` and the exact landmarks (phantom world = 1 mm frame voxels)
    of one case. scale: world voxels per image voxel per axis (default: the frame / size)."""
    rng = np.random.default_rng([seed, index])  # [seed, index]: seed 1 is not seed 0 shifted by a case
    motion, segs = scaled(random_motion(rng), motion), random_tree(rng)
    scale = scale or [WORLD[0] // size[0]] * 3
    axes = [c * (np.arange(s) + 0.5) - 0.5 for c, s in zip(scale, size)]  # voxel centres in world mm
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).astype(np.float32)
    f = min(scale)  # the tube walls' ramp: one image voxel
    fixed = render(segs, grid, axes, f)
    w = displacement(grid, motion).astype(np.float32)
    moving = render(segs, grid + w, axes, f, (w.min((0, 1, 2)), w.max((0, 1, 2))))  # the same tree at y + w(y)
    lf, lm = landmarks(rng, segs, motion)
    return fixed, moving, lf, lm


def make_pairs(out_dir, n, seed=0, size=(64, 52, 64), overwrite=False, motion=1.0):
    """Write n phantom pairs (case_000 ...) and landmarks/ into out_dir; returns the case ids."""
    size = tuple(int(s) for s in size)
    f = WORLD[0] // size[0] if size[0] > 0 else 0
    if f < 1 or any(F != f * s for F, s in zip(WORLD, size)):
        raise utils.DataError(f"--size {' '.join(map(str, size))}: must be 256 208 256 divided by one integer")
    if n < 1:
        raise utils.DataError(f"NUM_PAIRS must be >= 1, got {n}")
    # |grad w| < 1 keeps the moving phantom unfolded and the landmarks' fixed-point iteration converging:
    # at scale 1 the bound is ~0.54 (base 0.16, sj 0.06, three overlapping bumps 0.38)
    if not 0 <= motion <= 1.8:
        raise utils.DataError(f"--motion must be in [0, 1.8], got {motion}")
    ids = [f"case_{i:03d}" for i in range(n)]
    for c in ids:  # refuse before writing anything
        for p in (f"{c}_1.nii.gz", f"{c}_2.nii.gz", os.path.join("landmarks", f"{c}.csv")):
            utils.check_output(os.path.join(out_dir, p), overwrite)
    for i, c in enumerate(tqdm(ids, desc="phantoms", leave=False)):
        fixed, moving, lf, lm = make_pair(seed, i, size, motion)
        utils.write_landmarks(os.path.join(out_dir, "landmarks", f"{c}.csv"), lf, lm)
        utils.write_nifti(os.path.join(out_dir, f"{c}_2.nii.gz"), moving, f, utils.LUNG250M4B)
        utils.write_nifti(os.path.join(out_dir, f"{c}_1.nii.gz"), fixed, f, utils.LUNG250M4B)  # last: marks the pair complete
    return ids


def make_learn2reg(out_dir, name, n, size, spacing, n_val=0, seed=0, overwrite=False, motion=1.0):
    """Write n phantom pairs as the Learn2Reg data set `name` into out_dir; returns the JSON's path."""
    if n < 1 or not 0 <= n_val < n:
        raise utils.DataError(f"need NUM_PAIRS >= 1 and 0 <= --val < NUM_PAIRS, got {n} and {n_val}")
    if min(size) < 16 or min(spacing) <= 0:
        raise utils.DataError("--size must be >= 16 voxels and --spacing > 0 mm per axis")
    if not 0 <= motion <= 1.8:
        raise utils.DataError(f"--motion must be in [0, 1.8], got {motion}")
    js = os.path.join(out_dir, f"{name}_dataset.json")
    cases = [utils.learn2reg_paths(name, i + 1) for i in range(n)]
    for p in [js, *(os.path.join(out_dir, v) for c in cases for v in c.values())]:  # refuse before writing
        utils.check_output(p, overwrite)
    for i, c in enumerate(tqdm(cases, desc="phantoms", leave=False)):
        shape = [s + (i * k) % 9 for s, k in zip(size, (3, 5, 7))]
        scale = [w / s for w, s in zip(WORLD, shape)]  # world mm per image voxel: the world fills the image
        fixed, moving, lf, lm = make_pair(seed, i, shape, motion, scale)
        affine = np.diag([*map(float, spacing), 1.0])
        for k, vol, pts in (("fixed", fixed, lf), ("moving", moving, lm)):
            utils.write_keypoints(os.path.join(out_dir, c[k + "_kp"]), (pts + 0.5) / np.array(scale) - 0.5)
            img = nib.Nifti1Image((vol > 0.5).astype(np.uint8), affine)
            img.header.set_xyzt_units("mm")
            with utils.atomic_path(os.path.join(out_dir, c[k])) as tmp:
                nib.save(img, tmp)
    utils.write_dataset_json(js, name, cases[:n - n_val], cases[n - n_val:], size,
                             description="make_phantoms.py: vessel-tree phantoms with exact keypoints")
    return js


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("num_pairs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=3, default=(64, 52, 64), metavar=("H", "W", "D"))
    ap.add_argument("--motion", type=float, default=1.0, help="scale of the breathing displacement, 0 to 1.8 (default 1)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--learn2reg", metavar="NAME", help="write a Learn2Reg data set NAME (see above)")
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                    help="voxel size in mm (--learn2reg)")
    ap.add_argument("--val", type=int, default=0, metavar="K", help="the last K pairs are registration_val (--learn2reg)")
    a = ap.parse_args(argv)
    if a.learn2reg:
        js = make_learn2reg(a.out_dir, a.learn2reg, a.num_pairs, a.size, a.spacing, a.val, a.seed, a.overwrite, a.motion)
        print(f"wrote {a.num_pairs} phantom pairs ({a.val} for validation) as {js}")
        return
    ids = make_pairs(a.out_dir, a.num_pairs, a.seed, a.size, a.overwrite, a.motion)
    print(f"wrote {len(ids)} phantom pairs to {a.out_dir}")


if __name__ == "__main__":
    utils.run_main(main)
