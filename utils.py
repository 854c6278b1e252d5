"""Everything the stage scripts share, written once. Sections:

   1. errors and entry point        5. frame                   9. metrics (TRE, Dice, codebook)
   2. device and precision          6. data: volumes, pairs,  10. realism statistics
   3. training runs                    landmarks, augmentation 11. output files (atomic writes,
   4. several processes (torchrun)  7. token files                 NIfTI, JSON, CSV, figures)
                                    8. warping

Conventions used everywhere:
  * volumes live in the common 256x208x256 frame (FRAME) at 1 mm, or in that frame average-pooled
    by an integer `factor` (2 = half, 4 = quarter resolution). A pooled voxel v covers frame voxels
    f*v .. f*v+f-1, so its centre sits at f*v + (f-1)/2 in frame coordinates.
  * landmark coordinates are always voxel indices (i, j, k) of the 1 mm frame.
  * displacement fields (ddf) are (B, 3, H, W, D) in voxel units of their own grid, channel c along
    spatial axis c: the map is x -> x + ddf(x) (fixed -> moving), MONAI's `Warp` convention.
"""
import argparse
import contextlib
import csv
import datetime
import functools
import glob
import hashlib
import json
import os
import random
import re
import sys
import warnings

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

# ------------------------------ 1. errors and entry point
class DataError(Exception):
    """Bad input: reported as one line `error: <file>: <problem>` and exit status 2."""


def run_main(main):
    """Run a script's main(); bad input becomes a one-line error instead of a traceback."""
    try:
        main()
        if dist.is_initialized():
            dist.destroy_process_group()
    except (DataError, OSError) as e:  # OSError: a missing file, a full disk, no permission - named in e
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_positive(counts):
    """{name: count or None (not given)} -> a one-line error for the first count below 1."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")


def check_seed(seed):
    if seed is not None and seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}")


# ------------------------------ 2. device and precision
def get_device(name=None):
    """torch.device of `name` (e.g. 'cuda:1'), else CUDA when present, else the CPU. On CUDA it also
    sets what the reference implementation sets in every script: cuDNN autotuning (the input shapes
    never change within a run) and TF32-class matmuls ('medium' also allows bf16 passes)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("medium")
    return device


def autocast(device):
    """Mixed precision as the reference implementation: fp16 autocast on CUDA (the networks and the
    VQ-AE's code-distance matmul, as there), none (fp32) on the CPU. Losses and fields stay fp32 (fp32())."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16)


def precision(device):
    """The arithmetic utils.autocast gives on `device`, as checkpoints record it."""
    return "fp16" if device.type == "cuda" else "fp32"


def fp32(x):
    """x in at least single precision, for the numerically sensitive parts (code distances, losses,
    fields) under autocast and for masks stored as integers; float64 stays float64 (the tests'
    exact-arithmetic runs)."""
    return x if x.dtype == torch.float64 else x.float()


def to_device_if_fits(x, device, share=0.25):
    """x on `device` when it takes at most `share` of the GPU's free memory (no per-iteration
    host-to-device copies of the data set), else left in (pinned) host memory."""
    if device.type != "cuda":
        return x
    if x.nbytes <= share * torch.cuda.mem_get_info(device)[0]:
        return x.to(device)
    return x.pin_memory()


def compile_modules(modules, enabled):
    """torch.compile each module in place (nn.Module.compile): the state_dict keys stay the same,
    so checkpoints of compiled and eager runs are interchangeable."""
    if enabled:
        for m in modules:
            m.compile()


def peak_memory(device):
    """', peak GPU memory X GiB' on CUDA (torch.cuda.max_memory_allocated), '' elsewhere."""
    if torch.device(device).type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"


# ------------------------------ 3. training runs: arguments, start, optimiser step, checkpoints, resume
def training_parser(doc, presets, default_out):
    """The argument parser of a training script (its docstring's first line as description) with
    the options the three share, same names and meaning. BATCH_SIZE comes first: the script's
    own positional arguments follow it."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("batch_size", type=int, nargs="?", help="default: the preset's (paper: 8)")
    ap.add_argument("--preset", choices=sorted(presets), default="paper")
    ap.add_argument("--iters", type=int, help="default: the preset's")
    ap.add_argument("--out", help=f"checkpoint (default {default_out})")
    ap.add_argument("--seed", type=int, help="default 0 (resuming: the checkpoint's)")
    ap.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the network(s) in place, as the reference does (checkpoints unchanged)")
    return ap


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_training(out, kind, *, resume, overwrite, batch_size, seed, iters, default_batch, config=None,
                   outputs=None, fixed_iters=False, **settings):
    """The start every training script shares: counts and seed checked; with `resume` and an existing
    checkpoint `out` that checkpoint (refused if of another kind or config, or trained with other
    `settings`, batch size, seed or - fixed_iters: a schedule planned for them - iterations), whose
    batch size and seed are kept; otherwise the outputs (default `out`) are refused if they exist.
    Returns (checkpoint or None, batch size, seed)."""
    check_positive({"BATCH_SIZE": batch_size, "--iters": iters})
    check_seed(seed)
    ck = None
    if resume and os.path.exists(out):
        ck = load_checkpoint(out, kind, config)
        check_resume(out, ck, batch=batch_size, seed=seed, iters=iters if fixed_iters else None, **settings)
        batch_size, seed = ck["batch"], ck["seed"]
    elif not resume:
        check_output(outputs or out, overwrite, resumable=True)  # fail before the (slow) data loading
    return ck, default_batch if batch_size is None else batch_size, 0 if seed is None else seed


def check_resume(path, ck, **now):
    """Refuse to resume a checkpoint with other settings than it was trained with (None = not
    given: the checkpoint's value is kept)."""
    diff = [f"{k} {ck.get(k)} -> {v}" for k, v in now.items() if v is not None and ck.get(k) != v]
    if diff:
        raise DataError(f"{path}: trained with other settings ({', '.join(diff)}); resume with the same "
                        "ones or write a new --out")


def optimiser_step(loss, optimizer, scaler):
    """One optimiser step of every training loop: clear the gradients, backward of the (scaled) loss,
    step, update the GradScaler. On CUDA the scaler skips a step with non-finite gradients, as in the
    reference; on the CPU it is disabled and the step is plain."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def save_checkpoint(path, kind, config, state, **extra):
    """Weights together with the kind and config that built them; written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"kind": kind, "config": config, "state": state, **extra}, tmp)


