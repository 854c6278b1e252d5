"""Procedural phantom pairs with exact landmark ground truth: the embedded default data of the demo
and the tests.

    python make_phantoms.py OUT_DIR NUM_PAIRS [--seed S] [--dims 3|2] [--size H W [D]] [--motion SCALE] [--overwrite]
                            [--learn2reg NAME --spacing X Y [Z] [--val K] [--inter-subject]]

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

--dims 2: 2D label maps instead, OASIS-style brain slices (default --size 160 192 at 1 mm): label 1
cortex (its inner border folded into gyri), 2 white matter, 3 ventricles, 4 deep grey nuclei; every
subject's outline, folds, ventricles and nuclei drawn at random. Moving = the same subject through a
smooth motion w (small rotation and scaling, three Gaussian bumps), landmarks exact as in 3D. The
folder layout holds the label maps (uint8, landmarks in pixels); --learn2reg writes intensity
images (imagesTr/, a grey value per label plus noise) with their label maps (labelsTr/, the JSON's
"label" entries, as OASIS). --inter-subject (with --learn2reg): OASIS's inter-subject layout, NUM_PAIRS
subjects of one image each on one grid, training[] the first NUM_PAIRS - K, no training pairs and no
keypoints (training pairs are drawn, utils.inter_subject_pairs; evaluation is by Dice), the last K
subjects in K - 1 consecutive registration_val pairs.
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


# ------------------------------ 2D label phantoms
BRAIN_LABELS = {1: "cortex", 2: "white matter", 3: "ventricles", 4: "deep grey"}
GREY = {0: 0.0, 1: 0.45, 2: 0.8, 3: 0.12, 4: 0.6}  # intensity per label of the 2D images (T1-like)


def random_subject(rng):
    """Shape parameters of one 2D subject, in units of the brain's semi-axes (u = (p - centre) / radii)."""
    side = np.array([-1.0, 1.0])[:, None]
    return dict(centre=rng.normal(0.5, 0.01, 2), radii=np.array([0.38, 0.40]) * rng.uniform(0.92, 1.05, 2),
                harm=rng.uniform(0, 0.05, 4), phase=rng.uniform(0, 2 * np.pi, 4),  # outline: modes 2..5
                folds=rng.integers(7, 12), fold_depth=rng.uniform(0.03, 0.06), fold_phase=rng.uniform(0, 2 * np.pi),
                bumps=rng.uniform(-1, 1, (3, 2)), bump_amp=rng.uniform(-0.06, 0.06, (3, 2)),  # irregular shapes
                vent=np.hstack([side * rng.uniform(0.08, 0.15, 1), rng.uniform(-0.15, 0.05, (2, 1))]),
                vent_axes=rng.uniform([0.05, 0.18], [0.09, 0.30], (2, 2)), vent_angle=side[:, 0] * rng.uniform(0.1, 0.4, 2),
                deep=np.hstack([side * rng.uniform(0.30, 0.40, 1), rng.uniform(0.0, 0.15, (2, 1))]),
                deep_axes=rng.uniform([0.08, 0.10], [0.12, 0.16], (2, 2)), deep_angle=rng.uniform(-0.5, 0.5, 2))


def in_ellipse(u, centre, axes, angle):
    c, s = np.cos(angle), np.sin(angle)
    d = u - centre
    a, b = d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c
    return (a / axes[0]) ** 2 + (b / axes[1]) ** 2 < 1


def brain_labels(p, subj, size):
    """Label (0-4) at points p (..., 2) in pixels of an image of `size` (H, W)."""
    u = (p / np.asarray(size, np.float64) - subj["centre"]) / subj["radii"]
    for c, amp in zip(subj["bumps"], subj["bump_amp"]):
        u = u + amp * np.exp(-np.sum((u - c) ** 2, axis=-1, keepdims=True) / (2 * 0.3 ** 2))
    r, theta = np.linalg.norm(u, axis=-1), np.arctan2(u[..., 1], u[..., 0])
    outer = 1 + sum(a * np.cos((k + 2) * theta + f) for k, (a, f) in enumerate(zip(subj["harm"], subj["phase"])))
    inner = outer * (0.78 + subj["fold_depth"] * np.cos(subj["folds"] * theta + subj["fold_phase"]))
    lab = np.where(r < outer, 1, 0).astype(np.uint8)
    lab[r < inner] = 2
    for k in range(2):
        lab[(r < inner) & in_ellipse(u, subj["deep"][k], subj["deep_axes"][k], subj["deep_angle"][k])] = 4
        lab[in_ellipse(u, subj["vent"][k], subj["vent_axes"][k], subj["vent_angle"][k])] = 3
    return lab


