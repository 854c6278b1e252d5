"""Benchmark: the cpu preset's registration step (velocity integrated on a coarse 16 mm grid) vs.
the seed-style step (12 squarings at the input's full field resolution), and the intermediate
(integration on the 8 mm velocity grid); same weights, same input size, timed side by side in one
run; then accuracy of each after the same test-time adaptation.

    python benchmark_registration.py [--data FOLDER] [--landmarks FOLDER] [--batch 4] [--steps 5]
                                     [--tta 30] [--preset cpu]

Without --data it makes phantom pairs. Last line: `speedup: X.XX`.
"""
import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch

import utils
from train_registration import PRESETS, build_net, config_of, optimise, train_step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--landmarks")
    ap.add_argument("--preset", default="cpu", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tta", type=int, default=30)
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    a = ap.parse_args(argv)
    if a.data is None:
        import make_phantoms
        a.data = os.path.join(tempfile.mkdtemp(), "phantoms")
        make_phantoms.make_pairs(a.data, 2, seed=1)
    landmarks = a.landmarks or os.path.join(a.data, "landmarks")
    cfg = config_of(a.preset)
    ids, pairs = utils.load_pairs(a.data, cfg["factor"])
    utils.seed_all(0)
    fast = build_net(cfg)
    seed = build_net({**cfg, "exp_at": "input", "exp_coarsen": 1})
    mid = build_net({**cfg, "exp_at": "velocity", "exp_coarsen": 1})
    seed.load_state_dict(fast.state_dict())
    mid.load_state_dict(fast.state_dict())
    nets = {f"{a.preset} preset": fast, "exp on the velocity grid": mid, "seed-style (exp at input grid)": seed}
    dev = utils.get_device(a.device)  # times on the GPU when there is one
    for net in (fast, mid, seed):
        net.to(dev)
    pairs = pairs.to(dev)
    x = pairs[torch.arange(a.batch) % len(ids)]
    grid = fast.velocity(0, x[:, :1], x[:, 1:]).shape[2:]
    print(f"input {tuple(x.shape)}, velocity grid {tuple(grid)}, {a.preset} preset integrates on "
          f"{tuple(-(-n // fast.exp_coarsen) for n in grid)}")

    times = {k: [] for k in nets}
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    opts = {k: [torch.optim.Adam(u.parameters(), lr=0.0) for u in net.unets] for k, net in nets.items()}  # weights stay
    for step in range(a.steps + 1):  # interleaved, so machine noise hits both alike; step 0 = warm-up
        for k, net in nets.items():
            utils.synchronize(dev)
            t = time.perf_counter()
            train_step(net, opts[k], scaler, x[:, :1], x[:, 1:], PRESETS[a.preset]["reg"], dev)
            utils.synchronize(dev)
            if step:
                times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"{k:36s} {np.median(v):7.3f} s/iteration (median of {len(v)}, batch {a.batch})")

    # equal accuracy? the same TTA from the same initial weights, TRE on landmarks of one pair
    case = ids[0]
    fixed, moving = pairs[:1, :1], pairs[:1, 1:]
    lms = utils.read_landmarks(os.path.join(landmarks, f"{case}.csv"))
    fields = {}
    for k, net in nets.items():
        tta = copy.deepcopy(net)
        t = time.perf_counter()
        _, (v1, v2) = optimise(tta, lambda i: (fixed, moving), a.tta, PRESETS[a.preset]["tta_lr"],
                               PRESETS[a.preset]["reg"], dev, desc=k[:10])
        with torch.no_grad():
            fields[k] = [f.cpu() for f in tta.fields(v1, v2, fixed.shape[2:])]
        utils.synchronize(dev)
        print(f"{k:36s} TTA {a.tta} it on {case}: TRE {utils.tre(fields[k], *lms).mean():.2f} mm "
              f"(initial {utils.tre(None, *lms).mean():.2f}), {time.perf_counter() - t:.1f} s")
    d = (fields[list(nets)[0]][0] - fields[list(nets)[-1]][0]).norm(dim=1) * cfg["factor"]
    print(f"difference of the {a.preset} preset's and the seed-style adapted fields: mean {d.mean():.3f} mm, "
          f"max {d.max():.3f} mm")
    tf, ts = np.median(times[list(nets)[0]]), np.median(times[list(nets)[-1]])
    print(f"speedup: {ts / tf:.2f}")


if __name__ == "__main__":
    utils.run_main(main)