def load_checkpoint(path, kind, config=None):
    """Load a checkpoint of `kind`; refuse another kind, another config, or a broken file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # a .pth never executes code
    except Exception:
        raise DataError(f"{path}: not a readable checkpoint (truncated or corrupt)")
    if not isinstance(ck, dict) or "kind" not in ck:
        raise DataError(f"{path}: not a checkpoint of this project")
    if ck["kind"] != kind:
        raise DataError(f"{path}: is a '{ck['kind']}' checkpoint, expected '{kind}'")
    if config is not None:
        check_config(path, ck, config)
    return ck


def check_config(path, ck, config):
    """Refuse a checkpoint `ck` (read from `path`) whose config is not `config`, naming what differs."""
    if ck["config"] != config:
        diff = sorted(k for k in set(config) | set(ck["config"]) if config.get(k) != ck["config"].get(k))
        raise DataError(f"{path}: checkpoint config differs in {', '.join(diff)} (another preset?)")


def resume_state(ck, path, model, optimizer, scheduler, scaler):
    """Load a training checkpoint `ck` (from load_checkpoint(path, ...)) into the model, optimiser,
    scheduler and GradScaler."""
    model.load_weights(ck["state"], path)
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    load_scaler_state(scaler, ck["scaler"])


def load_scaler_state(scaler, state):
    """Restore a GradScaler; a checkpoint written without CUDA holds an empty state, which
    GradScaler.load_state_dict refuses: a CUDA run resumed from it starts a fresh scale instead."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def rng_state(generators):
    """Every random stream a training loop draws from - torch's global generators (CPU, and CUDA
    when present) and the loop's own `generators` - for the checkpoint: a resumed run then draws
    exactly what the uninterrupted run would have drawn."""
    state = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generators):
    """Restore rng_state()."""
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------ 4. several processes (torchrun)
# Under `torchrun --nproc-per-node N script.py ...` every process runs the whole script on its share of
# each batch. The global batch of the command line is split across the processes, and every random
# draw is made for the whole batch on every process (each keeps its part), so N processes take the
# same steps as one process on the same device type, up to floating-point reduction order.
def distributed(device=None):
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1 in the environment): NCCL
    on CUDA (LOCAL_RANK picks the GPU), gloo on the CPU -> (rank, world size, device). A plain run:
    (0, 1, get_device(device))."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and not dist.is_initialized():
        return 0, 1, get_device(device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device is not None and ":" in device:
        raise DataError(f"--device {device}: under torchrun each process takes LOCAL_RANK's GPU; give 'cuda' or 'cpu'")
    if device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{local}"
    device = get_device(device)
    if not dist.is_initialized():
        # process 0 alone validates and draws figures while the others wait in the next collective
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def world():
    """(rank, world size) of this process: (0, 1) without a process group."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_batch(batch_size):
    """This process's part of a global batch; the batch must split evenly."""
    rank, size = world()
    if batch_size % size:
        raise DataError(f"BATCH_SIZE {batch_size} does not split evenly over {size} processes")
    return batch_size // size


def parallel(model, device):
    """model wrapped in DistributedDataParallel when there are several processes (gradients are
    averaged across them), else model itself. The caller keeps `model` for its attributes,
    state_dict (no 'module.' prefix) and checkpoints."""
    if world()[1] == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_mean(values, device):
    """Floats -> their means over the processes (a no-op for one process)."""
    if world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world()[1]).tolist()


