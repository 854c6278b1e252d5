"""Stage 4: sample token grids with the diffusion transformer, decode them into synthetic pairs.

    python synthesise.py [NUM_PAIRS=256] [--preset paper|cpu|demo] [--diffusion CKPT] [--vqae CKPT]
                         [--out synth] [--steps S] [--schedule seed|linear|cosine] [--temp 0.9]
                         [--batch B] [--seed S] [--decode TOKENS] [--overwrite]
    python synthesise.py --benchmark [--preset cpu] [--diffusion CKPT] [--vqae CKPT] [--pairs N]

Writes OUT/case_XXXX_1.nii.gz (fixed) and _2 (moving): vessel probability maps on the frame grid
pooled by the VQ-AE's factor (utils.write_nifti: 1 mm at paper, 4 mm at cpu/demo), so OUT is
directly a DATA_FOLDER of train_registration.py; OUT/manifest.json and OUT/preview.png.
Seed-exact mode: --steps 256 --batch 2 (schedule 'seed': at step k every masked token is
unmasked with probability 1/(256 - k)). Fast mode (default): the preset's few-step schedule and
large batches (see PRESETS). Pairs whose two files exist are kept (an interrupted run continues;
every batch has its own seed, so the result does not depend on interruptions) unless --overwrite.
--decode TOKENS decodes given token grids (e.g. the training pairs': the VQ-AE's 'perfect
memoriser') instead of sampling. --benchmark: seconds per pair of both modes side by side.
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

import utils
from models import VQAE
from train_diffusion import codebook_fingerprint, load_diffusion, load_tokens

SEED_EXACT = dict(steps=256, schedule="seed", batch=2)
# Fast mode (chosen by measurement, see the report): a random unmasking order like the seed's, but a
# cosine number of tokens per call (few while the grid is empty, many at the end) in `steps` calls.
PRESETS = {
    "paper": dict(steps=32, schedule="cosine", batch=32, decode_batch=4, temp=0.9),
    "cpu": dict(steps=16, schedule="cosine", batch=32, decode_batch=8, temp=0.9),
    "demo": dict(steps=16, schedule="cosine", batch=32, decode_batch=8, temp=0.9),
}


def load_models(diffusion, vqae_path=None, preset=None, device=None):
    """(transformer, diffusion ckpt, VQ-AE, VQ-AE config); refuses a VQ-AE whose token grid or
    codebook does not match the transformer's, or (when known) not the one that made its tokens."""
    from infer_vqae import load_vqae

    model, ck = load_diffusion(diffusion, device)
    cfg = ck["config"]
    if preset and cfg["preset"] != preset:
        raise utils.DataError(f"{diffusion}: is a '{cfg['preset']}' diffusion checkpoint, expected '{preset}'")
    vqae_path = vqae_path or ck.get("vqae") or f"vqae_{cfg['preset']}.pth"
    vqae, vcfg = load_vqae(vqae_path, device=device)
    grid = vqae.token_grid(utils.grid_shape(vcfg["factor"]))
    if list(grid) != cfg["grid_shape"] or vqae.num_codes != cfg["num_codes"]:
        raise utils.DataError(f"{vqae_path}: VQ-AE token grid {'x'.join(map(str, grid))} with {vqae.num_codes} "
                              f"codes does not match the diffusion model's {'x'.join(map(str, cfg['grid_shape']))} "
                              f"with {cfg['num_codes']}")
    fp = ck.get("vqae_fingerprint")
    if fp is not None and not math.isclose(fp, codebook_fingerprint(vqae), rel_tol=1e-6):
        raise utils.DataError(f"{vqae_path}: not the VQ-AE whose tokens trained {diffusion} (codebook differs)")
    return model, ck, vqae, vcfg, vqae_path


def pair_paths(out, i):
    return [os.path.join(out, f"case_{i:04d}_{k}.nii.gz") for k in (1, 2)]


