"""Stage 4: sample token grids with the diffusion transformer, decode them into synthetic pairs.

    python synthesise.py [NUM_PAIRS] [--preset paper|cpu|demo] [--diffusion CKPT] [--vqae CKPT | --decoder CKPT]
                         [--out synth] [--sampler reference|fast] [--steps S] [--temp 0.9] [--batch B] [--seed S]
                         [--calibrate | --no-calibrate] [--device D] [--overwrite]

Writes OUT/case_XXXX_1.nii.gz (fixed) and _2 (moving): the decoder's raw vessel softmax (what the
reference implementation writes, the paper preset's default) or with --calibrate occupancies (see
VQAE.pair_probs; the cpu and demo presets' default) on the frame grid pooled by the VQ-AE's factor
in the frame of the data the models were trained on (utils.write_nifti: the frame's spacing times
the factor, e.g. 1 mm at paper, 4 mm at cpu/demo on Lung250M-4B), and OUT/synth_dataset.json, a
Learn2Reg dataset JSON listing them (with the frame), so OUT is directly the DATA of
train_registration.py and of other toolkits; OUT/manifest.json and OUT/preview.png.
--sampler reference (the default at --preset paper): 256 steps, batch 2, the reference schedule
(at step k every masked token is unmasked with probability 1/(256 - k)). --sampler fast (the
default at cpu/demo): the preset's few-step cosine schedule on large batches (its speed:
tools/benchmark_sampler.py). Pairs whose two files exist are kept (an interrupted run continues;
every batch has its own seed, so the result does not depend on interruptions) unless --overwrite.
--decoder CKPT (not in the paper): decode with decode_tokens.py's models.TokenDecoder instead of a
VQ-AE, for a diffusion model trained on a token file whose VQ-AE is not available (the reference's
97 grids); it writes occupancies on its own frame grid (4 mm at cpu).
"""
import argparse
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

import utils
from models import TokenDecoder, TokenTransformer, load_decoder

# The reference sampler: 256 denoiser calls on batches of 2; at step k every still-masked token is
# unmasked with probability 1 / (256 - k) ("reference" schedule). The fast sampler (chosen by measurement,
# RESULTS.md): a random unmasking order too, but a cosine number of tokens per call (few while the
# grid is empty, many at the end) in few calls on large batches.
SAMPLERS = {"reference": dict(steps=256, schedule="reference", batch=2)}
FAST = dict(steps=16, schedule="cosine", batch=32)
# num_pairs: what pipeline.py synthesises. calibrate: write occupancies (VQAE.pair_probs) - at cpu/demo
# the VQ-AE learns 4 mm occupancies, the registration net trains on real 4 mm occupancies, and the raw
# softmax over-states their vessel fraction 2.4x (RESULTS.md); paper: the reference's raw softmax.
PRESETS = {
    "paper": dict(sampler="reference", fast=dict(FAST, steps=32), num_pairs=256, calibrate=False),
    "cpu": dict(sampler="fast", fast=FAST, num_pairs=256, calibrate=True),
    "demo": dict(sampler="fast", fast=FAST, num_pairs=32, calibrate=True),
}
TEMP = 0.9
CPU_DECODE_BATCH = 8  # volumes decoded at once on a CPU; on a GPU sized from free memory


def sampler_settings(preset, sampler=None, temp=TEMP, **overrides):
    """The sampler as one dict {steps, schedule, batch, temp}: the reference sampler or the preset's
    fast one, with the given non-None overrides."""
    sampler = sampler or PRESETS[preset]["sampler"]
    settings = dict(SAMPLERS["reference"] if sampler == "reference" else PRESETS[preset]["fast"], temp=temp)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def load_models(diffusion, vqae_path=None, preset=None, device=None, decoder=None):
    """(transformer, decoder): the VQ-AE, or with `decoder` a TokenDecoder checkpoint; refuses a
    decoder whose token grid or codebook does not match the transformer's, or (when known) a VQ-AE
    that did not make its tokens."""
    device = utils.distributed(device)[2]  # under torchrun: this process's GPU
    model = TokenTransformer.from_checkpoint(diffusion, device, preset)
    cfg = model.config
    if not vqae_path and not decoder:  # the decoder the diffusion model was trained with
        decoder = model.saved.get("decoder")
        vqae_path = None if decoder else model.saved.get("vqae") or f"vqae_{cfg['preset']}.pth"
    dec = load_decoder(cfg["grid_shape"], cfg["model"]["num_codes"], vqae_path, decoder, device, cfg.get("classes", 1))
    if dec.config.get("frame") != cfg["frame"]:
        raise utils.DataError(f"{dec.path}: made in another frame than the tokens of {diffusion}")
    if decoder:
        return model, dec
    fingerprint = model.saved.get("vqae_fingerprint")
    if fingerprint is not None and not math.isclose(fingerprint, dec.fingerprint(), rel_tol=1e-6):
        raise utils.DataError(f"{vqae_path}: not the VQ-AE whose tokens trained {diffusion} (codebook differs)")
    return model, dec


