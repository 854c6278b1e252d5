"""Benchmark: the diffusion transformer predicting every code vs only the codes its grids use
(train_diffusion's `compact`), one training step and one sampler call each, timed side by side
(interleaved) in one run on a token file.

    python tools/benchmark_diffusion.py TOKENS [--preset cpu] [--steps 5] [--batch B]

TOKENS: a token file (infer_vqae.py's or the reference's list). Both models are built by
train_diffusion.config_of at the preset (the full one with compact switched off), so the grouping
and widths are the preset's. Last line: `speedup: train X.XX, sample X.XX` (full / compact seconds).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's scripts and modules

import train_diffusion
import utils
from models import TokenTransformer


def frozen(params):
    """(optimiser, scheduler) that leave the weights as they are: every step computes the same."""
    opt = torch.optim.SGD(params, lr=0.0)
    return opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokens")
    ap.add_argument("--preset", default="cpu", choices=("cpu", "demo"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, help="default: the preset's")
    args = ap.parse_args(argv)
    p = train_diffusion.PRESETS[args.preset]
    batch = args.batch or p["batch"]
    utils.check_positive({"--steps": args.steps, "--batch": batch})
    tokens = utils.read_tokens(args.tokens)
    shapes = {k: v for k, v in tokens.items() if k != "tokens"}  # config_of without the grids: every code
    configs = {"full": train_diffusion.config_of(args.preset, shapes),
               "compact": train_diffusion.config_of(args.preset, tokens)}
    x0 = tokens["tokens"][torch.randint(len(tokens["tokens"]), (batch,), generator=torch.Generator().manual_seed(0))]
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    runs = {}
    for name, cfg in configs.items():
        utils.seed_all(0)
        model = TokenTransformer.build(cfg)
        runs[name] = (model, *frozen(model.parameters()))
    print(f"{len(tokens['tokens'])} grids {'x'.join(map(str, tokens['grid_shape']))}, {tokens['num_codes']} codes, "
          f"{len(configs['compact']['model']['vocab'])} used; preset {args.preset}, batch {batch}, "
          f"group {configs['full']['model'].get('group', 1)}; {torch.get_num_threads()} threads")
    times = {(n, k): [] for n in runs for k in ("train", "sample")}
    for i in range(args.steps + 1):  # interleaved; step 0 = warm-up
        for name, (model, opt, sched) in runs.items():
            torch.manual_seed(1)  # the same masks in both
            t = time.perf_counter()
            float(train_diffusion.diffusion_step(model, opt, scaler, sched, x0))
            t1 = time.perf_counter()
            model.sample(batch, steps=1, schedule="cosine", generator=torch.Generator().manual_seed(i))
            t2 = time.perf_counter()
            if i:
                times[name, "train"].append(t1 - t)
                times[name, "sample"].append(t2 - t1)
    ratios = []
    for k in ("train", "sample"):
        full, compact = np.median(times["full", k]), np.median(times["compact", k])
        print(f"{k:7s} full {full:.3f} s  compact {compact:.3f} s  ratio {full / compact:.2f}")
        ratios.append(f"{k} {full / compact:.2f}")
    print("speedup: " + ", ".join(ratios))


if __name__ == "__main__":
    utils.run_main(main)