def random_motion_2d(rng, size, scale=1.0):
    """Parameters of a 2D motion w in pixels: rotation and scaling about the centre, three bumps."""
    return dict(centre=np.asarray(size, np.float64) / 2, rot=scale * rng.uniform(-0.05, 0.05),
                zoom=scale * rng.uniform(-0.03, 0.03), centres=rng.uniform(0.2, 0.8, (3, 2)) * size,
                amps=scale * rng.uniform(-4, 4, (3, 2)) * min(size) / 160, sigma=rng.uniform(15, 25) * min(size) / 160)


def displacement_2d(p, m):
    """w at moving points p (..., 2), pixels: moving point y corresponds to fixed point y + w(y)."""
    d = np.asarray(p, np.float64) - m["centre"]
    w = m["zoom"] * d + m["rot"] * np.stack([-d[..., 1], d[..., 0]], -1)
    for c, amp in zip(m["centres"], m["amps"]):
        w = w + amp * np.exp(-np.sum((p - c) ** 2, axis=-1, keepdims=True) / (2 * m["sigma"] ** 2))
    return w


def make_pair_2d(seed, index, size, motion=1.0, n_landmarks=50, spacing=10.0):
    """Fixed and moving label maps (H, W) uint8 and exact landmarks (pixels) of one 2D case."""
    rng = np.random.default_rng([seed, index, 2])
    subj, m = random_subject(rng), random_motion_2d(rng, size, motion)
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float64) for s in size), indexing="ij"), -1)
    fixed = brain_labels(grid, subj, size)
    moving = brain_labels(grid + displacement_2d(grid, m), subj, size)  # the same subject at y + w(y)
    x = rng.uniform(0, 1, (40 * n_landmarks, 2)) * (np.asarray(size) - 1)
    x = x[brain_labels(x, subj, size) > 0]
    y = x
    for _ in range(40):  # |grad w| < 1: the fixed-point iteration converges
        y = x - displacement_2d(y, m)
    y = np.round(y, 3)
    x = y + displacement_2d(y, m)
    ok = np.all((x >= 0) & (x <= np.asarray(size) - 1) & (y >= 0) & (y <= np.asarray(size) - 1), axis=1)
    chosen = []
    for i in np.flatnonzero(ok):  # already in random order: keep a point unless one kept is too close
        if not chosen or np.min(np.sum((y[chosen] - y[i]) ** 2, 1)) >= spacing ** 2:
            chosen.append(i)
        if len(chosen) == n_landmarks:
            break
    return fixed, moving, x[chosen], y[chosen]


def intensities(labels, rng):
    """A T1-like image of a label map: a grey value per label plus noise (float32)."""
    grey = np.array([GREY[k] for k in range(len(GREY))], np.float32)
    return (grey[labels] + rng.normal(0, 0.03, labels.shape)).astype(np.float32) * 100


def make_pairs(out_dir, n, seed=0, size=(64, 52, 64), overwrite=False, motion=1.0):
    """Write n phantom pairs (case_000 ...) and landmarks/ into out_dir; returns the case ids.
    A 2-entry size: 2D label phantoms (make_pair_2d) at 1 mm."""
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        return make_pairs_2d(out_dir, n, seed, size, overwrite, motion)
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