def pair_paths(out, i):
    return [os.path.join(out, f"case_{i:04d}_{k}.nii.gz") for k in (1, 2)]


def decode_chunk(ids, dev, probe):
    """How many volumes to decode at once: on a GPU, as many as fit in 80 % of the free memory
    after `probe` (decoding one grid) showed the peak of one; on a CPU, CPU_DECODE_BATCH."""
    if dev.type != "cuda":
        return CPU_DECODE_BATCH
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    with torch.no_grad(), utils.autocast(dev):
        probe(ids[:1])
    per_volume = max(torch.cuda.max_memory_allocated(dev) - base, 1)
    return max(1, int(0.8 * torch.cuda.mem_get_info(dev)[0] / per_volume))


def synthesise(model, decoder, out, n, sampler, seed=0, overwrite=False, progress=True, calibrate=False):
    """Write n pairs into `out` (skipping complete ones unless overwrite); returns (seconds, pairs made).
    decoder: a VQAE or TokenDecoder. sampler: sampler_settings(). calibrate: VQAE.pair_probs(calibrate=True)
    occupancies instead of the raw vessel softmax (the reference's)."""
    dev = next(model.parameters()).device
    factor = decoder.config["factor"]
    frame = model.config["frame"]
    size = utils.grid_shape(factor, frame)
    grid = model.config["grid_shape"]
    batch = sampler["batch"]
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    made = 0
    pending = []
    chunk = None

    classes = label_classes(decoder)

    def probs(ids):  # label maps: the most probable class of the calibrated probabilities (the raw softmax dilates)
        return decoder.decode_pair(ids.reshape(-1, *grid), size, calibrate or bool(classes))


    def volume(p):  # K classes: (K, ...) probabilities -> a uint8 map of the most probable label value
        return utils.label_map(p, classes) if classes else p.cpu().numpy()

    rank, procs = utils.world()
    mine = range(rank, -(-n // batch), procs)  # under torchrun each batch on exactly one process
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # gzip writes overlap sampling
        for b in tqdm(mine, desc=f"synthesise {sampler['steps']} steps", disable=not progress or rank > 0):
            idx = list(range(b * batch, min(n, (b + 1) * batch)))
            todo = [i for i in idx if overwrite or not all(map(os.path.exists, pair_paths(out, i)))]
            if not todo:
                continue
            gen = torch.Generator(dev).manual_seed(seed * 1_000_003 + b)  # resuming reproduces the same pairs
            ids = model.sample(len(idx), sampler["steps"], sampler["temp"], sampler["schedule"], generator=gen,
                               device=dev)
            chunk = chunk or decode_chunk(ids, dev, probs)
            for c in range(0, len(idx), chunk):
                with torch.no_grad(), utils.autocast(dev):
                    fixed, moving = probs(ids[c:c + chunk])
                for j, i in enumerate(idx[c:c + chunk]):
                    if i in todo:
                        for path, vol in zip(pair_paths(out, i), (fixed[j], moving[j])):
                            pending.append(pool.submit(utils.write_nifti, path, volume(vol), factor, frame))
            made += len(todo)
            while len(pending) > 4 * batch:  # bound the volumes waiting in memory
                pending.pop(0).result()
        for f in pending:
            f.result()  # re-raise write errors
    made = sum(utils.gather_objects(made))
    return time.time() - t0, made


def label_classes(decoder):
    """The label values of a decoder's K > 1 classes (its pairs are written as label maps), else None."""
    return decoder.saved.get("classes") if getattr(decoder, "classes", 1) > 1 else None


def preview(out, n=4):
    import matplotlib.pyplot as plt

    cases = utils.find_pairs(out)[:n]
    fig, ax = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.4), squeeze=False)
    for panel, c in zip(ax[0], cases):
        fixed, moving = ((utils.load_volume(p) > 0) if utils.image_dtype(p) == "uint8" else utils.load_volume(p)
                         for p in (c.fixed, c.moving))  # label maps: their foreground
        panel.imshow(utils.mip_rgb(fixed, moving))
        panel.set_title(f"{c.id} (fixed blue, moving orange)", fontsize=7)
        panel.axis("off")
    utils.save_figure(fig, os.path.join(out, "preview.png"))


