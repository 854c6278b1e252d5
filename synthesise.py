"""Stage 4: sample token grids with the diffusion transformer, decode them into synthetic pairs.

    python synthesise.py [NUM_PAIRS=256] [--preset paper|cpu|demo] [--diffusion CKPT] [--vqae CKPT]
                         [--out synth] [--sampler reference|fast] [--steps S] [--schedule seed|linear|cosine]
                         [--temp 0.9] [--batch B] [--seed S] [--calibrate] [--decode TOKENS] [--device D]
                         [--overwrite]
    python synthesise.py --benchmark [--preset cpu] [--diffusion CKPT] [--vqae CKPT] [--pairs N]

Writes OUT/case_XXXX_1.nii.gz (fixed) and _2 (moving): the decoder's raw vessel softmax (what the
reference implementation writes; --calibrate: occupancies, see VQAE.pair_probs) on the frame grid
pooled by the VQ-AE's factor (utils.write_nifti: 1 mm at paper, 4 mm at cpu/demo), so OUT is
directly a DATA_FOLDER of train_registration.py; OUT/manifest.json and OUT/preview.png.
--sampler reference (the default at --preset paper): 256 steps, batch 2, the reference schedule
(at step k every masked token is unmasked with probability 1/(256 - k)). --sampler fast (the
default at cpu/demo): the preset's few-step cosine schedule on large batches. Pairs whose two files
exist are kept (an interrupted run continues; every batch has its own seed, so the result does not
depend on interruptions) unless --overwrite. --decode TOKENS decodes given token grids (e.g. the
training pairs': the VQ-AE's 'perfect memoriser') instead of sampling. --benchmark: seconds per
pair of both samplers side by side.
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

# The reference sampler: 256 denoiser calls on batches of 2; at step k every still-masked token is
# unmasked with probability 1 / (256 - k) ("seed" schedule). The fast sampler (chosen by measurement,
# see README): a random unmasking order too, but a cosine number of tokens per call (few while the
# grid is empty, many at the end) in few calls on large batches.
SAMPLERS = {"reference": dict(steps=256, schedule="seed", batch=2)}
PRESETS = {
    "paper": dict(sampler="reference", fast=dict(steps=32, schedule="cosine", batch=32)),
    "cpu": dict(sampler="fast", fast=dict(steps=16, schedule="cosine", batch=32)),
    "demo": dict(sampler="fast", fast=dict(steps=16, schedule="cosine", batch=32)),
}
TEMP = 0.9
CPU_DECODE_BATCH = 8  # volumes decoded at once on a CPU; on a GPU sized from free memory


def sampler_settings(preset, sampler=None):
    """steps, schedule and batch of the reference or the preset's fast sampler."""
    sampler = sampler or PRESETS[preset]["sampler"]
    return dict(SAMPLERS["reference"] if sampler == "reference" else PRESETS[preset]["fast"])


def load_models(diffusion, vqae_path=None, preset=None, device=None):
    """(transformer, diffusion ckpt, VQ-AE, VQ-AE config); refuses a VQ-AE whose token grid or
    codebook does not match the transformer's, or (when known) not the one that made its tokens."""
    from infer_vqae import load_vqae

    device = utils.get_device(device)
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


def decode_chunk(vqae, ids, grid, dev, probe):
    """How many volumes to decode at once: on a GPU, as many as fit in 80 % of the free memory
    after `probe` (one decoded volume) showed the peak of one; on a CPU, CPU_DECODE_BATCH."""
    if dev.type != "cuda":
        return CPU_DECODE_BATCH
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    with torch.no_grad(), utils.autocast(dev):
        probe(vqae.decode_tokens(ids[:1], grid))
    per_volume = max(torch.cuda.max_memory_allocated(dev) - base, 1)
    return max(1, int(0.8 * torch.cuda.mem_get_info(dev)[0] / per_volume))