def check_2d(n, size, motion):
    if n < 1:
        raise utils.DataError(f"NUM_PAIRS must be >= 1, got {n}")
    if min(size) < 32:
        raise utils.DataError(f"--size {' '.join(map(str, size))}: 2D phantoms need at least 32 pixels per axis")
    if not 0 <= motion <= 1.8:
        raise utils.DataError(f"--motion must be in [0, 1.8], got {motion}")


def make_pairs_2d(out_dir, n, seed, size, overwrite=False, motion=1.0):
    """make_pairs in 2D: label maps case_000_1/_2.nii.gz (uint8, 1 mm pixels) and landmarks/ in pixels."""
    check_2d(n, size, motion)
    if any(s % utils.FRAME_MULTIPLE or s < utils.FRAME_MIN for s in size):  # landmark CSVs are frame voxels
        raise utils.DataError(f"--size {' '.join(map(str, size))}: a 2D folder's sides must be multiples of "
                              f"{utils.FRAME_MULTIPLE} and >= {utils.FRAME_MIN} (its own derived frame); --learn2reg takes any")
    ids = [f"case_{i:03d}" for i in range(n)]
    for c in ids:  # refuse before writing anything
        for p in (f"{c}_1.nii.gz", f"{c}_2.nii.gz", os.path.join("landmarks", f"{c}.csv")):
            utils.check_output(os.path.join(out_dir, p), overwrite)
    frame = {"name": "derived", "shape": list(size), "spacing": [1.0, 1.0], "shift": [0, 0]}
    for i, c in enumerate(tqdm(ids, desc="phantoms", leave=False)):
        fixed, moving, lf, lm = make_pair_2d(seed, i, size, motion)
        utils.write_landmarks(os.path.join(out_dir, "landmarks", f"{c}.csv"), lf, lm)
        utils.write_nifti(os.path.join(out_dir, f"{c}_2.nii.gz"), moving, 1, frame)
        utils.write_nifti(os.path.join(out_dir, f"{c}_1.nii.gz"), fixed, 1, frame)  # last: marks the pair complete
    return ids