def run(models, out, n, sampler, seed=0, calibrate=False, overwrite=False, progress=True):
    """Synthesise into `out` with a manifest; the settings of an unfinished run must match.
    models: load_models(). Returns (seconds per pair, pairs made)."""
    model, decoder = models
    factor = decoder.config["factor"]
    token_decoder = isinstance(decoder, TokenDecoder)
    if token_decoder and not calibrate:
        raise utils.DataError("a token decoder (--decoder) writes occupancies: use it with --calibrate")
    mpath = os.path.join(out, "manifest.json")
    old = {}
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(mpath) and not overwrite:
        raise utils.DataError(f"{out}: holds files that synthesise.py did not write (no manifest.json); "
                              "use another --out (or --overwrite to write into it anyway)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise utils.DataError(f"{out}: is a file, --out must be a folder")
    decoder_key = "token_decoder" if token_decoder else "vqae"
    settings = {"diffusion": os.path.abspath(model.path), decoder_key: os.path.abspath(decoder.path), "seed": seed,
                **sampler, "factor": factor, "calibrate": calibrate}
    if label_classes(decoder):
        settings["classes"] = label_classes(decoder)
    if os.path.exists(mpath) and not overwrite:
        old = utils.read_json(mpath)
        diff = [k for k in [*settings, "classes"] if old.get(k) != settings.get(k)]
        if diff:
            raise utils.DataError(f"{out}: holds pairs made with other {', '.join(diff)} (use --overwrite or another --out)")
    utils.barrier()  # every process has read the old manifest before process 0 replaces it
    if utils.is_main():
        utils.write_json(mpath, {**settings, "num_pairs": n, "complete": False})
    secs, made = synthesise(model, decoder, out, n, sampler, seed, overwrite, progress, calibrate)
    if not utils.is_main():
        return secs / max(made, 1), made
    per_pair = secs / max(made, 1)
    secs_all = secs + old.get("seconds", 0)  # over resumed runs
    made_all = made + old.get("pairs_made", 0)
    dev = next(model.parameters()).device
    write_dataset(out, n, factor, model.config["frame"], label_classes(decoder))
    utils.write_json(mpath, {**settings, "num_pairs": n, "complete": True, "pairs_made": made_all,
                             "seconds": round(secs_all, 2), "seconds_per_pair": round(secs_all / max(made_all, 1), 4),
                             "shape": list(utils.grid_shape(factor, model.config["frame"])), "device": str(dev),
                             "frame": model.config["frame"]})
    preview(out)
    print(f"{out}: {made} pairs written ({n - made} kept), {per_pair:.3f} s per pair{utils.peak_memory(dev)}")
    return per_pair, made


def write_dataset(out, n, factor, frame, classes=None):
    """OUT/synth_dataset.json: the n pairs as Learn2Reg training pairs, with the frame they were made in."""
    pairs = [{k: os.path.basename(p) for k, p in zip(("fixed", "moving"), pair_paths(out, i))} for i in range(n)]
    what = f"label maps of labels {','.join(map(str, classes))}" if classes else "occupancies in [0, 1]"
    utils.write_dataset_json(os.path.join(out, "synth_dataset.json"), "synth", pairs,
                             shape=utils.grid_shape(factor, frame), frame=frame,
                             description=f"synthetic pairs of synthesise.py: fixed *_1, moving *_2, {what} "
                                         f"on the frame pooled by {factor}")


def default_calibrate(decoder, preset):
    """Occupancies or the raw softmax: the preset's choice for a VQ-AE; a token decoder's are occupancies."""
    return isinstance(decoder, TokenDecoder) or PRESETS[preset]["calibrate"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("num_pairs", type=int, nargs="?", help="default: the preset's (paper 256)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default paths and sampler; refuses other presets")
    ap.add_argument("--diffusion", help="diffusion checkpoint (default diffusion_<preset>.pth)")
    ap.add_argument("--vqae", help="VQ-AE checkpoint (default: the one the diffusion model was trained with)")
    ap.add_argument("--decoder", help="decode_tokens.py decoder checkpoint, instead of a VQ-AE")
    ap.add_argument("--out", default="synth")
    ap.add_argument("--sampler", choices=("reference", "fast"),
                    help="reference: 256 steps, batch 2 (default at paper); fast: the preset's few-step cosine schedule")
    ap.add_argument("--steps", type=int, help="denoiser calls (overrides the sampler's)")
    ap.add_argument("--temp", type=float, default=TEMP)
    ap.add_argument("--batch", type=int, help="token grids sampled at once (overrides the sampler's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction,
                    help="write calibrated occupancies instead of the raw vessel softmax (the reference's output); "
                    "default: the preset's (paper: raw; cpu, demo: calibrated)")
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    diffusion = args.diffusion or f"diffusion_{args.preset or 'paper'}.pth"
    counts = [c for c in (args.num_pairs, args.steps, args.batch) if c is not None]
    if (counts and min(counts) < 1) or not (0 < args.temp < math.inf):
        raise utils.DataError("NUM_PAIRS, --steps, --batch and --temp must be positive and finite")
    utils.check_seed(args.seed)
    models = load_models(diffusion, args.vqae, args.preset, args.device, args.decoder)
    preset = models[0].config["preset"]
    sampler = sampler_settings(preset, args.sampler, args.temp, steps=args.steps, batch=args.batch)
    num_pairs = PRESETS[preset]["num_pairs"] if args.num_pairs is None else args.num_pairs
    calibrate = default_calibrate(models[1], preset) if args.calibrate is None else args.calibrate
    run(models, args.out, num_pairs, sampler, args.seed, calibrate, args.overwrite)


if __name__ == "__main__":
    utils.run_main(main)
