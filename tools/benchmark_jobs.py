"""Benchmark: registration rows one at a time (all threads) vs `pipeline.py --jobs N` (N worker
processes, 1/N of the threads each): the same stage chains - a training of --iters iterations, then
its evaluation with --tta iterations per pair - timed side by side in one run, new path first.

    python tools/benchmark_jobs.py [--data FOLDER] [--val FOLDER] [--landmarks FOLDER] [--chains 2]
                                   [--iters 50] [--tta 10] [--jobs 2]

Without --data it makes phantom pairs. Last line: `speedup: X.XX` (wall time jobs 1 / jobs N).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's scripts and modules

import pipeline
import utils


def chains(out, data, val, landmarks, n, iters, tta):
    """n chains (seeds 0..n-1) of the cpu preset, as pipeline.py builds them: train on `data`, evaluate on `val`."""
    return [pipeline.reg_chain(out, f"s{s}", data, [data], "cpu", s, tta, val, landmarks, ["--iters", iters])
            for s in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--val")
    ap.add_argument("--landmarks")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tta", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    utils.check_positive({"--chains": a.chains, "--iters": a.iters, "--tta": a.tta, "--jobs": a.jobs})
    with tempfile.TemporaryDirectory() as tmp:  # checkpoints and evaluations go with it
        compare(a, tmp)


def compare(a, tmp):
    """Runs the chains with --jobs N, then one at a time, in folders under tmp; prints both."""
    if a.data is None:
        import make_phantoms

        a.data, a.val = os.path.join(tmp, "train"), os.path.join(tmp, "val")
        make_phantoms.make_pairs(a.data, 4, seed=1)
        make_phantoms.make_pairs(a.val, 3, seed=1000)
    val = a.val or a.data
    landmarks = a.landmarks or os.path.join(val, "landmarks")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.chains} chains of "
          f"{a.iters} training iterations + evaluation with {a.tta} TTA iterations on {len(utils.find_pairs(val))} pairs")
    wall, tre = {}, {}
    for jobs in (a.jobs, 1):
        out = os.path.join(tmp, f"jobs{jobs}")
        t = time.perf_counter()
        pipeline.run_chains(pipeline.Stages(out, []), chains(out, a.data, val, landmarks, a.chains, a.iters, a.tta), jobs)
        wall[jobs] = time.perf_counter() - t
        tre[jobs] = [json.load(open(f"{out}/eval_s{s}.json"))["tre_tta_mean"] for s in range(a.chains)]
    for jobs in (1, a.jobs):
        print(f"jobs {jobs}: {wall[jobs]:7.1f} s wall; TRE after TTA per chain: "
              + ", ".join(f"{x:.3f}" for x in tre[jobs]) + " mm")
    print(f"speedup: {wall[1] / wall[a.jobs]:.2f}")


if __name__ == "__main__":
    utils.run_main(main)