def synthesise(model, vqae, factor, out, n, steps, schedule, temp, batch, seed=0, decode_batch=8, tokens=None,
               overwrite=False, progress=True):
    """Write n pairs into `out` (skipping complete ones unless overwrite); returns (seconds, pairs made).
    tokens (n, L): decode these instead of sampling."""
    dev = next(model.parameters()).device
    size = utils.grid_shape(factor)
    grid = vqae.token_grid(size)
    os.makedirs(out, exist_ok=True)
    t0, made, pending = time.time(), 0, []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # gzip writes overlap sampling
        for b in tqdm(range(-(-n // batch)), desc=f"synthesise {steps} steps", disable=not progress):
            idx = list(range(b * batch, min(n, (b + 1) * batch)))
            todo = [i for i in idx if overwrite or not all(map(os.path.exists, pair_paths(out, i)))]
            if not todo:
                continue
            if tokens is None:  # each batch its own generator: resuming reproduces the same pairs
                gen = torch.Generator(dev).manual_seed(seed * 1_000_003 + b)
                ids = model.sample(len(idx), steps, temp, schedule, generator=gen, device=dev)
            else:
                ids = tokens[idx].to(dev)
            for c in range(0, len(idx), decode_batch):
                with torch.no_grad(), utils.autocast(dev):
                    fp, mp = VQAE.pair_probs(vqae.decode_tokens(ids[c:c + decode_batch], grid), size)
                for j, i in enumerate(idx[c:c + decode_batch]):
                    if i in todo:
                        for path, vol in zip(pair_paths(out, i), (fp[j], mp[j])):
                            pending.append(pool.submit(utils.write_nifti, path, vol.cpu().numpy(), factor))
            made += len(todo)
            while len(pending) > 4 * batch:  # bound the volumes waiting in memory
                pending.pop(0).result()
        for f in pending:
            f.result()  # re-raise write errors
    return time.time() - t0, made


def preview(out, n=4):
    import matplotlib.pyplot as plt

    cases = [c for c in utils.find_pairs(out)][:n]
    fig, ax = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), squeeze=False)
    for a, c in zip(ax[0], cases):
        f, m = (utils.load_volume(p) for p in pair_paths(out, int(c[5:])))
        a.imshow(utils.mip_rgb(f, m)), a.set_title(f"{c} (fixed blue, moving orange)", fontsize=7), a.axis("off")
    utils.save_figure(fig, os.path.join(out, "preview.png"))


def run(a, out, n, steps, schedule, temp, batch, overwrite, progress=True, models=None):
    """Synthesise into `out` with a manifest; the settings of an unfinished run must match."""
    model, ck, vqae, vcfg, vqae_path = models or load_models(a.diffusion, a.vqae, a.preset)
    settings = {"diffusion": os.path.abspath(a.diffusion), "vqae": os.path.abspath(vqae_path), "seed": a.seed,
                "steps": steps, "schedule": schedule, "temp": temp, "batch": batch, "factor": vcfg["factor"],
                "decode": a.decode and os.path.abspath(a.decode)}
    mpath, old = os.path.join(out, "manifest.json"), {}
    if os.path.exists(mpath) and not overwrite:
        old = json.load(open(mpath))
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise utils.DataError(f"{out}: holds pairs made with other {', '.join(diff)} (use --overwrite or another --out)")
    tokens = None
    if a.decode:
        tokens, _, codes, _, _ = load_tokens(a.decode, ck["config"]["preset"])
        if codes != vqae.num_codes:
            raise utils.DataError(f"{a.decode}: tokens of a {codes}-code VQ-AE, {vqae_path} has {vqae.num_codes}")
        n = len(tokens)
    utils.write_json(mpath, {**settings, "num_pairs": n, "complete": False})
    secs, made = synthesise(model, vqae, vcfg["factor"], out, n, steps, schedule, temp, batch, a.seed,
                            PRESETS[ck["config"]["preset"]]["decode_batch"], tokens, overwrite, progress)
    per_pair = secs / max(made, 1)
    secs_all, made_all = secs + old.get("seconds", 0), made + old.get("pairs_made", 0)  # over resumed runs
    utils.write_json(mpath, {**settings, "num_pairs": n, "complete": True, "pairs_made": made_all,
                             "seconds": round(secs_all, 2), "seconds_per_pair": round(secs_all / max(made_all, 1), 4),
                             "shape": list(utils.grid_shape(vcfg["factor"])), "device": str(utils.get_device())})
    preview(out)
    print(f"{out}: {made} pairs written ({n - made} kept), {per_pair:.3f} s per pair")
    return per_pair, made


def benchmark(a):
    """Seconds per pair of seed-exact and fast mode, side by side, plus the realism of both."""
    import realism_report as rr

    models = load_models(a.diffusion, a.vqae, a.preset)
    p = PRESETS[models[1]["config"]["preset"]]
    tmp = tempfile.mkdtemp(prefix="synth_bench_")
    try:
        models[0].sample(2, steps=2)  # warm-up (lazy initialisation, allocator)
        out = {}
        for name, s in (("seed-exact", SEED_EXACT), ("fast", p)):
            n = a.pairs if name == "seed-exact" else max(a.pairs, s["batch"])
            out[name] = run(a, os.path.join(tmp, name), n, s["steps"], s["schedule"], a.temp, s["batch"], True, False,
                            models)[0]
            print(f"{name}: {s['steps']} steps ({s['schedule']}), batch {s['batch']}: {out[name]:.3f} s per pair")
        groups = {k: rr.folder_stats(os.path.join(tmp, k), models[3]["factor"]) for k in out}
        print(rr.table(groups, baseline="seed-exact"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"speedup: {out['seed-exact'] / out['fast']:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("num_pairs", type=int, nargs="?", default=256)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default paths and fast settings; refuses other presets")
    ap.add_argument("--diffusion", help="diffusion checkpoint (default diffusion_<preset>.pth)")
    ap.add_argument("--vqae", help="VQ-AE checkpoint (default: the one the diffusion model was trained with)")
    ap.add_argument("--out", default="synth")
    ap.add_argument("--steps", type=int, help="denoiser calls (256 = seed-exact; default: the preset's fast mode)")
    ap.add_argument("--schedule", choices=("seed", "linear", "cosine"), help="default: seed at 256 steps, else the preset's")
    ap.add_argument("--temp", type=float, default=0.9)
    ap.add_argument("--batch", type=int, help="token grids sampled at once (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode", metavar="TOKENS", help="decode these token grids instead of sampling")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--benchmark", action="store_true", help="time seed-exact vs fast mode (last line: speedup)")
    ap.add_argument("--pairs", type=int, default=8, help="--benchmark: pairs per mode (fast: at least one batch)")
    a = ap.parse_args(argv)
    a.diffusion = a.diffusion or f"diffusion_{a.preset or 'paper'}.pth"
    if a.num_pairs < 1 or a.pairs < 1 or (a.steps or 1) < 1 or (a.batch or 1) < 1 or a.temp <= 0:
        raise utils.DataError("NUM_PAIRS, --pairs, --steps, --batch and --temp must be positive")
    if a.benchmark:
        return benchmark(a)
    preset = a.preset or utils.load_checkpoint(a.diffusion, "diffusion")["config"]["preset"]
    p = PRESETS[preset]
    steps = a.steps or p["steps"]
    schedule = a.schedule or ("seed" if steps == SEED_EXACT["steps"] else p["schedule"])
    run(a, a.out, a.num_pairs, steps, schedule, a.temp, a.batch or p["batch"], a.overwrite)


if __name__ == "__main__":
    utils.run_main(main)