def make_learn2reg(out_dir, name, n, size, spacing, n_val=0, seed=0, overwrite=False, motion=1.0, inter_subject=False):
    """Write n phantom pairs as the Learn2Reg data set `name` into out_dir; returns the JSON's path.
    inter_subject: n subjects of one image each instead (OASIS; see the module's doc)."""
    if n < 1 or not 0 <= n_val < n:
        raise utils.DataError(f"need NUM_PAIRS >= 1 and 0 <= --val < NUM_PAIRS, got {n} and {n_val}")
    if inter_subject and (n - n_val < 2 or n_val == 1):
        raise utils.DataError(f"--inter-subject needs 2 or more training subjects and --val 0 or >= 2 (a validation "
                              f"pair is two subjects), got {n} subjects and --val {n_val}")
    if min(size) < 16 or min(spacing) <= 0 or len(spacing) != len(size):
        raise utils.DataError("--size must be >= 16 voxels and --spacing > 0 mm per axis, one per axis")
    if len(size) == 2:
        check_2d(n, size, motion)
    if not 0 <= motion <= 1.8:
        raise utils.DataError(f"--motion must be in [0, 1.8], got {motion}")
    js = os.path.join(out_dir, f"{name}_dataset.json")
    cases = [utils.learn2reg_paths(name, i + 1, labels=len(size) == 2) for i in range(n)]
    for p in [js, *(os.path.join(out_dir, v) for c in cases for v in c.values())]:  # refuse before writing
        utils.check_output(p, overwrite)
    for i, c in enumerate(tqdm(cases, desc="phantoms", leave=False)):
        shape = list(size) if inter_subject else [s + (i * k) % 9 for s, k in zip(size, (3, 5, 7))]  # one grid: OASIS
        affine = np.diag([*map(float, spacing), *[1.0] * (4 - len(size))])
        if len(size) == 2:  # label maps with intensity images beside them, keypoints in pixels
            fixed, moving, lf, lm = make_pair_2d(seed, i, shape, motion)
            rng = np.random.default_rng([seed, i, 3])
            for k, lab, pts in (("fixed", fixed, lf), ("moving", moving, lm))[:1 if inter_subject else 2]:
                if not inter_subject:
                    utils.write_keypoints(os.path.join(out_dir, c[k + "_kp"]), pts)
                for key, vol in ((k + "_label", lab), (k, intensities(lab, rng))):
                    img = nib.Nifti1Image(vol, affine)
                    img.header.set_xyzt_units("mm")
                    with utils.atomic_path(os.path.join(out_dir, c[key])) as tmp:
                        nib.save(img, tmp)
            continue
        scale = [w / s for w, s in zip(WORLD, shape)]  # world mm per image voxel: the world fills the image
        fixed, moving, lf, lm = make_pair(seed, i, shape, motion, scale)
        for k, vol, pts in (("fixed", fixed, lf), ("moving", moving, lm))[:1 if inter_subject else 2]:
            if not inter_subject:
                utils.write_keypoints(os.path.join(out_dir, c[k + "_kp"]), (pts + 0.5) / np.array(scale) - 0.5)
            img = nib.Nifti1Image((vol > 0.5).astype(np.uint8), affine)
            img.header.set_xyzt_units("mm")
            with utils.atomic_path(os.path.join(out_dir, c[k])) as tmp:
                nib.save(img, tmp)
    what = "2D brain-slice label phantoms" if len(size) == 2 else "vessel-tree phantoms"
    if inter_subject:  # the last n_val subjects in consecutive validation pairs, as OASIS's registration_val
        held = cases[n - n_val:]
        val = [{"fixed": a["fixed"], "moving": b["fixed"]} for a, b in zip(held, held[1:])]
        utils.write_dataset_json(js, name, [], val, size, subjects=cases[:n - n_val],
                                 description=f"make_phantoms.py: {what}, inter-subject (one image per subject)")
        return js
    utils.write_dataset_json(js, name, cases[:n - n_val], cases[n - n_val:], size,
                             description=f"make_phantoms.py: {what} with exact keypoints")
    return js


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("num_pairs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2: 2D brain-slice label maps (see above)")
    ap.add_argument("--size", type=int, nargs="+", metavar="N", help="H W D (default 64 52 64; 2D: H W, default 160 192)")
    ap.add_argument("--motion", type=float, default=1.0, help="scale of the breathing displacement, 0 to 1.8 (default 1)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--learn2reg", metavar="NAME", help="write a Learn2Reg data set NAME (see above)")
    ap.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="voxel size in mm per axis (--learn2reg; default 1)")
    ap.add_argument("--val", type=int, default=0, metavar="K", help="the last K pairs are registration_val (--learn2reg)")
    ap.add_argument("--inter-subject", action="store_true", help="--learn2reg as OASIS: NUM_PAIRS subjects of one "
                    "image each, no training pairs, no keypoints; the last K subjects in K - 1 registration_val pairs")
    a = ap.parse_args(argv)
    a.size = a.size or ((64, 52, 64) if a.dims == 3 else (160, 192))
    a.spacing = a.spacing or [1.0] * a.dims
    if len(a.size) != a.dims or len(a.spacing) != a.dims:
        raise utils.DataError(f"--size and --spacing need {a.dims} values each (--dims {a.dims})")
    if a.inter_subject and not a.learn2reg:
        raise utils.DataError("--inter-subject writes a Learn2Reg data set: give --learn2reg NAME")
    if a.learn2reg:
        js = make_learn2reg(a.out_dir, a.learn2reg, a.num_pairs, a.size, a.spacing, a.val, a.seed, a.overwrite, a.motion,
                            a.inter_subject)
        what = f"subjects ({max(a.val - 1, 0)} validation pairs among the last {a.val})" if a.inter_subject else \
            f"phantom pairs ({a.val} for validation)"
        print(f"wrote {a.num_pairs} {what} as {js}")
        return
    ids = make_pairs(a.out_dir, a.num_pairs, a.seed, a.size, a.overwrite, a.motion)
    print(f"wrote {len(ids)} phantom pairs to {a.out_dir}")


if __name__ == "__main__":
    utils.run_main(main)