def gather_objects(obj):
    """Picklable objects of every process -> list in rank order, on every process."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def is_main():
    return world()[0] == 0


def main_print(*args, **kwargs):
    """print on process 0 only (every process runs the whole script under torchrun)."""
    if is_main():
        print(*args, **kwargs)


# ------------------------------ 5. frame
FRAME = (256, 208, 256)  # Lung250M-4B's common frame, voxels of ~1 mm


def frame_pads(shape):
    """Pad widths (negative = crop) that put a volume of `shape` into the 256x208x256 frame,
    exactly as the Lung250M-4B data README gives them. Returns (h1, h2, w1, w2, d1, d2)."""
    H, W, D = shape
    h1, w1, d1 = (352 - H) // 2 - 48, (256 - W) // 2 - 32, (352 - D) // 2 - 48
    h2, w2, d2 = 352 - H - h1 - 96, 256 - W - w1 - 48, 352 - D - d1 - 96
    return h1, h2, w1, w2, d1, d2


def to_frame(vol):
    """(H, W, D) tensor of any size -> (256, 208, 256), zero-padded / cropped."""
    h1, h2, w1, w2, d1, d2 = frame_pads(vol.shape)
    return F.pad(vol, (d1, d2, w1, w2, h1, h2))


def grid_shape(factor):
    return tuple(s // factor for s in FRAME)


def frame_factor(shape):
    """The factor f if `shape` is the frame pooled by f (an already framed volume), else None."""
    for f in (1, 2, 4, 8):
        if tuple(shape) == grid_shape(f):
            return f
    return None


def pool(x, factor):
    """Average-pool a (..., H, W, D) tensor by an integer factor (soft occupancy for masks)."""
    if factor == 1:
        return x
    lead = x.shape[:-3]
    y = F.avg_pool3d(x.reshape(-1, 1, *x.shape[-3:]).float(), factor)
    return y.reshape(*lead, *y.shape[-3:])


def frame_affine(factor):
    """Voxel -> world affine of a volume on the frame grid pooled by `factor`: world = 1 mm frame
    coordinates (voxel centres of the pooled grid at f*v + (f-1)/2). Opens in Slicer/ITK-SNAP."""
    a = np.diag([float(factor)] * 3 + [1.0])
    a[:3, 3] = (factor - 1) / 2
    return a


def pad_to_multiple(x, m):
    """Zero-pad the last three dims of x up to multiples of m (networks with stride m need it).
    Returns the padded tensor and the original spatial size to crop back to."""
    size = x.shape[-3:]
    pads = []
    for s in reversed(size):
        pads += [0, (-s) % m]
    return F.pad(x, pads), tuple(size)


def crop_to(x, size):
    return x[..., : size[0], : size[1], : size[2]]


# ------------------------------ 6. data: volumes, pairs, landmarks, augmentation
def load_volume(path):
    """Read one NIfTI as float32 numpy, checking the problems that silently ruin a run."""
    try:
        img = nib.load(path)
        a = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many kinds for a broken file
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__})")
    a = np.squeeze(a, axis=tuple(range(3, a.ndim))) if a.ndim > 3 and all(s == 1 for s in a.shape[3:]) else a
    if a.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{path}: contains NaN or inf voxels")
    if not (a > 0).any():
        raise DataError(f"{path}: the vessel mask is all zero")
    return a


# The reference implementation cuts one oversize training scan (Lung250M-4B case_035, 451 slices)
# to its first 280 slices before framing: the frame alone would keep ~71 % of its vessels, the cut
# ~93 %. Written as a rule on the depth (no scan in Lung250M-4B lies between 354 and 450 slices).
DEEP_SCAN, DEPTH_CUT = 400, 280


FRAME_LOSS_WARN = 0.1  # framing always crops a few % of some scans' vessels; warn when it crops more
SCAN_AXES = ("LR", "PA", "SI")  # Lung250M-4B: voxel axes along x, y, z (LPS or RAS), ~1 mm voxels


def check_orientation(path):
    """Warn when an original scan's voxel axes are permuted against the data's convention or its
    voxels are not ~1 mm: landmarks are voxel indices, so the volume is used as stored and never
    reoriented (the direction of each axis varies in the data set and does not matter)."""
    img = nib.load(path)
    axes = nib.aff2axcodes(img.affine)
    zooms = img.header.get_zooms()[:3]
    permuted = any(a not in allowed for a, allowed in zip(axes, SCAN_AXES))
    if permuted or any(abs(z - 1) > 0.1 for z in zooms):
        warnings.warn(f"{path}: orientation {''.join(axes)}, voxels {'x'.join(f'{z:.2f}' for z in zooms)} mm; "
                      "expected axes along x, y, z at ~1 mm - used as stored (landmarks are voxel indices)")


def framed_volume(path, factor, cut_deep=False):
    """A vessel volume at frame/`factor` resolution, values in [0, 1] (float32 tensor).
    Original-size scans are binarised (> 0) and framed first; volumes that already have the
    pooled-frame shape (synthetic pairs, phantoms) are taken as soft maps in [0, 1].
    cut_deep: a scan deeper than DEEP_SCAN slices is cut to its first DEPTH_CUT first (training
    data only: landmarks are given in the uncut frame)."""
    a = load_volume(path)
    if a.min() < 0:
        raise DataError(f"{path}: negative voxel values (expected a mask or probabilities)")
    f0 = frame_factor(a.shape)
    if f0 is None:  # an original scan: binarise, frame, then pool
        check_orientation(path)
        vessels = int((a > 0).sum())
        if cut_deep and a.shape[2] > DEEP_SCAN:
            a = a[:, :, :DEPTH_CUT]
        v, f0 = to_frame(torch.from_numpy((a > 0).astype(np.float32))), 1
        kept = float(v.sum()) / vessels
        if kept < 1 - FRAME_LOSS_WARN:
            warnings.warn(f"{path}: {tuple(a.shape)} exceeds the 256x208x256 frame, which keeps "
                          f"{100 * kept:.0f} % of its vessel voxels")
    else:  # already framed: probabilities stay soft, label maps are binarised
        v = torch.from_numpy(a if a.max() <= 1 else (a > 0).astype(np.float32))
    if factor % f0:
        raise DataError(f"{path}: volume is at {f0} mm but {factor} mm is needed")
    if not (v > 0).any():
        raise DataError(f"{path}: the vessel mask is empty inside the 256x208x256 frame")
    return pool(v, factor // f0)


def find_pairs(folder):
    """Case ids ('case_032', ...) of a folder of case_XXX_1 / case_XXX_2 .nii.gz pairs."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder does not exist")
    files = sorted(glob.glob(os.path.join(folder, "*_[12].nii.gz")))
    if not files:
        raise DataError(f"{folder}: no case_XXX_1.nii.gz / case_XXX_2.nii.gz pairs found")
    ids = sorted({re.sub(r"_[12]\.nii\.gz$", "", os.path.basename(f)) for f in files})
    for c in ids:
        paths = [os.path.join(folder, f"{c}_{k}.nii.gz") for k in (1, 2)]
        for p in paths:
            if not os.path.exists(p):
                raise DataError(f"{p}: missing (its pair partner exists)")
        shapes = [header_shape(p) for p in paths]
        if None not in shapes and shapes[0] != shapes[1]:
            warnings.warn(f"{paths[1]}: shape {shapes[1]} differs from its fixed volume's {shapes[0]}; each is "
                          "framed on its own (centre-cropped / padded), so voxel indices and landmarks may not match")
    return ids