def synthesise(model, vqae, factor, out, n, steps, schedule, temp, batch, seed=0, tokens=None, overwrite=False,
               progress=True, calibrate=False):
    """Write n pairs into `out` (skipping complete ones unless overwrite); returns (seconds, pairs made).
    tokens (n, L): decode these instead of sampling. calibrate: VQAE.pair_probs(calibrate=True)
    occupancies instead of the raw vessel softmax (the reference's output)."""
    dev = next(model.parameters()).device
    size = utils.grid_shape(factor)
    grid = vqae.token_grid(size)
    os.makedirs(out, exist_ok=True)
    t0, made, pending, chunk = time.time(), 0, [], None
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
            chunk = chunk or decode_chunk(vqae, ids, grid, dev, lambda logits: VQAE.pair_probs(logits, size, calibrate))
            for c in range(0, len(idx), chunk):
                with torch.no_grad(), utils.autocast(dev):
                    fp, mp = VQAE.pair_probs(vqae.decode_tokens(ids[c:c + chunk], grid), size, calibrate)
                for j, i in enumerate(idx[c:c + chunk]):
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
    model, ck, vqae, vcfg, vqae_path = models or load_models(a.diffusion, a.vqae, a.preset, a.device)
    settings = {"diffusion": os.path.abspath(a.diffusion), "vqae": os.path.abspath(vqae_path), "seed": a.seed,
                "steps": steps, "schedule": schedule, "temp": temp, "batch": batch, "factor": vcfg["factor"],
                "decode": a.decode and os.path.abspath(a.decode), "calibrate": a.calibrate}
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
    secs, made = synthesise(model, vqae, vcfg["factor"], out, n, steps, schedule, temp, batch, a.seed, tokens,
                            overwrite, progress, a.calibrate)
    per_pair = secs / max(made, 1)
    secs_all, made_all = secs + old.get("seconds", 0), made + old.get("pairs_made", 0)  # over resumed runs
    dev = next(model.parameters()).device
    utils.write_json(mpath, {**settings, "num_pairs": n, "complete": True, "pairs_made": made_all,
                             "seconds": round(secs_all, 2), "seconds_per_pair": round(secs_all / max(made_all, 1), 4),
                             "shape": list(utils.grid_shape(vcfg["factor"])), "device": str(dev)})
    preview(out)
    print(f"{out}: {made} pairs written ({n - made} kept), {per_pair:.3f} s per pair{utils.peak_memory(dev)}")
    return per_pair, made


def benchmark(a):
    """Seconds per pair of the reference and the fast sampler, side by side, plus the realism of both."""
    import realism_report as rr

    models = load_models(a.diffusion, a.vqae, a.preset, a.device)
    preset = models[1]["config"]["preset"]
    dev = next(models[0].parameters()).device
    tmp = tempfile.mkdtemp(prefix="synth_bench_")
    try:
        models[0].sample(2, steps=2, device=dev)  # warm-up (lazy initialisation, allocator, cuDNN autotuning)
        out = {}
        for name in ("reference", "fast"):
            s = sampler_settings(preset, name)
            n = a.pairs if name == "reference" else max(a.pairs, s["batch"])
            out[name] = run(a, os.path.join(tmp, name), n, s["steps"], s["schedule"], a.temp, s["batch"], True, False,
                            models)[0]
            print(f"{name}: {s['steps']} steps ({s['schedule']}), batch {s['batch']}: {out[name]:.3f} s per pair")
        groups = {k: rr.folder_stats(os.path.join(tmp, k), models[3]["factor"]) for k in out}
        print(rr.table(groups, baseline="reference"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"speedup: {out['reference'] / out['fast']:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("num_pairs", type=int, nargs="?", default=256)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default paths and sampler; refuses other presets")
    ap.add_argument("--diffusion", help="diffusion checkpoint (default diffusion_<preset>.pth)")
    ap.add_argument("--vqae", help="VQ-AE checkpoint (default: the one the diffusion model was trained with)")
    ap.add_argument("--out", default="synth")
    ap.add_argument("--sampler", choices=("reference", "fast"),
                    help="reference: 256 steps, batch 2 (default at paper); fast: the preset's few-step cosine schedule")
    ap.add_argument("--steps", type=int, help="denoiser calls (overrides the sampler's)")
    ap.add_argument("--schedule", choices=("seed", "linear", "cosine"), help="overrides the sampler's")
    ap.add_argument("--temp", type=float, default=TEMP)
    ap.add_argument("--batch", type=int, help="token grids sampled at once (overrides the sampler's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibrate", action="store_true",
                    help="write calibrated occupancies instead of the raw vessel softmax (the reference's output)")
    ap.add_argument("--decode", metavar="TOKENS", help="decode these token grids instead of sampling")
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--benchmark", action="store_true", help="time the reference vs the fast sampler (last line: speedup)")
    ap.add_argument("--pairs", type=int, default=8, help="--benchmark: pairs per sampler (fast: at least one batch)")
    a = ap.parse_args(argv)
    a.diffusion = a.diffusion or f"diffusion_{a.preset or 'paper'}.pth"
    if a.num_pairs < 1 or a.pairs < 1 or (a.steps or 1) < 1 or (a.batch or 1) < 1 or not (0 < a.temp < math.inf):
        raise utils.DataError("NUM_PAIRS, --pairs, --steps, --batch and --temp must be positive and finite")
    if a.benchmark:
        return benchmark(a)
    preset = a.preset or utils.load_checkpoint(a.diffusion, "diffusion")["config"]["preset"]
    s = sampler_settings(preset, a.sampler)
    run(a, a.out, a.num_pairs, a.steps or s["steps"], a.schedule or s["schedule"], a.temp, a.batch or s["batch"],
        a.overwrite)


if __name__ == "__main__":
    utils.run_main(main)
