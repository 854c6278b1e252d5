"""Benchmark: the cpu preset's registration step (velocity integrated on a coarse 16 mm grid) vs.
the reference-style step (12 squarings at the input's full field resolution), and the intermediate
(integration on the 8 mm velocity grid); same weights, same input size, timed side by side in one
run; then accuracy of each after the same test-time adaptation.

    python tools/benchmark_registration.py [--data FOLDER] [--landmarks FOLDER] [--batch 4] [--steps 5]
                                           [--tta 30] [--preset cpu] [--device D]

Without --data it makes phantom pairs. Last line: `speedup: X.XX`.
"""
import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's scripts and modules

import utils
from models import RegistrationNet
from train_registration import PRESETS, REG, TTA_LR, config_of, optimise, train_step


def synchronize(device):
    """Wait for the GPU's queued work (for timing); nothing to wait for on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_warps(dev, batch, size, repeats=5):
    """Median seconds of forward + backward of a field warp (the operation scaling and squaring
    repeats), utils.warp vs MONAI's Warp, interleaved on the same inputs -> {name: seconds}."""
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's note that it uses PyTorch's grid_sample
        monai_warp = Warp("bilinear", "border")
    ddf = torch.randn(batch, 3, *size, device=dev, requires_grad=True)
    times = {"utils.warp": [], "monai Warp": []}
    for step in range(repeats + 1):  # step 0 = warm-up (MONAI builds and caches its grid)
        for name, fn in (("utils.warp", utils.warp), ("monai Warp", monai_warp)):
            synchronize(dev)
            t = time.perf_counter()
            fn(ddf, ddf).square().mean().backward()
            synchronize(dev)
            if step:
                times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--landmarks")
    ap.add_argument("--preset", default="cpu", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tta", type=int, default=30)
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    args = ap.parse_args(argv)
    data = args.data
    if data is None:
        import make_phantoms

        data = os.path.join(tempfile.mkdtemp(), "phantoms")
        make_phantoms.make_pairs(data, 2, seed=1)
    landmarks = args.landmarks or os.path.join(data, "landmarks")
    cfg = config_of(args.preset, utils.data_frame(data))
    ids, pairs = utils.load_pairs(data, cfg["factor"], cfg["frame"])
    utils.seed_all(0)
    fast = RegistrationNet.build(cfg)
    ref = RegistrationNet.build({**cfg, "model": {**cfg["model"], "exp_at": "input", "exp_coarsen": 1}})
    mid = RegistrationNet.build({**cfg, "model": {**cfg["model"], "exp_at": "velocity", "exp_coarsen": 1}})
    ref.load_state_dict(fast.state_dict())
    mid.load_state_dict(fast.state_dict())
    nets = {f"{args.preset} preset": fast, "exp on the velocity grid": mid, "reference-style (exp at input grid)": ref}
    dev = utils.get_device(args.device)  # times on the GPU when there is one
    for net in nets.values():
        net.to(dev)
    pairs = pairs.to(dev)
    x = pairs[torch.arange(args.batch) % len(ids)]
    grid = fast.velocity(0, x[:, :1], x[:, 1:]).shape[2:]
    print(f"input {tuple(x.shape)}, velocity grid {tuple(grid)}, {args.preset} preset integrates on "
          f"{tuple(-(-n // fast.exp_coarsen) for n in grid)}")

    warps = time_warps(dev, args.batch, tuple(x.shape[2:]))
    print(f"field warp forward + backward at {tuple(x.shape[2:])}, batch {args.batch}: utils.warp "
          f"{warps['utils.warp']:.4f} s, monai Warp {warps['monai Warp']:.4f} s "
          f"(ratio {warps['monai Warp'] / warps['utils.warp']:.2f})")

    times = {k: [] for k in nets}
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    opts = {k: [torch.optim.Adam(u.parameters(), lr=0.0) for u in net.unets] for k, net in nets.items()}  # weights stay
    for step in range(args.steps + 1):  # interleaved, so machine noise hits both alike; step 0 = warm-up
        for k, net in nets.items():
            synchronize(dev)
            t = time.perf_counter()
            train_step(net, opts[k], scaler, x[:, :1], x[:, 1:], REG, dev)
            synchronize(dev)
            if step:
                times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"{k:36s} {np.median(v):7.3f} s/iteration (median of {len(v)}, batch {args.batch})")

    # equal accuracy? the same TTA from the same initial weights, TRE on landmarks of one pair
    case = ids[0]
    fixed, moving = pairs[:1, :1], pairs[:1, 1:]
    lms = utils.read_landmarks(os.path.join(landmarks, f"{case}.csv"), cfg["frame"])
    fields = {}
    for k, net in nets.items():
        tta = copy.deepcopy(net)
        t = time.perf_counter()
        _, (v1, v2) = optimise(tta, lambda i: (fixed, moving), args.tta, TTA_LR,
                               REG, dev, desc=k[:10])
        with torch.no_grad():
            fields[k] = [f.cpu() for f in tta.fields(v1, v2, fixed.shape[2:])]
        synchronize(dev)
        print(f"{k:36s} TTA {args.tta} it on {case}: TRE {utils.tre(fields[k], *lms, cfg['frame']).mean():.2f} mm "
              f"(initial {utils.tre(None, *lms, cfg['frame']).mean():.2f}), {time.perf_counter() - t:.1f} s")
    d = (fields[list(nets)[0]][0] - fields[list(nets)[-1]][0]).norm(dim=1) * cfg["factor"]
    print(f"difference of the {args.preset} preset's and the reference-style adapted fields: mean {d.mean():.3f} mm, "
          f"max {d.max():.3f} mm")
    tf, ts = np.median(times[list(nets)[0]]), np.median(times[list(nets)[-1]])
    print(f"speedup: {ts / tf:.2f}")


if __name__ == "__main__":
    utils.run_main(main)