def header_shape(path):
    """The 3D shape in a NIfTI header (None when unreadable: load_volume reports that)."""
    try:
        return tuple(nib.load(path).shape[:3])
    except Exception:
        return None


def load_pairs(folder, factor, ids=None, progress=True):
    """All pairs of a folder as one (N, 2, H, W, D) tensor at frame/`factor`; channel 0 fixed.
    For training and generation: oversize scans are cut as the reference does (framed_volume)."""
    ids = ids or find_pairs(folder)
    vols = []
    for c in tqdm(ids, desc=f"load {os.path.basename(folder.rstrip('/'))}", disable=not progress, leave=False):
        vols.append(torch.stack([framed_volume(os.path.join(folder, f"{c}_{k}.nii.gz"), factor, cut_deep=True)
                                 for k in (1, 2)]))
    return ids, torch.stack(vols)


def read_landmarks(path):
    """Landmark CSV (fixed_i,fixed_j,fixed_k,moving_i,moving_j,moving_k; frame voxel indices; the
    header line may be left out) -> (fixed, moving) float arrays of shape (N, 3)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: landmark file missing")
    with open(path) as f:
        first = f.readline()
    try:  # a header line is optional: skip the first line only when it is not 6 numbers
        [float(v) for v in first.split(",")]
        header = 0
    except ValueError:
        header = 1
    try:
        a = np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a landmark CSV ({e})")
    if a.shape[1] != 6 or len(a) == 0 or not np.isfinite(a).all():
        raise DataError(f"{path}: expected N rows of 6 finite coordinates")
    hi = np.array(FRAME * 2) - 1
    if (a < 0).any() or (a > hi).any():
        raise DataError(f"{path}: landmarks outside the 256x208x256 frame")
    return a[:, :3], a[:, 3:]


def write_landmarks(path, fixed, moving):
    with atomic_path(path) as tmp:
        np.savetxt(tmp, np.hstack([fixed, moving]), delimiter=",", fmt="%.4f", comments="",
                   header="fixed_i,fixed_j,fixed_k,moving_i,moving_j,moving_k")


AUG_STD = 0.05  # the reference's affine augmentation: identity 3x4 + N(0, 0.05)


def batch_randn(x, shape, generator=None, share=(0, 1)):
    """N(0, 1) draws (len(x), *shape) on x's device for this process's part of a global batch:
    share (rank, processes); the generator draws for the whole global batch, so every process
    count (and a resumed run) sees the same numbers per pair."""
    rank, procs = share
    return torch.randn((len(x) * procs, *shape), generator=generator, device=x.device)[rank * len(x):(rank + 1) * len(x)]


def augment(x, std=AUG_STD, generator=None, share=(0, 1)):
    """One random affine per pair of x (B, 2, H, W, D) (identity 3x4 + N(0, std)), the same for
    fixed and moving, nearest-neighbour resampling (the reference's choice: keeps masks binary).
    Drawn on x's device (`generator` must live there): a GPU step needs no host-to-device copy.
    share (rank, processes): x is that part of a global batch; the draws are the global batch's."""
    theta = torch.eye(3, 4, device=x.device).repeat(len(x), 1, 1) + std * batch_randn(x, (3, 4), generator, share)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(fp32(x), grid, mode="nearest", padding_mode="zeros", align_corners=False)


# ------------------------------ 7. token files
# The reference implementation's token file (paper_tokens_97.pth): a plain list of 16x13x16 id
# tensors of its 1 mm VQ-AE with 1024 codes, one per Lung250M-4B training case in sorted order:
# cases 000-103 without the data set's test cases below (entry 30 = case_032, 33 = case_035, which
# the reference cut to 280 slices before encoding, as load_pairs does).
REFERENCE_TOKENS = dict(grid_shape=(16, 13, 16), num_codes=1024, factor=1)
LUNG250M_TEST_CASES = (2, 8, 54, 55, 56, 94, 97)
REFERENCE_CASES = [f"case_{i:03d}" for i in range(104) if i not in LUNG250M_TEST_CASES]


def write_tokens(path, tokens, case_ids, num_codes, config, **extra):
    """The token file of infer_vqae.py: tokens (N, h, w, d) -> {case_ids, tokens (N, h*w*d) int16
    (row-major over grid_shape), grid_shape, num_codes, factor, config (the VQ-AE's), **extra}."""
    d = {"case_ids": list(case_ids), "tokens": tokens.flatten(1).to(torch.int16),
         "grid_shape": tuple(tokens.shape[1:]), "num_codes": num_codes, "factor": config["factor"],
         "config": config, **extra}
    with atomic_path(path) as tmp:
        torch.save(d, tmp)
    return d


def read_tokens(path):
    """A token file (write_tokens' or the reference's list) -> dict(tokens (N, L) long, grid_shape,
    num_codes, factor, case_ids, config: the VQ-AE's, None for the reference's list)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: token file not found")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise DataError(f"{path}: not a readable token file")
    if isinstance(d, (list, tuple)):
        n = int(np.prod(REFERENCE_TOKENS["grid_shape"]))
        if not d or any(not torch.is_tensor(t) or t.numel() != n for t in d):
            raise DataError(f"{path}: expected a list of token tensors of {n} ids")
        # the reference's 97 grids are its training cases; another list names its grids by position
        ids = REFERENCE_CASES if len(d) == len(REFERENCE_CASES) else [f"grid_{i:03d}" for i in range(len(d))]
        d = {"tokens": torch.stack([t.reshape(-1) for t in d]), "case_ids": ids, "config": None, **REFERENCE_TOKENS}
    if not isinstance(d, dict) or not {"tokens", "grid_shape", "num_codes"} <= set(d):
        raise DataError(f"{path}: not a token file (needs tokens, grid_shape, num_codes)")
    factor = d.get("factor") or (d.get("config") or {}).get("factor")
    if not factor:
        raise DataError(f"{path}: token file does not say the frame factor of its VQ-AE")
    if not torch.is_tensor(d["tokens"]) or d["tokens"].numel() == 0:
        raise DataError(f"{path}: holds no token grids")
    grid = tuple(int(g) for g in d["grid_shape"])
    tokens = d["tokens"].long().reshape(len(d["tokens"]), -1)
    if tokens.shape[1] != np.prod(grid):
        raise DataError(f"{path}: {tokens.shape[1]} tokens per grid, but the grid {'x'.join(map(str, grid))} "
                        f"has {np.prod(grid)}")
    codes = int(d["num_codes"])
    if tokens.min() < 0 or tokens.max() >= codes:
        raise DataError(f"{path}: token ids outside [0, {codes})")
    return {"tokens": tokens, "grid_shape": grid, "num_codes": codes, "factor": int(factor),
            "case_ids": list(d.get("case_ids", [])), "config": d.get("config")}


# ------------------------------ 8. warping
@functools.lru_cache(maxsize=32)
def _identity_grid(shape, device, dtype):
    """grid_sample's identity grid over `shape` ((x, y, z) = last axis first, align_corners=True)
    and the factor turning voxel displacements into its normalised units."""
    axes = [torch.linspace(-1, 1, n, device=device, dtype=dtype) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).flip(-1)
    return grid, torch.tensor([2 / max(n - 1, 1) for n in reversed(shape)], device=device, dtype=dtype)


def warp(img, ddf, nearest=False, padding=None):
    """img (B, C, H, W, D) sampled at x + ddf(x): bilinear with border padding (fields), or nearest
    with zeros; padding="zeros" for images, as the reference implementation warps its vessel maps.
    Same result as MONAI's `Warp` (tests/test_utils.py). MONAI's caches its voxel grid too, but
    then adds the ddf, normalises the sum with three in-place per-axis slice writes (whose backward
    zero-fills full-size gradients) and reorders the axes by a copy; here the ddf is scaled and
    added to a cached normalised grid in one expression. tools/benchmark_registration.py times both."""
    grid, scale = _identity_grid(tuple(ddf.shape[2:]), ddf.device, ddf.dtype)
    padding = padding or ("zeros" if nearest else "border")
    return F.grid_sample(img, grid + ddf.movedim(1, -1).flip(-1) * scale, align_corners=True,
                         mode="nearest" if nearest else "bilinear", padding_mode=padding)


def compose(a, b):
    """ddf of (x -> x + a(x)) o (x -> x + b(x)), i.e. apply b first, then a."""
    return b + warp(a, b)


def exp_velocity(v, squarings):
    """Scaling and squaring: stationary velocity (voxel units) -> diffeomorphic ddf; MONAI's
    `DVF2DDF` on the warp above."""
    ddf = v / 2 ** squarings
    for _ in range(squarings):
        ddf = ddf + warp(ddf, ddf)
    return ddf


def resize_ddf(ddf, size):
    """Resample a ddf onto a grid of `size` covering the same frame (values rescaled to the new
    voxel size); align_corners=False matches the avg-pooling convention above."""
    if tuple(ddf.shape[-3:]) == tuple(size):
        return ddf
    out = F.interpolate(ddf, size=size, mode="trilinear", align_corners=False)
    return scale_channels(out, [s / t for s, t in zip(size, ddf.shape[-3:])])


def scale_channels(x, factors):
    """Channel c of x (B, C, ...) times the Python number factors[c]: no small tensor is built
    and copied to the device on every call (each such copy synchronises with a GPU)."""
    return torch.cat([x[:, c:c + 1] * f for c, f in enumerate(factors)], 1)


# ------------------------------ 9. metrics
TRE_DIRECTIONS = ("reference", "fixed")


def displace_points(ddf, pts, reference_sampling=False):
    """Map frame points (N, 3) through a ddf on any pooled grid of the frame: returns pts + u(pts)
    in 1 mm frame voxels. ddf: (1, 3, h, w, d). reference_sampling: sample u at the normalised
    coordinate p / (N/2) - 1, as the reference implementation does (half a 1 mm voxel below the
    voxel centre (2p + 1) / N - 1 used otherwise)."""
    size = torch.tensor(ddf.shape[-3:], dtype=torch.float64)
    frame = torch.tensor(FRAME, dtype=torch.float64)
    p = torch.as_tensor(pts, dtype=torch.float64)
    norm = (2 * p + (0 if reference_sampling else 1)) / frame - 1  # align_corners=False
    grid = norm.flip(-1).view(1, -1, 1, 1, 3).to(ddf)
    u = F.grid_sample(ddf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    u = u.view(3, -1).T.double().cpu() * frame / size
    return (p + u).numpy()


def tre(fields, fixed_pts, moving_pts, direction="reference"):
    """Per-landmark TRE (mm). fields = (ddf, ddf_inv) of a registration (ddf: fixed -> moving), or
    None for the initial TRE |fixed - moving|. direction "reference": the moving landmarks mapped
    by the moving -> fixed field ddf_inv with the reference's sampling, compared with the fixed
    ones (the convention of paper_tre_val.csv); "fixed": fixed landmarks mapped by ddf, compared
    with the moving ones (Lung250M-4B / Learn2Reg)."""
    if fields is None:
        return np.linalg.norm(fixed_pts - moving_pts, axis=1)
    if direction == "reference":
        return np.linalg.norm(displace_points(fields[1], moving_pts, reference_sampling=True) - fixed_pts, axis=1)
    if direction == "fixed":
        return np.linalg.norm(displace_points(fields[0], fixed_pts) - moving_pts, axis=1)
    raise ValueError(f"direction must be one of {TRE_DIRECTIONS}, got {direction!r}")


def dice(a, b, thr=0.5):
    a, b = a > thr, b > thr
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s > 0 else 1.0


def codebook_stats(ids, num_codes):
    """(number of codes used, perplexity = exp(entropy of the code histogram)) of token ids."""
    p = torch.bincount(ids.reshape(-1).cpu(), minlength=num_codes).double()
    p = p[p > 0] / p.sum()
    return int(len(p)), float(torch.exp(-(p * p.log()).sum()))


# ------------------------------ 10. realism (realism_report.py; the VQ-AE's and the token decoder's validation)
REALISM_STATS = ["vf_fixed", "vf_moving", "dice_fm", "disp_mm", "dice_reg", "nn_dice"]


def quick_registration(fixed, moving, factor, iters=40, spacing=4, reg=0.05, lr=0.2):
    """(mean |u| in mm over the fixed vessels, Dice after) of a smooth ddf u with moving(x + u) ~ fixed.
    fixed, moving (H, W, D) in [0, 1] at frame/factor. Registered at half that resolution (8 mm at
    factor 4: smoother images reach further) with u on a grid `spacing` times coarser still (32 mm).
    Cheap and identical for real and synthetic pairs."""
    f, m = (pool(v.float(), 2)[None, None] for v in (fixed, moving))
    size = f.shape[2:]
    ctrl = torch.zeros(1, 3, *[max(2, s // spacing) for s in size], requires_grad=True)
    opt = torch.optim.Adam([ctrl], lr=lr)
    for _ in range(iters):
        u = resize_ddf(ctrl, size)
        loss = F.mse_loss(warp(m, u), f) + reg * sum((ctrl.diff(dim=d) ** 2).mean() for d in (2, 3, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        u = resize_ddf(ctrl, fixed.shape)  # back to the input grid
        mag = u[0].norm(dim=0) * factor
        inside = fixed > 0.5
        warped = warp(moving[None, None].float(), u)[0, 0]
        return float(mag[inside].mean() if inside.any() else mag.mean()), dice(fixed, warped)


def nn_dice(vols, ref, exclude=None):
    """Highest Dice (at 0.5) of each volume (n, ...) against every reference volume (m, ...);
    exclude (n, m) bool marks pairs not to compare (a case against itself)."""
    a, b = (vols > 0.5).flatten(1).float(), (ref > 0.5).flatten(1).float()
    d = 2 * (a @ b.T) / (a.sum(1)[:, None] + b.sum(1)[None]).clamp(min=1)
    if exclude is not None:
        d[exclude] = -1
    return d.max(1).values.numpy()


def pair_stats(ids, x, factor=4, reference=None, progress=False):
    """Realism statistics (REALISM_STATS) per pair: case ids and x (N, 2, H, W, D) at frame/factor.
    reference: (ids, pairs (M, 2, ...)) of the training pairs, for the memorisation statistic."""
    s = {"case": list(ids), "vf_fixed": x[:, 0].mean((1, 2, 3)).numpy(), "vf_moving": x[:, 1].mean((1, 2, 3)).numpy(),
         "dice_fm": np.array([dice(p[0], p[1]) for p in x])}
    reg = [quick_registration(p[0], p[1], factor) for p in tqdm(x, desc="quick registration", disable=not progress)]
    s["disp_mm"], s["dice_reg"] = np.array(reg).reshape(-1, 2).T
    if reference is not None:  # a case is never compared with itself (the reference folder's own stats)
        rids, ref = reference
        same = torch.tensor([[i == r for r in rids for _ in (1, 2)] for i in ids])
        for k, name in enumerate(("nn_fixed", "nn_moving")):
            s[name] = nn_dice(x[:, k], ref.flatten(0, 1), same)
        s["nn_dice"] = np.concatenate([s["nn_fixed"], s["nn_moving"]])
    return s


def deformation_kept(real, recon, factor):
    """How much of the pairs' deformation a reconstruction keeps: real and recon (N, 2, H, W, D)
    at frame/factor (the same pairs) -> (mean quick-registration displacement of recon / of real,
    mean Dice(fixed, moving) of recon, of real). real may also be its pair_stats, computed once."""
    if torch.is_tensor(real):
        real = pair_stats(range(len(real)), real, factor)
    q = pair_stats(range(len(recon)), recon, factor)
    return float(q["disp_mm"].mean() / max(real["disp_mm"].mean(), 1e-9)), float(q["dice_fm"].mean()), float(
        real["dice_fm"].mean())


def realism_table(groups, baseline=None):
    """Markdown table of mean ± std per group; with `baseline`, whether each other group's mean
    lies within the baseline's mean ± std."""
    cols = [c for c in REALISM_STATS if all(c in g for g in groups.values())]
    lines = ["| group | pairs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, g in groups.items():
        lines.append(f"| {name} | {len(g['case'])} | " + " | ".join(f"{g[c].mean():.4g} ± {g[c].std():.2g}" for c in cols) + " |")
    if baseline:
        b = groups[baseline]
        for name, g in groups.items():
            if name != baseline:
                ok = [f"{c} {'yes' if abs(g[c].mean() - b[c].mean()) <= b[c].std() else 'NO'}" for c in cols]
                lines.append(f"{name} mean within {baseline} mean ± std: " + ", ".join(ok))
        if "disp_mm" in cols:  # the deformation each stage keeps, relative to the real pairs
            kept = [f"{n} {100 * g['disp_mm'].mean() / max(b['disp_mm'].mean(), 1e-9):.0f} %"
                    for n, g in groups.items() if n != baseline]
            lines.append(f"displacement kept (mean disp_mm / {baseline}'s): " + ", ".join(kept))
    return "\n".join(lines)


# ------------------------------ 11. output files
def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name next to `path`; rename onto `path` only if the block succeeds,
    so a crash never leaves a half-written output."""
    d, base = os.path.split(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    ext = "".join(re.findall(r"(\.nii\.gz|\.[A-Za-z0-9]+)$", base))
    stem = base[: len(base) - len(ext)]
    for old in glob.glob(os.path.join(glob.escape(d), f".tmp-*-{glob.escape(stem)}{ext}")):
        pid = os.path.basename(old).split("-")[1]
        if pid.isdigit() and not process_alive(int(pid)):
            os.remove(old)  # left by a killed run writing the same file
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{stem}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output(paths, overwrite=False, resumable=False):
    """Refuse, before any work, outputs that exist (unless overwrite) or cannot be written: a
    folder name, a parent that is a file, a folder without write permission. `paths`: one path or
    all the files a script writes (a checkpoint and its .csv / .png log)."""
    for path in [paths] if isinstance(paths, str) else paths:
        if path.endswith(os.sep) or os.path.isdir(path):
            raise DataError(f"{path}: is a folder; give a file name")
        if os.path.exists(path) and not overwrite:
            raise DataError(f"{path}: output exists (use --overwrite{' or --resume' if resumable else ''})")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):  # the nearest existing ancestor is what must be writable
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise DataError(f"{path}: cannot be written, {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DataError(f"{path}: cannot be written, no write permission in {parent}")


def log_paths(out):
    """A checkpoint or token file and the .csv / .png log written next to it."""
    base = os.path.splitext(out)[0]
    return [out, base + ".csv", base + ".png"]


def sha256(path):
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path):
    """A JSON file this project wrote (a manifest); a broken one is a one-line error."""
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError:
        raise DataError(f"{path}: not readable JSON (truncated or edited?)")
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a manifest of this project (expected a JSON object)")
    return d


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def write_csv(path, fields, rows):
    """rows: dicts keyed by the column names `fields` (missing keys: empty cells)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


def write_nifti(path, vol, factor):
    """A (H, W, D) volume on the frame grid pooled by `factor`, with its frame affine."""
    img = nib.Nifti1Image(np.asarray(vol, dtype=np.float32), frame_affine(factor))
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=os.path.splitext(path)[1][1:])
    plt.close(fig)


def mip_rgb(fixed, moving):
    """Coronal maximum-intensity projection overlay: fixed blue, moving orange, overlap white-ish."""
    f = np.asarray(fixed).max(axis=1).T[::-1]
    m = np.asarray(moving).max(axis=1).T[::-1]
    rgb = np.ones(f.shape + (3,))
    rgb -= f[..., None] * np.array([0.85, 0.45, 0.0])  # blue
    rgb -= m[..., None] * np.array([0.0, 0.4, 0.85])   # orange
    return np.clip(rgb, 0, 1)
