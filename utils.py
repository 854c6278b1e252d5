"""Everything the stage scripts share, written once. Sections:

   1. errors and entry point        5. frame                   9. metrics (TRE, Dice, codebook)
   2. device and precision          6. data: volumes, pairs,  10. realism statistics
   3. training runs                    landmarks, augmentation 11. output files (atomic writes,
   4. several processes (torchrun)  7. token files                 NIfTI, JSON, CSV, figures)
                                    8. warping

Conventions used everywhere:
  * volumes live in a frame (section 5: lung250m4b's 256x208x256 at 1 mm, or one derived from the
    data), or in that frame average-pooled by an integer `factor` (2 = half, 4 = quarter
    resolution). A pooled voxel v covers frame voxels f*v .. f*v+f-1, so its centre sits at
    f*v + (f-1)/2 in frame coordinates. The frame travels in every checkpoint, token file, manifest.
  * landmark coordinates inside the code are voxel indices (i, j, k) of the frame; TRE is in mm.
  * displacement fields (ddf) are (B, 3, H, W, D) in voxel units of their own grid, channel c along
    spatial axis c: the map is x -> x + ddf(x) (fixed -> moving), MONAI's `Warp` convention.
  * 2D data (H, W) follow the same code with one axis fewer: the frame's len(shape) is the number of
    spatial dims, tensors drop D, ddfs have 2 channels (spatial_dims, as MONAI passes it down).
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
            dist.barrier()  # nobody tears down while another process still writes (a gloo teardown then aborted under CI)
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
# A frame is the grid every pair is placed on (centred, zero-padded / cropped, then shifted by
# `shift` voxels): {"name", "shape" (voxels), "spacing" (mm per voxel), "shift"}. Every checkpoint,
# token file and manifest stores the frame it was made in; later stages read it from there.
# lung250m4b is the reference implementation's rule (Lung250M-4B's data README: pad to 352x256x352,
# crop 48/32/48 voxels before and 48/16/48 after), nominal 1 mm voxels.
LUNG250M4B = {"name": "lung250m4b", "shape": [256, 208, 256], "spacing": [1.0, 1.0, 1.0], "shift": [0, -8, 0]}
FRAME_NAMES = ("derived", "lung250m4b")
FRAME_MULTIPLE = 16  # derived frames: sides rounded up to this (the paper VQ-AE's stride: whole token grids)
FRAME_MIN = 64  # and at least this: the registration nets smooth their velocity with a 7-voxel kernel at frame/8
SPACING_TOL = 0.02  # relative: voxel sizes that differ by less are the same spacing


def derived_frame(shapes, spacings, source, names=None):
    """The frame of a data set: every scan's extent (largest per axis) rounded up to FRAME_MULTIPLE,
    centred, at the scans' common voxel spacing (they must share one: the nets work on voxels).
    2D scans (H, W) make a 2D frame; names (the scans' files) name the odd one out of mixed dims."""
    dims = [len(s) for s in shapes]
    if len(set(dims)) > 1:
        odd = min(sorted(set(dims)), key=dims.count)  # a tie names the 2D image
        i = dims.index(odd)
        raise DataError(f"{names[i] if names else source}: a {odd}D image among {5 - odd}D ones; "
                        "a data set is all 2D or all 3D")
    sp = np.asarray(spacings, dtype=np.float64)
    ref = np.median(sp, axis=0)
    bad = np.abs(sp / ref - 1).max(axis=1) > SPACING_TOL
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{names[i] if names else source}: voxel spacing {fmt_mm(sp[i])} differs from the other scans' {fmt_mm(ref)}; "
                        "resample the data to one spacing first")
    shape = [max(FRAME_MIN, int(-(-m // FRAME_MULTIPLE) * FRAME_MULTIPLE)) for m in np.max(np.asarray(shapes), axis=0)]
    return {"name": "derived", "shape": shape, "spacing": [round(float(v), 5) for v in ref], "shift": [0] * len(shape)}


def fmt_mm(spacing):
    return "x".join(f"{float(v):.2f}" for v in spacing) + " mm"


def fmt_shape(shape):
    return "x".join(str(int(v)) for v in shape)


def check_frame(frame, source):
    """A frame read from a file (checkpoint, token file, manifest, dataset JSON) -> the frame."""
    ok = isinstance(frame, dict) and frame.get("name") in FRAME_NAMES and all(
        isinstance(frame.get(k), (list, tuple)) and len(frame[k]) == len(frame.get("shape") or ()) in (2, 3)
        for k in ("shape", "spacing", "shift"))
    if not ok or min(frame["shape"]) < 1 or min(frame["spacing"]) <= 0:
        raise DataError(f"{source}: records no valid frame (name, shape, spacing, shift); a file made before "
                        "frames were stored must be made again")
    return {"name": frame["name"], "shape": [int(v) for v in frame["shape"]],
            "spacing": [float(v) for v in frame["spacing"]], "shift": [int(v) for v in frame["shift"]]}


def spatial_dims(frame):
    """2 or 3: the frame's spatial dimensions."""
    return len(frame["shape"])


def preset_factor(preset, frame):
    """A preset's frame pooling (a stage's PRESETS entry) for this frame: its "factor" in 3D, its
    "factor_2d" in 2D (default 1: a 160x192 slice pooled by the 3D presets' 4 would keep 40x48 pixels
    and a 5x6 token grid)."""
    return preset["factor"] if spatial_dims(frame) == 3 else preset.get("factor_2d", 1)


def model_kwargs(kwargs, frame, classes=None):
    """Model constructor kwargs for this frame and these classes: spatial_dims=2 added for a 2D frame,
    classes=K for K > 1 label classes; 3D binary kwargs stay as they are (the defaults, so their
    checkpoint configs do not change)."""
    more = {"spatial_dims": spatial_dims(frame)} if spatial_dims(frame) != 3 else {}
    if classes and len(classes) > 1:
        more["classes"] = len(classes)
    return {**kwargs, **more}


def frame_pads(shape, frame):
    """Pad widths (negative = crop) that put a volume of `shape` into `frame`: (h1, h2, w1, w2, d1, d2)
    ((h1, h2, w1, w2) in 2D).
    For lung250m4b exactly the Lung250M-4B data README's rule."""
    pads = []
    for s, n, t in zip(shape, frame["shape"], frame["shift"]):
        before = (n - s) // 2 + t
        pads += [before, n - s - before]
    return tuple(pads)


def to_frame(vol, frame):
    """(H, W, D) (2D: (H, W)) tensor of any size -> frame["shape"], zero-padded / cropped."""
    pads = frame_pads(vol.shape, frame)
    return F.pad(vol, [v for i in reversed(range(0, len(pads), 2)) for v in pads[i:i + 2]])


def grid_shape(factor, frame):
    return tuple(s // factor for s in frame["shape"])


def frame_factor(shape, frame):
    """The factor f if `shape` is the frame pooled by f (an already framed volume), else None."""
    for f in (1, 2, 4, 8):
        if tuple(shape) == grid_shape(f, frame):
            return f
    return None


AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
LINEAR = {2: "bilinear", 3: "trilinear"}  # F.interpolate's linear mode per spatial dims


def pool(x, factor, dims=3):
    """Average-pool a (..., H, W, D) tensor ((..., H, W) with dims=2) by an integer factor (soft
    occupancy for masks)."""
    if factor == 1:
        return x
    lead = x.shape[:-dims]
    y = AVG_POOL[dims](x.reshape(-1, 1, *x.shape[-dims:]).float(), factor)
    return y.reshape(*lead, *y.shape[-dims:])


def frame_affine(factor, frame):
    """Voxel -> world affine of a volume on the frame grid pooled by `factor`: world = frame
    coordinates in mm (pooled voxel v's centre at frame voxel f*v + (f-1)/2). Opens in Slicer/ITK-SNAP."""
    sp = np.asarray(frame["spacing"], dtype=np.float64)
    n = len(sp)
    a = np.diag(list(sp * factor) + [1.0] * (4 - n))  # 2D: a unit third axis, as NIfTI stores slices
    a[:n, 3] = sp * (factor - 1) / 2
    return a


def pad_to_multiple(x, m):
    """Zero-pad the spatial dims of x (B, C, *spatial) up to multiples of m (networks with stride m
    need it). Returns the padded tensor and the original spatial size to crop back to."""
    size = x.shape[2:]
    pads = []
    for s in reversed(size):
        pads += [0, (-s) % m]
    return F.pad(x, pads), tuple(size)


def crop_to(x, size):
    """The last len(size) dims of x cut to size."""
    return x[(...,) + tuple(slice(0, s) for s in size)]


# ------------------------------ 6. data: data sets, volumes, pairs, keypoints, augmentation
# DATA is (a) a folder of ID_1.nii.gz (fixed) / ID_2.nii.gz (moving) pairs, landmarks as frame CSVs
# in --landmarks (default DATA/landmarks/ID.csv), or (b) a Learn2Reg dataset JSON (or a folder holding
# exactly one *_dataset.json): pairs from training_paired_images (training) and registration_val
# (evaluation), keypoints from training[].keypoints (or keypointsTr/<image>.csv), CSVs of voxel
# coordinates (i, j, k) of each image, one row per point, fixed and moving rows matching.
class Pair(tuple):
    """(id, fixed, moving, fixed_kp, moving_kp): file paths; keypoint paths None when not given."""
    __slots__ = ()
    id, fixed, moving, fixed_kp, moving_kp = (property(lambda self, i=i: self[i]) for i in range(5))

    def __new__(cls, id, fixed, moving, fixed_kp=None, moving_kp=None):
        return super().__new__(cls, (id, fixed, moving, fixed_kp, moving_kp))


def dataset_json(data):
    """The Learn2Reg dataset JSON that `data` names (the file, or a folder's only *_dataset.json), or None."""
    if data.endswith(".json"):
        if not os.path.isfile(data):
            raise DataError(f"{data}: dataset JSON not found")
        return data
    found = sorted(glob.glob(os.path.join(glob.escape(data), "*_dataset.json"))) if os.path.isdir(data) else []
    if len(found) > 1:
        raise DataError(f"{data}: holds {len(found)} *_dataset.json files; name one")
    return found[0] if found else None


def image_stem(path):
    """imagesTr/NAME_0001_0000.nii.gz -> NAME_0001_0000."""
    return re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))


def case_stem(path):
    """An image's name without its pair suffix: NAME_0001_0000 -> NAME_0001 (Learn2Reg), case_032_1 -> case_032."""
    return re.sub(r"_(\d{4}|[12])$", "", image_stem(path))


def pair_id(fixed, moving):
    """A pair's id from its file names, whatever the prefix: NAME_0001_0000 + NAME_0001_0001 -> NAME_0001
    (Learn2Reg), case_032_1 + case_032_2 -> case_032 (this project's)."""
    f, m = (case_stem(p) for p in (fixed, moving))
    return f if f == m else f"{f}-{m}"


def read_dataset(path):
    """A Learn2Reg dataset JSON -> {"train": [Pair], "val": [Pair], "frame": a frame it records or None}.
    A pair's volumes are its images' segmentations where training[] gives one ("label", else "mask",
    as OASIS, NLST and ThoraxCBCT layouts do), else the images; ids and keypoints follow the images."""
    d = read_json(path)
    root = os.path.dirname(os.path.abspath(path))
    kps, segs, images = {}, {}, []
    for e in d.get("training", []) if isinstance(d.get("training"), list) else []:
        if not isinstance(e, dict) or not isinstance(e.get("image"), str):
            continue
        image = os.path.normpath(os.path.join(root, e["image"]))
        images.append(image)
        if isinstance(e.get("keypoints"), str):
            kps[image] = os.path.normpath(os.path.join(root, e["keypoints"]))
        seg = next((e[k] for k in ("label", "mask") if isinstance(e.get(k), str)), None)
        if seg:
            segs[image] = os.path.normpath(os.path.join(root, seg))
    seg_kind = next((k for k in ("label", "mask") if any(k in e for e in d.get("training") or [] if isinstance(e, dict))), None)

    # inter-subject (OASIS): "pairings" unpaired, or neither that nor training_paired_images given
    unpaired = d.get("pairings") == "unpaired" or ("pairings" not in d and "training_paired_images" not in d)

    def keypoints(img):
        default = os.path.join(root, "keypointsTr", image_stem(img) + ".csv")  # paired sets: Learn2Reg's layout
        return kps.get(img, default if os.path.exists(default) and not unpaired else None)

    def segmentation(img):
        """An image's segmentation: its training[] entry's, else (a data set of segmentations whose
        registration_val images are not in training[], as OASIS) the same name in labelsTr/ (masksTr/)."""
        if img in segs or not seg_kind:
            return segs.get(img, img)
        guess = os.path.join(os.path.dirname(os.path.dirname(img)), seg_kind + "sTr", os.path.basename(img))
        return guess if os.path.exists(guess) else img

    def pair(fixed, moving):
        fixed, moving = (os.path.normpath(os.path.join(root, p)) for p in (fixed, moving))
        for p in (fixed, moving, *(segs[q] for q in (fixed, moving) if q in segs)):
            if not os.path.exists(p):
                raise DataError(f"{path}: lists {os.path.relpath(p, root)}, which does not exist")
        return Pair(pair_id(fixed, moving), segmentation(fixed), segmentation(moving), keypoints(fixed), keypoints(moving))

    out = {}
    for split, key in (("train", "training_paired_images"), ("val", "registration_val")):
        entries = d.get(key) or []
        if any(not isinstance(e, dict) or not isinstance(e.get("fixed"), str) or not isinstance(e.get("moving"), str)
               for e in entries):
            raise DataError(f"{path}: {key} entries must be {{\"fixed\": path, \"moving\": path}}")
        out[split] = [pair(e["fixed"], e["moving"]) for e in entries]
    held = {p for q in out["val"] for p in (q.fixed, q.moving)}
    subjects = [i for i in dict.fromkeys(images) if segmentation(i) not in held]
    out["unpaired"] = unpaired
    out["inter_subject"] = unpaired and not out["train"] and len(subjects) >= 2
    if out["inter_subject"]:
        out["train"] = [pair(*p) for p in inter_subject_pairs(subjects)]
    if not out["train"] and not out["val"]:
        raise DataError(f"{path}: lists no pairs (training_paired_images and registration_val are empty"
                        + ("; an unpaired set needs 2 or more training[] images)" if unpaired else ")"))
    out["frame"] = check_frame(d["frame"], path) if "frame" in d else None
    size = d.get("tensorImageSize")
    out["dims"] = {"2D": 2, "3D": 3}.get(size.get("0")) if isinstance(size, dict) else None  # what the JSON declares
    return out


def inter_subject_pairs(images, seed=0):
    """Training pairs of an inter-subject data set (OASIS: training[] lists images, no
    training_paired_images): N images give N pairs, each image once fixed and once moving, the
    moving one of a random other subject (one seeded cycle through a random order, the same for every
    stage). The images of registration_val pairs are left out before."""
    order = [images[i] for i in np.random.default_rng(seed).permutation(len(images))]
    return [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]


def find_pairs(data, split="train"):
    """The pairs of DATA (see above) as [Pair]; with a dataset JSON, split "train" or "val" picks
    training_paired_images or registration_val. Fixed and moving of each pair must share a grid."""
    js = dataset_json(data)
    declared = None
    if js:
        listed = read_dataset(js)
        declared = listed["dims"]
        pairs = sorted(listed[split])  # by id, as a folder's: the order training draws from
        if not pairs:
            what = "registration_val pairs" if split == "val" else "training_paired_images pairs" if not listed["unpaired"] \
                else "training pairs (an unpaired set draws them from 2 or more training[] images)"
            raise DataError(f"{js}: lists no {what}")
    elif not os.path.isdir(data):
        raise DataError(f"{data}: data folder does not exist")
    else:
        files = sorted(glob.glob(os.path.join(glob.escape(data), "*_[12].nii.gz")))
        if not files:
            raise DataError(f"{data}: no ID_1.nii.gz / ID_2.nii.gz pairs and no *_dataset.json found")
        ids = sorted({re.sub(r"_[12]\.nii\.gz$", "", os.path.basename(f)) for f in files})
        pairs = [Pair(c, *(os.path.join(data, f"{c}_{k}.nii.gz") for k in (1, 2))) for c in ids]
        for p in pairs:
            for f in (p.fixed, p.moving):
                if not os.path.exists(f):
                    raise DataError(f"{f}: missing (its pair partner exists)")
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise DataError(f"{data}: pair id {next(i for i in ids if ids.count(i) > 1)} appears twice")
    flat = []  # 2D images in a JSON declaring 3D (a copied template): read as 2D, with one warning
    for p in pairs:
        a, b = header_geometry(p.fixed), header_geometry(p.moving)
        for f, g in ((p.fixed, a), (p.moving, b)):
            if g and declared == 2 and len(g[0]) == 3:
                raise DataError(f"{f}: a 3D image of shape {fmt_shape(nib.load(f).shape)}, but {js} declares "
                                "tensorImageSize 2D")
            if g and declared == 3 and len(g[0]) == 2:
                flat.append(f)
        if a and b and len(a[0]) != len(b[0]):
            raise DataError(f"{p.moving}: a {len(b[0])}D image paired with the {len(a[0])}D {p.fixed}; a data set is all "
                            "2D or all 3D")
        if a and b and (a[0] != b[0] or not np.allclose(a[1], b[1], rtol=SPACING_TOL)):
            raise DataError(f"{p.moving}: grid {fmt_shape(b[0])} at {fmt_mm(b[1])} differs from its fixed image's "
                            f"{fmt_shape(a[0])} at {fmt_mm(a[1])}; fixed and moving must share a grid")
    if flat:
        warnings.warn(f"{js}: declares tensorImageSize 3D, but {flat[0]} and {len(flat) - 1} more are 2D images; read as 2D")
    return pairs


def pair_ids(data, split="train"):
    return [p.id for p in find_pairs(data, split)]


def recorded_frame(data):
    """The frame a dataset JSON records (pairs this project wrote on a pooled frame grid), or None."""
    js = dataset_json(data)
    return read_dataset(js)["frame"] if js else None


def val_split(data):
    """The pairs of DATA given as validation data: a dataset JSON's registration_val, a folder's all."""
    return "val" if dataset_json(data) else "train"


def data_frame(data, name=None):
    """The frame to place DATA's pairs in: the one its dataset JSON records (pairs written by this
    project), else `name`: lung250m4b, or derived from the training pairs' headers (default: derived
    for a dataset JSON or 2D images, lung250m4b for a folder of ID_1 / ID_2 pairs, the reference's layout)."""
    js = dataset_json(data)
    recorded = recorded_frame(data)
    if recorded:
        return recorded
    pairs = find_pairs(data, "train" if not js or read_dataset(js)["train"] else "val")
    flat = len((header_geometry(pairs[0].fixed) or [()])[0]) == 2
    if flat and name == "lung250m4b":
        raise DataError(f"{pairs[0].fixed}: a 2D image; the lung250m4b frame is 3D (use --frame derived)")
    if (name or ("derived" if js or flat else "lung250m4b")) == "lung250m4b":
        return dict(LUNG250M4B)
    geo = [header_geometry(p.fixed) for p in pairs]
    if None in geo:
        load_volume(pairs[[g is None for g in geo].index(True)].fixed)  # says what is wrong with it
    return derived_frame([g[0] for g in geo], [g[1] for g in geo], data, [p.fixed for p in pairs])


def data_options(ap):
    """--frame, --labels and --classes, for the scripts that read pairs."""
    ap.add_argument("--frame", choices=FRAME_NAMES, help="the grid pairs are placed on: derived from the "
                    "training pairs (default for a dataset JSON or 2D images) or lung250m4b (the reference's; default "
                    "for a folder of 3D pairs)")
    ap.add_argument("--labels", type=label_list, help="label values that form the mask, e.g. 1,3 (default: all > 0)")
    ap.add_argument("--classes", type=label_list, help="label values kept apart, one class each, e.g. 1,2,3,4 "
                    "(default: one mask); trained checkpoints record them")


def check_label_options(labels, classes):
    if labels and classes:
        raise DataError("--labels merges labels into one mask, --classes keeps them apart: give one")
    if classes and (len(set(classes)) < len(classes) or max(classes) > 255):
        raise DataError(f"--classes {','.join(map(str, classes))}: distinct label values up to 255 (label maps are "
                        "written as uint8)")


def image_dtype(path):
    """The stored data type of a NIfTI (from its header)."""
    return nib.load(path).get_data_dtype()


def label_list(text):
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected label values like 1,3, got {text!r}")
    if not labels or min(labels) < 1:
        raise argparse.ArgumentTypeError(f"label values must be >= 1, got {text!r}")
    return labels


def image_dims(shape):
    """Spatial dims of a NIfTI array shape: (H, W) and (H, W, 1) are 2D, (H, W, D) 3D (trailing
    singleton dims ignored); None for anything else."""
    shape = tuple(int(v) for v in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 3 and shape[2] == 1:
        return 2
    return len(shape) if len(shape) in (2, 3) else None


def header_geometry(path):
    """(spatial shape, voxel spacing) from a NIfTI header, 2 or 3 axes (image_dims); None when
    unreadable (load_volume reports that)."""
    try:
        img = nib.load(path)
        n = image_dims(img.shape)
        return (tuple(int(v) for v in img.shape[:n]), tuple(float(v) for v in img.header.get_zooms()[:n])) if n else None
    except Exception:
        return None


def image_shape(path):
    geo = header_geometry(path)
    return geo[0] if geo else load_volume(path).shape  # an unreadable header: load_volume says what is wrong


_SEVERAL_LABELS = set()  # files already reported as label maps
SOFT_TOL = 1e-3  # soft maps may exceed 1 by rounding
MAX_LABELS = 255  # an integer volume with more distinct values is an image (CT in HU, MRI), not labels
INTENSITY_HINT = ('the nets register segmentations: give each dataset JSON training[] entry its "label" '
                  '(or "mask") beside its "image"')


def load_volume(path, labels=None, classes=None, empty_ok=False):
    """Read one NIfTI as float32 numpy, checking the problems that silently ruin a run. labels: keep
    only these label values as the mask (1, else 0); a label map read without it is reported once.
    classes: a label map's values -> class indices (0 background, k for classes[k - 1]); empty_ok: a map
    holding none of them is kept (generated label maps), not refused."""
    try:
        img = nib.load(path)
        a = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many kinds for a broken file
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__})")
    n = image_dims(a.shape)
    if n is None:
        raise DataError(f"{path}: expected a 3D volume or a 2D image, got shape {a.shape}")
    a = a.reshape(a.shape[:n])  # 2D: (H, W, 1) -> (H, W)
    if not np.isfinite(a).all():
        raise DataError(f"{path}: contains NaN or inf voxels")
    sample = a[(slice(None, None, 4),) * a.ndim]  # cheap on every volume
    if classes:
        if not np.array_equal(a, np.round(a)) or len(np.unique(sample)) > MAX_LABELS:
            raise DataError(f"{path}: holds non-integer or more than {MAX_LABELS} distinct values, not a label map "
                            "(--classes needs label maps)")
        index = np.zeros(a.shape, np.float32)
        for k, v in enumerate(classes):
            index[a == v] = k + 1
        a = index
        if not a.any() and empty_ok:
            warnings.warn(f"{path}: holds none of the labels {', '.join(map(str, classes))} (a generated map)")
            return a
        if not a.any():
            raise DataError(f"{path}: holds none of the labels {', '.join(map(str, classes))} of --classes")
    elif labels:
        a = np.isin(a, labels).astype(np.float32)
        if not a.any():
            raise DataError(f"{path}: holds none of the labels {', '.join(map(str, labels))}")
    elif a.max() > 1 + SOFT_TOL and not np.array_equal(a, np.round(a)):
        raise DataError(f"{path}: holds intensities (values above 1 that are not labels), not a mask or label map; "
                        f"{INTENSITY_HINT}")
    elif a.max() > 1 and len(np.unique(sample)) > MAX_LABELS:
        raise DataError(f"{path}: holds more than {MAX_LABELS} distinct values, an intensity image rather than a label "
                        f"map; {INTENSITY_HINT}")
    elif a.max() > 1 and not _SEVERAL_LABELS:
        values = np.unique(a[a > 0])
        if len(values) > 1:
            _SEVERAL_LABELS.add(path)
            print(f"note: {path} is a label map with {len(values)} labels; the mask is all labels > 0 "
                  "(--labels picks some)", file=sys.stderr)
    if not (a > 0).any():
        raise DataError(f"{path}: the mask is all zero")
    return a


# The reference implementation cuts one oversize training scan (Lung250M-4B case_035, 451 slices)
# to its first 280 slices before framing: the frame alone would keep ~71 % of its vessels, the cut
# ~93 %. Written as a rule on the depth (no scan in Lung250M-4B lies between 354 and 450 slices);
# part of the lung250m4b frame only.
DEEP_SCAN, DEPTH_CUT = 400, 280


FRAME_LOSS_WARN = 0.1  # framing always crops a few % of some scans' vessels; warn when it crops more
SCAN_AXES = ("LR", "PA", "SI")  # Lung250M-4B: voxel axes along x, y, z (LPS or RAS), ~1 mm voxels


def check_geometry(path, frame):
    """An original scan must have the frame's voxel spacing (it is used as stored: keypoints are
    voxel indices). In the lung250m4b frame, axes permuted against Lung250M-4B's are reported."""
    img = nib.load(path)
    dims = spatial_dims(frame)
    if image_dims(img.shape) != dims:
        raise DataError(f"{path}: a {image_dims(img.shape)}D image, but the {frame['name']} frame is {dims}D; "
                        "a data set is all 2D or all 3D")
    zooms = img.header.get_zooms()[:dims]
    tol = 0.1 if frame["name"] == "lung250m4b" else SPACING_TOL  # Lung250M-4B's nominal 1 mm
    if not np.allclose(zooms, frame["spacing"], rtol=tol):
        hint = "; use --frame derived for data at another spacing" if frame["name"] == "lung250m4b" else ""
        raise DataError(f"{path}: voxels {fmt_mm(zooms)}, but the {frame['name']} frame has {fmt_mm(frame['spacing'])}{hint}")
    axes = nib.aff2axcodes(img.affine)
    if frame["name"] == "lung250m4b" and any(a not in allowed for a, allowed in zip(axes, SCAN_AXES)):
        warnings.warn(f"{path}: orientation {''.join(axes)}; expected axes along x, y, z - used as stored "
                      "(landmarks are voxel indices)")


def native_factor(path, frame):
    """Finest pooled-frame factor a file offers (1 for original scans); read from the header only."""
    return frame_factor(nib.load(path).shape[:spatial_dims(frame)], frame) or 1


def framed_volume(path, factor, frame, cut_deep=False, labels=None, classes=None, empty_ok=False):
    """A volume at frame/`factor` resolution, values in [0, 1] (float32 tensor).
    Original-size scans are binarised (> 0, or the chosen labels) and framed first; volumes that
    already have a pooled-frame shape (synthetic pairs, phantoms) are taken as soft maps in [0, 1].
    cut_deep: in the lung250m4b frame, a scan deeper than DEEP_SCAN slices is cut to its first
    DEPTH_CUT first (training data only: landmarks are given in the uncut frame).
    classes: K label values -> (K, *spatial), each class's occupancy (label maps, framed or not); empty_ok:
    see load_volume."""
    a = load_volume(path, labels, classes, empty_ok)
    if a.min() < 0:
        raise DataError(f"{path}: negative voxel values (expected a mask or probabilities); {INTENSITY_HINT}")
    f0 = frame_factor(a.shape, frame)
    if f0 in (None, 1):  # a scan may have the frame's own shape: its spacing must match too
        check_geometry(path, frame)
    if f0 is None:  # an original scan: binarise, frame, then pool
        vessels = int((a > 0).sum())
        if cut_deep and frame["name"] == "lung250m4b" and a.shape[2] > DEEP_SCAN:
            a = a[:, :, :DEPTH_CUT]
        v, f0 = to_frame(torch.from_numpy(a if classes else (a > 0).astype(np.float32)), frame), 1
        kept = float((v > 0).sum() if classes else v.sum()) / vessels
        if kept < 1 - FRAME_LOSS_WARN:
            warnings.warn(f"{path}: {fmt_shape(a.shape)} exceeds the {fmt_shape(frame['shape'])} frame, which keeps "
                          f"{100 * kept:.0f} % of its mask voxels (crops {100 - 100 * kept:.0f} %)")
    else:  # already framed: probabilities stay soft, label maps are binarised
        v = torch.from_numpy(a if a.max() <= 1 or classes else (a > 0).astype(np.float32))
    if classes:  # class indices -> one channel per class
        v = F.one_hot(v.long(), len(classes) + 1).movedim(-1, 0)[1:].float()
    if factor % f0:
        raise DataError(f"{path}: volume is at frame/{f0} but frame/{factor} is needed")
    if not (v > 0).any() and not empty_ok:
        raise DataError(f"{path}: the mask is empty inside the {fmt_shape(frame['shape'])} frame")
    return pool(v, factor // f0, spatial_dims(frame))


def load_pairs(data, factor, frame, pairs=None, progress=True, labels=None, classes=None, compact=False):
    """All pairs of DATA's training split (or the given [Pair]) as one (N, 2, H, W, D) tensor at
    frame/`factor`; channel 0 fixed. Oversize scans are cut as the reference does (framed_volume).
    classes (K label values): (N, 2K, ...), channels 0..K-1 the fixed map's classes, K..2K-1 the moving's;
    with `compact`, hard label maps (unpooled: 2D, or 1 mm) come as LabelPairs, one-hot when read."""
    pairs = pairs or find_pairs(data)
    vols = []
    name = os.path.basename(data.rstrip("/"))
    generated = bool(classes) and bool(recorded_frame(data))  # a generator's label map may be all background
    present = torch.zeros(len(classes or []), dtype=torch.bool)
    hard = compact and bool(classes) and len(classes) > 1
    for p in tqdm(pairs, desc=f"load {name}", disable=not progress, leave=False):
        maps = [framed_volume(f, factor, frame, cut_deep=True, labels=labels, classes=classes, empty_ok=generated)
                for f in (p.fixed, p.moving)]
        x = torch.cat(maps) if classes else torch.stack(maps)
        if classes:
            present |= x.unflatten(0, (2, len(classes))).flatten(2).any(2).any(0)
        if hard and not bool(((x == 0) | (x == 1)).all()):  # soft occupancies (pooled): kept as they are
            hard = False
            vols = [LabelPairs.one_hot(v, len(classes)) for v in vols]
        vols.append(LabelPairs.index_of(x, len(classes)) if hard else x)
    for k, v in enumerate(classes or []):
        if not present[k]:
            msg = f"{data}: no map holds label {v} of --classes {','.join(map(str, classes))}"
            if not recorded_frame(data):  # the user's data: a label it lacks is a typo
                raise DataError(msg)
            warnings.warn(msg + " (pairs this project wrote: a generator may miss a class)")
    x = torch.stack(vols)
    return [p.id for p in pairs], LabelPairs(x, len(classes)) if hard else x


class LabelPairs:
    """Pairs of K-label maps held as uint8 label indices (N, 2, ...) (0 background, k the k-th class)
    and one-hot when read: indexing gives the (n, 2K, ...) float16 occupancies load_pairs would hold
    otherwise, bit for bit, at 1/(2K) of their memory. What the training stages index per batch."""

    def __init__(self, index, k):
        self.index, self.k = index, k

    @staticmethod
    def index_of(x, k):
        """(2K, ...) hard occupancies -> (2, ...) uint8 label indices."""
        values = torch.arange(1, k + 1, dtype=x.dtype).view(1, k, *[1] * (x.ndim - 1))
        return (x.unflatten(0, (2, k)) * values).sum(1).to(torch.uint8)

    @staticmethod
    def one_hot(index, k, dims=None):
        """(..., 2, *spatial) label indices (`dims` spatial axes, default all but the first) -> (...,
        2K, *spatial) float16 occupancies."""
        axis = index.ndim - (dims or index.ndim - 1) - 1  # the maps' axis
        values = torch.arange(1, k + 1, dtype=index.dtype, device=index.device).view(k, *[1] * (index.ndim - axis - 1))
        return (index.unsqueeze(axis + 1) == values).flatten(axis, axis + 1).half()  # no wide intermediate

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.one_hot(self.index[i], self.k, self.index.ndim - 2)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    @property
    def shape(self):
        return torch.Size((len(self), 2 * self.k, *self.index.shape[2:]))

    @property
    def device(self):
        return self.index.device

    @property
    def nbytes(self):
        return self.index.nbytes

    def to(self, *args, **kwargs):
        return LabelPairs(self.index.to(*args, **kwargs), self.k)

    def pin_memory(self):
        return LabelPairs(self.index.pin_memory(), self.k)

    def half(self):
        return self

    def foreground(self):
        """(N, 2, ...) each map's foreground, as utils.foreground of the occupancies."""
        return (self.index > 0).half()


def label_map(p, classes):
    """(K, ...) class occupancies or probabilities -> uint8 numpy map of the most likely label value
    (0: background, the rest 1 - their sum): how generated K-label pairs are written."""
    values = torch.tensor([0, *classes], dtype=torch.uint8)
    return values[torch.cat([1 - p.sum(0, keepdim=True), p]).argmax(0).cpu()].numpy()


def foreground(x, classes=None):
    """Pairs (N, 2K, ...) of K classes -> (N, 2, ...), each map's foreground (its classes summed), what the
    realism statistics and the random fields' weights measure; K = 1 (classes None or one): x itself."""
    if isinstance(x, LabelPairs):
        return x.foreground()
    if not classes or len(classes) == 1:
        return x
    return x.unflatten(1, (2, len(classes))).sum(2)


def read_points(path, n_cols):
    """A CSV of N rows of n_cols finite numbers (a header line may be left out) -> (N, n_cols) array."""
    if not os.path.exists(path):
        raise DataError(f"{path}: landmark file missing")
    with open(path) as f:
        first = f.readline()
    try:  # a header line is optional: skip the first line only when it is not numbers
        [float(v) for v in first.split(",")]
        header = 0
    except ValueError:
        header = 1
    try:
        a = np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a keypoint CSV ({e})")
    if a.shape[1] != n_cols or len(a) == 0 or not np.isfinite(a).all():
        raise DataError(f"{path}: expected N rows of {n_cols} finite coordinates")
    return a


def outside_frame(pts, frame):
    """(N,) bool: points (N, dims) outside the frame."""
    return ((pts < 0) | (pts > np.array(frame["shape"]) - 1)).any(axis=1)


def check_in_frame(path, pts, frame):
    out = int(outside_frame(pts, frame).sum())
    if out:
        raise DataError(f"{path}: {out} of {len(pts)} points lie outside the {fmt_shape(frame['shape'])} frame")


def read_landmarks(path, frame):
    """Landmark CSV (fixed_i,fixed_j,fixed_k,moving_i,moving_j,moving_k; frame voxel indices; the
    header line may be left out; 2D: four columns) -> (fixed, moving) float arrays of shape (N, dims)."""
    n = spatial_dims(frame)
    a = read_points(path, 2 * n)
    check_in_frame(path, a.reshape(-1, n), frame)
    return a[:, :n], a[:, n:]


def pair_landmarks(pair, frame, landmarks=None):
    """A pair's (fixed, moving) points (N, 3) in frame voxels: its Learn2Reg keypoints (voxels of
    each image, moved by the image's frame offsets), else landmarks/ID.csv (frame voxels)."""
    if pair.fixed_kp and pair.moving_kp:
        pts = []
        dims = spatial_dims(frame)
        for img, kp in ((pair.fixed, pair.fixed_kp), (pair.moving, pair.moving_kp)):
            shape = image_shape(img)
            a = read_points(kp, dims)
            f0 = frame_factor(shape, frame)
            a = a * f0 + (f0 - 1) / 2 if f0 else a + np.array(frame_pads(shape, frame)[::2])
            pts.append(a)
        if len(pts[0]) != len(pts[1]):
            raise DataError(f"{pair.moving_kp}: {len(pts[1])} keypoints, but {pair.fixed_kp} has {len(pts[0])}")
        out = outside_frame(pts[0], frame) | outside_frame(pts[1], frame)
        if out.all():
            raise DataError(f"{pair.fixed_kp}: every keypoint lies outside the {fmt_shape(frame['shape'])} frame")
        if out.any():  # a cropped scan: its keypoints there have no image to register
            warnings.warn(f"{pair.fixed_kp}: {int(out.sum())} of {len(out)} keypoints lie outside the "
                          f"{fmt_shape(frame['shape'])} frame and are left out")
        return pts[0][~out], pts[1][~out]
    if landmarks is None:
        raise DataError(f"{pair.fixed}: no keypoints listed for pair {pair.id} and no --landmarks folder")
    if frame["name"] != "lung250m4b" and tuple(image_shape(pair.fixed)) != tuple(frame["shape"]):
        raise DataError(f"{landmarks}: landmark CSVs are frame voxels, but {pair.fixed} is not on the "
                        f"{fmt_shape(frame['shape'])} frame's grid; give keypoints in each image's voxels through a "
                        "Learn2Reg dataset JSON")
    return read_landmarks(os.path.join(landmarks, f"{pair.id}.csv"), frame)


def evaluation_landmarks(pairs, frame, landmarks=None):
    """{pair id: (fixed, moving) points} of evaluation pairs, or None where no pair lists keypoints and no
    landmark folder is given (an inter-subject data set such as OASIS): those are scored by Dice alone."""
    if landmarks is None and not any(p.fixed_kp and p.moving_kp for p in pairs):
        return None
    return {p.id: pair_landmarks(p, frame, landmarks) for p in pairs}


def default_landmarks(data):
    """A folder's landmark CSVs (DATA/landmarks, required: this project's layout); a dataset JSON lists
    keypoints (or none)."""
    return None if dataset_json(data) else os.path.join(data, "landmarks")


def write_keypoints(path, pts):
    """A Learn2Reg keypoint CSV: one i,j,k (2D: i,j; voxels of its image) per row, no header."""
    with atomic_path(path) as tmp:
        np.savetxt(tmp, pts, delimiter=",", fmt="%.4f")


def write_landmarks(path, fixed, moving):
    axes = "ijk"[:fixed.shape[1]]
    with atomic_path(path) as tmp:
        np.savetxt(tmp, np.hstack([fixed, moving]), delimiter=",", fmt="%.4f", comments="",
                   header=",".join(f"{side}_{a}" for side in ("fixed", "moving") for a in axes))


AUG_STD = 0.05  # the reference's affine augmentation: identity 3x4 + N(0, 0.05)


def batch_randn(x, shape, generator=None, share=(0, 1)):
    """N(0, 1) draws (len(x), *shape) on x's device for this process's part of a global batch:
    share (rank, processes); the generator draws for the whole global batch, so every process
    count (and a resumed run) sees the same numbers per pair."""
    rank, procs = share
    return torch.randn((len(x) * procs, *shape), generator=generator, device=x.device)[rank * len(x):(rank + 1) * len(x)]


def augment(x, std=AUG_STD, generator=None, share=(0, 1)):
    """One random affine per pair of x (B, 2, H, W, D) (identity 3x4 + N(0, std); 2D: (B, 2, H, W),
    2x3), the same for fixed and moving, nearest-neighbour resampling (the reference's choice: keeps
    masks binary). Drawn on x's device (`generator` must live there): a GPU step needs no
    host-to-device copy. share (rank, processes): x is that part of a global batch; the draws are
    the global batch's."""
    n = x.ndim - 2
    theta = torch.eye(n, n + 1, device=x.device).repeat(len(x), 1, 1) + std * batch_randn(x, (n, n + 1), generator, share)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(fp32(x), grid, mode="nearest", padding_mode="zeros", align_corners=False)


# ------------------------------ 7. token files
# The reference implementation's token file (paper_tokens_97.pth): a plain list of 16x13x16 id
# tensors of its 1 mm VQ-AE with 1024 codes, one per Lung250M-4B training case in sorted order:
# cases 000-103 without the data set's test cases below (entry 30 = case_032, 33 = case_035, which
# the reference cut to 280 slices before encoding, as load_pairs does).
REFERENCE_TOKENS = dict(grid_shape=(16, 13, 16), num_codes=1024, factor=1, frame=LUNG250M4B)
LUNG250M_TEST_CASES = (2, 8, 54, 55, 56, 94, 97)
REFERENCE_CASES = [f"case_{i:03d}" for i in range(104) if i not in LUNG250M_TEST_CASES]


def write_tokens(path, tokens, case_ids, num_codes, config, **extra):
    """The token file of infer_vqae.py: tokens (N, h, w, d) -> {case_ids, tokens (N, h*w*d) int16
    (row-major over grid_shape), grid_shape, num_codes, factor, frame, config (the VQ-AE's), **extra}."""
    d = {"case_ids": list(case_ids), "tokens": tokens.flatten(1).to(torch.int16),
         "grid_shape": tuple(tokens.shape[1:]), "num_codes": num_codes, "factor": config["factor"],
         "frame": config["frame"], "config": config, **extra}
    with atomic_path(path) as tmp:
        torch.save(d, tmp)
    return d


def read_tokens(path):
    """A token file (write_tokens' or the reference's list) -> dict(tokens (N, L) long, grid_shape,
    num_codes, factor, frame (lung250m4b for the reference's list), case_ids, config: the VQ-AE's,
    None for the reference's list)."""
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
    frame = check_frame(d.get("frame") or (d.get("config") or {}).get("frame"), path)
    return {"tokens": tokens, "grid_shape": grid, "num_codes": codes, "factor": int(factor), "frame": frame,
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
    """img (B, C, H, W, D) (or (B, C, H, W) with a 2-channel ddf) sampled at x + ddf(x): bilinear with border padding (fields), or nearest
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
    if tuple(ddf.shape[2:]) == tuple(size):
        return ddf
    out = F.interpolate(ddf, size=size, mode=LINEAR[len(size)], align_corners=False)
    return scale_channels(out, [s / t for s, t in zip(size, ddf.shape[2:])])


def box_filter(v, kernel, stride=1):
    """kernel^3 average pooling of v (B, C, H, W, D) (zero padding counted, as avg_pool3d's default),
    computed as three exact 1D box filters: kernel instead of kernel^3 taps (2D: (B, C, H, W), two).
    The registration nets' velocity smoothing."""
    n = v.ndim - 2
    for ax in range(n):
        size = tuple(kernel if i == ax else 1 for i in range(n))
        step = tuple(stride if i == ax else 1 for i in range(n))
        pad = tuple(kernel // 2 if i == ax else 0 for i in range(n))
        v = AVG_POOL[n](v, size, stride=step, padding=pad)
    return v


# Random smooth fields (the free baselines: deform_pairs.py, train_registration.py --augment).
# Their spatial scale is fixed here: velocity noise on the frame pooled by FIELD_FACTOR (the
# registration nets' velocity grid, 8 mm on Lung250M-4B), smoothed by the nets' FIELD_PASSES stride-1
# box filters of FIELD_KERNEL voxels at that grid, integrated by scaling and squaring as the nets'
# fields are. Their strength is the caller's, measured on the real pairs in use.
FIELD_FACTOR, FIELD_KERNEL, FIELD_PASSES, FIELD_SQUARINGS = 8, 7, 2, 12
# small random affine (identity + N(0, std) in normalised coordinates): half the reference's
# augmentation (AUG_STD), so a deformed pair's own motion changes by a few % only
AFFINE_STD = AUG_STD / 2


def field_weight(x, frame):
    """A map x (H, W, D) on any pooled frame grid whose factor divides FIELD_FACTOR, pooled onto the
    random fields' grid: where a field's strength is measured."""
    f = frame_factor(x.shape, frame)
    if f is None or FIELD_FACTOR % f:
        raise ValueError(f"a map of shape {tuple(x.shape)} is not on a frame grid pooled by a divisor of {FIELD_FACTOR}")
    return pool(x.float(), FIELD_FACTOR // f, spatial_dims(frame))


def random_field(frame, magnitude, weight, generator=None, affine_std=0.0):
    """A random smooth diffeomorphic ddf (1, 3, h, w, d) (2D: (1, 2, h, w)) on the frame pooled by FIELD_FACTOR, in
    voxels of that grid (resize_ddf puts it on any other grid of the frame): the exponential of
    smoothed velocity noise, scaled so that its mean length in mm weighted by `weight` (h, w, d;
    field_weight) is `magnitude`; affine_std > 0: a random affine applied before it (not counted in
    the magnitude). Draws on the CPU from `generator`."""
    grid = grid_shape(FIELD_FACTOR, frame)
    cell_mm = [FIELD_FACTOR * s for s in frame["spacing"]]
    w = weight.float() / weight.float().sum().clamp(min=1e-12)
    n = len(grid)
    v = torch.randn((1, n, *grid), generator=generator)
    for _ in range(FIELD_PASSES):
        v = box_filter(v, FIELD_KERNEL)

    def mean_mm(u):
        return float((scale_channels(u, cell_mm)[0].norm(dim=0) * w).sum())

    scale = magnitude / max(mean_mm(v), 1e-12)
    for _ in range(2):  # the exponential is nearly linear at these sizes: two corrections reach the target
        scale *= magnitude / max(mean_mm(exp_velocity(v * scale, FIELD_SQUARINGS)), 1e-12)
    u = exp_velocity(v * scale, FIELD_SQUARINGS)
    theta = torch.eye(n, n + 1) + affine_std * torch.randn((n, n + 1), generator=generator)  # drawn always: one stream
    if affine_std > 0:  # x -> A x first, then the field: ddf = a + u(x + a)
        axes = [(torch.arange(k, dtype=torch.float32) * 2 + 1) / k - 1 for k in grid]  # voxel centres
        q = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (n, h, w, d), normalised
        moved = torch.einsum("ij,j...->i...", theta[:, :n], q) + theta[:, n].view(n, *[1] * n)
        a = scale_channels((moved - q)[None], [k / 2 for k in grid])
        u = compose(u, a)
    return u


def scale_channels(x, factors):
    """Channel c of x (B, C, ...) times the Python number factors[c]: no small tensor is built
    and copied to the device on every call (each such copy synchronises with a GPU)."""
    return torch.cat([x[:, c:c + 1] * f for c, f in enumerate(factors)], 1)


# ------------------------------ 9. metrics
TRE_DIRECTIONS = ("reference", "fixed")


def displace_points(ddf, pts, frame_shape, reference_sampling=False):
    """Map frame points (N, 3) through a ddf on any pooled grid of the frame: returns pts + u(pts)
    in frame voxels. ddf: (1, 3, h, w, d) (2D: points (N, 2), ddf (1, 2, h, w)). reference_sampling: sample u at the normalised
    coordinate p / (N/2) - 1, as the reference implementation does (half a frame voxel below the
    voxel centre (2p + 1) / N - 1 used otherwise)."""
    n = ddf.shape[1]
    size = torch.tensor(ddf.shape[2:], dtype=torch.float64)
    frame = torch.tensor(frame_shape, dtype=torch.float64)
    p = torch.as_tensor(pts, dtype=torch.float64)
    norm = (2 * p + (0 if reference_sampling else 1)) / frame - 1  # align_corners=False
    grid = norm.flip(-1).view(1, -1, *[1] * (n - 1), n).to(ddf)
    u = F.grid_sample(ddf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    u = u.view(n, -1).T.double().cpu() * frame / size
    return (p + u).numpy()


def tre(fields, fixed_pts, moving_pts, frame, direction="reference"):
    """Per-landmark TRE in mm (frame voxels times the frame's spacing). fields = (ddf, ddf_inv) of a
    registration (ddf: fixed -> moving), or None for the initial TRE |fixed - moving|. direction
    "reference": the moving landmarks mapped by the moving -> fixed field ddf_inv with the
    reference's sampling, compared with the fixed ones (the convention of paper_tre_val.csv);
    "fixed": fixed landmarks mapped by ddf, compared with the moving ones (Lung250M-4B / Learn2Reg)."""
    sp = np.asarray(frame["spacing"], dtype=np.float64)
    if fields is None:
        return np.linalg.norm((fixed_pts - moving_pts) * sp, axis=1)
    if direction == "reference":
        mapped = displace_points(fields[1], moving_pts, frame["shape"], reference_sampling=True)
        return np.linalg.norm((mapped - fixed_pts) * sp, axis=1)
    if direction == "fixed":
        return np.linalg.norm((displace_points(fields[0], fixed_pts, frame["shape"]) - moving_pts) * sp, axis=1)
    raise ValueError(f"direction must be one of {TRE_DIRECTIONS}, got {direction!r}")


def displacement_on_image(ddf, frame, shape):
    """Learn2Reg displacement field of a registration on the fixed image's own grid: ddf (1, 3, h, w, d)
    fixed -> moving on a pooled frame grid -> (H, W, D, 3) float32 in voxels of the image (shape),
    fixed point x maps to x + disp(x) in the moving image. Outside the frame the border value."""
    if frame_factor(shape, frame):  # an image on the pooled frame grid (synthetic pairs, phantoms)
        return resize_ddf(ddf.float().cpu(), tuple(shape))[0].movedim(0, -1).numpy().astype(np.float32)
    full = resize_ddf(ddf.float().cpu(), tuple(frame["shape"]))[0]  # (3, *frame), frame voxels
    pads = frame_pads(shape, frame)
    full = full[(slice(None),) + tuple(slice(max(b, 0), n - max(e, 0))
                                       for b, e, n in zip(pads[::2], pads[1::2], frame["shape"]))]
    grow = [max(-v, 0) for i in reversed(range(0, len(pads), 2)) for v in pads[i:i + 2]]
    if any(grow):
        full = F.pad(full[None], grow, mode="replicate")[0]
    return full.movedim(0, -1).numpy().astype(np.float32)


def jacobian_det(ddf):
    """Jacobian determinant of x + ddf(x) (central differences): ddf (B, 3, H, W, D) -> (B, H, W, D)
    (2D: (B, 2, H, W) -> (B, H, W))."""
    n = ddf.shape[1]
    g = torch.stack(torch.gradient(ddf, dim=tuple(range(2, 2 + n))), dim=2)  # (B, 3 comp, 3 deriv, H, W, D)
    J = g + torch.eye(n, dtype=ddf.dtype, device=ddf.device).view(1, n, n, *[1] * n)
    return torch.linalg.det(J.permute(0, *range(3, 3 + n), 1, 2))


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


def quick_field(fixed, moving, iters=40, spacing=4, reg=0.05, lr=0.2):
    """quick_registration's smooth ddf u (1, 3, H, W, D), in voxels of the input grid, with
    moving(x + u) ~ fixed; fixed, moving (H, W, D) in [0, 1] (2D: u (1, 2, H, W), maps (H, W))."""
    n = fixed.ndim
    f, m = (pool(v.float(), 2, n)[None, None] for v in (fixed, moving))
    size = f.shape[2:]
    ctrl = torch.zeros(1, n, *[max(2, s // spacing) for s in size], requires_grad=True)
    opt = torch.optim.Adam([ctrl], lr=lr)
    for _ in range(iters):
        u = resize_ddf(ctrl, size)
        loss = F.mse_loss(warp(m, u), f) + reg * sum((ctrl.diff(dim=d) ** 2).mean() for d in range(2, 2 + n))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return resize_ddf(ctrl, tuple(fixed.shape))  # back to the input grid


def quick_registration(fixed, moving, factor, iters=40, spacing=4, reg=0.05, lr=0.2, voxel_mm=None):
    """(mean |u| in mm over the fixed vessels, Dice after) of a smooth ddf u with moving(x + u) ~ fixed.
    fixed, moving (H, W, D) or (H, W) in [0, 1] at frame/factor. Registered at half that resolution (8 mm at
    factor 4: smoother images reach further) with u on a grid `spacing` times coarser still (32 mm).
    Cheap and identical for real and synthetic pairs. voxel_mm: the frame's spacing (None: 1 mm)."""
    u = quick_field(fixed, moving, iters, spacing, reg, lr)
    voxel_mm = [1.0] * fixed.ndim if voxel_mm is None else voxel_mm
    with torch.no_grad():
        mag = scale_channels(u, [factor * v for v in voxel_mm])[0].norm(dim=0)
        inside = fixed > 0.5
        warped = warp(moving[None, None].float(), u)[0, 0]
        return float(mag[inside].mean() if inside.any() else mag.mean()), dice(fixed, warped)


def random_warp(x, u):
    """Volumes x (B, C, *spatial) on a frame grid warped by a random_field u (1, dims, ...), zero outside."""
    return warp(x, resize_ddf(u.to(x.device), tuple(x.shape[2:])), padding="zeros")


FIELD_CALIBRATION = 8  # random fields quick-registered to learn how much of a field quick_registration finds


def field_strengths(pairs, factor, frame, generator):
    """The random fields' strength from real pairs (N, 2, H, W, D) at frame/factor (factor divides 4):
    per pair the magnitude (mm) of a field whose pairs a quick registration finds to move as far as it
    finds that pair to move (realism_report.py's disp_mm at 4 mm): the pair's displacement divided by
    the share r of a random field's displacement the quick registration recovers, measured on
    FIELD_CALIBRATION fields of the pairs' own strengths on their fixed maps. Returns (strengths, the
    pairs' displacements, r)."""
    x = torch.stack([pool(p.float().cpu(), 4 // factor, spatial_dims(frame)) for p in pairs])  # pair by pair: full-resolution pairs are large
    disp = [max(quick_registration(p[0], p[1], 4, voxel_mm=frame["spacing"])[0], 1e-3) for p in x]
    found = []
    for k in range(FIELD_CALIBRATION):
        base = x[k % len(x), 0]
        moved = random_warp(base[None, None], random_field(frame, disp[k % len(x)], field_weight(base, frame), generator))
        found.append(quick_registration(base, moved[0, 0], 4, voxel_mm=frame["spacing"])[0] / disp[k % len(x)])
    r = max(float(np.mean(found)), 1e-3)
    return [d / r for d in disp], disp, r


def nn_dice(vols, ref, exclude=None):
    """Highest Dice (at 0.5) of each volume (n, ...) against every reference volume (m, ...);
    exclude (n, m) bool marks pairs not to compare (a case against itself)."""
    a, b = (vols > 0.5).flatten(1).float(), (ref > 0.5).flatten(1).float()
    d = 2 * (a @ b.T) / (a.sum(1)[:, None] + b.sum(1)[None]).clamp(min=1)
    if exclude is not None:
        d[exclude] = -1
    return d.max(1).values.numpy()


def pair_stats(ids, x, factor=4, reference=None, progress=False, voxel_mm=None, images=None):
    """Realism statistics (REALISM_STATS) per pair: case ids and x (N, 2, H, W, D) at frame/factor
    of a frame with spacing voxel_mm.
    reference: (ids, pairs (M, 2, ...)[, images]) of the training pairs, for the memorisation statistic;
    images: the (fixed, moving) files of each pair, here and there: a map is not compared with the same
    image either (inter-subject pairs share images)."""
    axes = tuple(range(1, x.ndim - 1))
    s = {"case": list(ids), "vf_fixed": x[:, 0].mean(axes).numpy(), "vf_moving": x[:, 1].mean(axes).numpy(),
         "dice_fm": np.array([dice(p[0], p[1]) for p in x])}
    reg = [quick_registration(p[0], p[1], factor, voxel_mm=voxel_mm) for p in tqdm(x, desc="quick registration", disable=not progress)]
    s["disp_mm"], s["dice_reg"] = np.array(reg).reshape(-1, 2).T
    if reference is not None:  # a case is never compared with itself (the reference folder's own stats)
        rids, ref, rimages = (*reference, None)[:3]
        for k, name in enumerate(("nn_fixed", "nn_moving")):
            same = torch.tensor([[i == r or bool(images and rimages and images[n][k] in rimages[m][s])
                                  for m, r in enumerate(rids) for s in (slice(0, 1), slice(1, 2))]
                                 for n, i in enumerate(ids)])
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


def write_nifti(path, vol, factor, frame, affine=None):
    """A (H, W, D) volume ((H, W) in 2D; uint8 label maps kept, anything else float32) on the frame
    grid pooled by `factor`, with its frame affine (or `affine`)."""
    vol = np.asarray(vol)
    vol = vol if vol.dtype == np.uint8 else vol.astype(np.float32)  # label maps stay compact
    img = nib.Nifti1Image(vol, frame_affine(factor, frame) if affine is None else affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def learn2reg_paths(name, number, labels=False):
    """Learn2Reg names of pair `number` of data set `name`: images (fixed _0000, moving _0001), keypoints
    and, with labels, label maps beside the images (labelsTr/)."""
    stem = f"{name}_{int(number):04d}"
    return {"fixed": f"imagesTr/{stem}_0000.nii.gz", "moving": f"imagesTr/{stem}_0001.nii.gz",
            "fixed_kp": f"keypointsTr/{stem}_0000.csv", "moving_kp": f"keypointsTr/{stem}_0001.csv",
            **({"fixed_label": f"labelsTr/{stem}_0000.nii.gz", "moving_label": f"labelsTr/{stem}_0001.nii.gz"} if labels else {})}


def write_dataset_json(path, name, train, val=(), shape=None, frame=None, description="", subjects=None):
    """A Learn2Reg dataset JSON. train / val: [learn2reg_paths(...)] (paths relative to the JSON's
    folder; keypoints and labels listed when their file exists). frame: recorded for pairs written on
    a pooled frame grid (this project's synthetic pairs), so later stages place them as they were made.
    subjects: an inter-subject set (OASIS): training[] lists these subjects' fixed images, no
    training_paired_images; val pairs subjects too (their "fixed" images), which training[] leaves out."""
    root = os.path.dirname(os.path.abspath(path))

    def entry(p, k):
        e = {"image": "./" + p[k]}
        for field, key in (("keypoints", k + "_kp"), ("label", k + "_label")):
            if p.get(key) and os.path.exists(os.path.join(root, p[key])):
                e[field] = "./" + p[key]
        return e

    images = [entry(p, k) for p in [*train, *val] for k in ("fixed", "moving")] if subjects is None else \
        [entry(s, "fixed") for s in subjects]
    dims = len(shape) if shape else len(frame["shape"]) if frame else 3
    d = {"name": name, "description": description, "tensorImageSize": {"0": f"{dims}D"},
         "tensorImageShape": {"0": list(shape) if shape else []}, "modality": {"0": "mask"},
         "numTraining": len(images), "numTest": 0, "training": images, "test": [],
         "numPairedTraining": len(train), "training_paired_images": [{"fixed": "./" + p["fixed"], "moving": "./" + p["moving"]} for p in train],
         "numRegistration_val": len(val),
         "registration_val": [{"fixed": "./" + p["fixed"], "moving": "./" + p["moving"]} for p in val],
         "registration_test": [], "pairings": "paired" if subjects is None else "unpaired",
         "provided_data": {"0": ["image", "keypoints"]}, "registration_direction": {"fixed": 0, "moving": 1}}
    if frame:
        d["frame"] = frame
    write_json(path, d)


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=os.path.splitext(path)[1][1:])
    plt.close(fig)


def mip_rgb(fixed, moving):
    """Coronal maximum-intensity projection overlay: fixed blue, moving orange, overlap white-ish
    (2D maps: the image itself, first axis across)."""
    f, m = (np.asarray(v) for v in (fixed, moving))
    if f.ndim == 3:
        f, m = f.max(axis=1), m.max(axis=1)
    f, m = f.T[::-1], m.T[::-1]
    rgb = np.ones(f.shape + (3,))
    rgb -= f[..., None] * np.array([0.85, 0.45, 0.0])  # blue
    rgb -= m[..., None] * np.array([0.0, 0.4, 0.85])   # orange
    return np.clip(rgb, 0, 1)
