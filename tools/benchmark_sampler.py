"""Benchmark: the reference sampler (256 steps, batch 2) vs the preset's fast sampler (few cosine
steps on large batches), seconds per synthetic pair side by side in one run, then the realism of
both samples (utils.pair_stats at 4 mm, the fast one against the reference one).

    python tools/benchmark_sampler.py --diffusion CKPT [--vqae CKPT | --decoder CKPT] [--pairs 8] [--temp 0.9]
                                      [--device D]

Last line: `speedup: X.XX` (reference / fast seconds per pair).
"""
import argparse
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's scripts and modules

import realism_report
import synthesise
import utils
from models import TokenDecoder


def benchmark(models, pairs, temp=synthesise.TEMP):
    """Seconds per pair of the reference and the fast sampler, side by side, plus the realism of both."""
    model, decoder = models
    preset = model.config["preset"]
    dev = next(model.parameters()).device
    tmp = tempfile.mkdtemp(prefix="synth_bench_")
    try:
        model.sample(2, steps=2, device=dev)  # warm-up (lazy initialisation, allocator, cuDNN autotuning)
        seconds = {}
        for name in ("reference", "fast"):
            s = synthesise.sampler_settings(preset, name, temp)
            n = pairs if name == "reference" else max(pairs, s["batch"])
            seconds[name] = synthesise.run(models, os.path.join(tmp, name), n, s, overwrite=True, progress=False,
                                           calibrate=isinstance(decoder, TokenDecoder))[0]
            print(f"{name}: {s['steps']} steps ({s['schedule']}), batch {s['batch']}: {seconds[name]:.3f} s per pair")
        groups = {k: realism_report.folder_stats(os.path.join(tmp, k), model.config["frame"]) for k in seconds}
        print(utils.realism_table(groups, baseline="reference"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"speedup: {seconds['reference'] / seconds['fast']:.2f}")
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--diffusion", required=True, help="diffusion checkpoint")
    ap.add_argument("--vqae", help="VQ-AE checkpoint (default: the one the diffusion model was trained with)")
    ap.add_argument("--decoder", help="decode_tokens.py decoder checkpoint, instead of a VQ-AE")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per sampler (fast: at least one batch)")
    ap.add_argument("--temp", type=float, default=synthesise.TEMP)
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    args = ap.parse_args(argv)
    utils.check_positive({"--pairs": args.pairs})
    if not 0 < args.temp < math.inf:
        raise utils.DataError(f"--temp must be positive and finite, got {args.temp}")
    if utils.world()[1] > 1:
        raise utils.DataError("the samplers are timed in one process: run it without torchrun")
    benchmark(synthesise.load_models(args.diffusion, args.vqae, None, args.device, args.decoder), args.pairs, args.temp)


if __name__ == "__main__":
    utils.run_main(main)
