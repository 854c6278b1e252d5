"""Stage 3: train the absorbing-diffusion transformer (models.TokenTransformer) on VQ token grids.

    python train_diffusion.py BATCH_SIZE TOKENS [--val TOKENS] [--vqae CKPT] [--preset paper|cpu|demo]
                              [--iters N] [--out CKPT] [--seed S] [--resume | --overwrite]

TOKENS: infer_vqae.py's file ({case_ids, tokens (N, L), grid_shape, config, ...}) or a plain list of
1-D token tensors of 3328 = 16x13x16 ids (codebook 1024; the format of paper_tokens_97.pth).
Each step: t ~ U{1..256}/256 per grid, every token masked with probability t, loss = the weighted
ELBO (models.TokenTransformer.weighted_elbo). --val: the same loss on held-out grids with fixed
draws of t and masks (comparable between runs). --vqae: a sampled pair is decoded into a figure.
Writes CKPT (kind 'diffusion': preset, token grid, codebook size, model kwargs), CKPT.csv, CKPT.png.
"""
import argparse
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import utils
from models import TokenTransformer, VQAE

PAPER_GRID, PAPER_CODES, PAPER_BATCH = (16, 13, 16), 1024, 8
# grid: token grid the preset's VQ-AE produces; codes None = the tokens file's codebook size.
# samples: iterations x batch (paper: 15000 * 8 // BATCH_SIZE iterations); val_repeats: draws per val grid
# reference_batches: the reference's training details - batches of distinct grids (randperm), the
# warm-up lr = base * i / warmup from i = 0, and the loss divided by ln2 * K * L (K times smaller than
# bits per token; Adam sees the scale only through its eps). Logs always show bits per token.
PRESETS = {
    "paper": dict(grid=PAPER_GRID, codes=PAPER_CODES, samples=15000 * 8, lr=1e-4, warmup=500, every=1000,
                  val_repeats=4, reference_batches=True, model={}),
    # 8x7x8 tokens of the cpu VQ-AE (64x52x64 padded to 64x56x64, stride 8); 750 iterations of batch 32
    # (~1.5 s each on 2 cores, 18 min: within the 2-hour budget of the whole cpu experiment; ~110 passes over 210 grids)
    "cpu": dict(grid=(8, 7, 8), codes=None, samples=24000, lr=5e-4, warmup=200, every=250, val_repeats=16,
                model=dict(dim=192, layers=4, heads=6, ff=384, attn_dropout=0.0)),
    "demo": dict(grid=(8, 7, 8), codes=None, samples=1600, lr=1e-3, warmup=20, every=50, val_repeats=4,
                 model=dict(dim=64, layers=2, heads=4, ff=128, attn_dropout=0.0)),
}
LOG_HEADER = ["iter", "loss", "val_loss", "lr", "seconds"]


def load_tokens(path, preset):
    """-> (tokens (N, L) long, grid_shape, num_codes, case ids, VQ-AE config or None); refuses a
    file whose grid or codebook does not match the preset."""
    if not os.path.exists(path):
        raise utils.DataError(f"{path}: token file not found")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise utils.DataError(f"{path}: not a readable token file")
    if isinstance(d, (list, tuple)):  # paper_tokens_97.pth: the reference VQ-AE's 16x13x16 grids
        if not d or any(not torch.is_tensor(t) or t.numel() != np.prod(PAPER_GRID) for t in d):
            raise utils.DataError(f"{path}: expected a list of token tensors of {np.prod(PAPER_GRID)} ids")
        d = {"tokens": torch.stack([t.reshape(-1) for t in d]), "grid_shape": PAPER_GRID, "num_codes": PAPER_CODES,
             "case_ids": [f"grid_{i:03d}" for i in range(len(d))]}
    if not isinstance(d, dict) or not {"tokens", "grid_shape"} <= set(d):
        raise utils.DataError(f"{path}: not a token file (no 'tokens' / 'grid_shape')")
    tokens, grid = d["tokens"].long().reshape(len(d["tokens"]), -1), tuple(int(g) for g in d["grid_shape"])
    codes = d.get("num_codes") or (d.get("config") or {}).get("model", {}).get("num_codes")
    if not codes:
        raise utils.DataError(f"{path}: codebook size unknown (no 'num_codes')")
    codes = int(codes)
    want = PRESETS[preset]
    if grid != tuple(want["grid"]) or tokens.shape[1] != np.prod(grid):
        raise utils.DataError(f"{path}: token grid {'x'.join(map(str, grid))} does not match the '{preset}' "
                              f"preset's {'x'.join(map(str, want['grid']))}")
    if want["codes"] and codes != want["codes"]:
        raise utils.DataError(f"{path}: codebook of {codes} codes, the '{preset}' preset needs {want['codes']}")
    if tokens.min() < 0 or tokens.max() >= codes:
        raise utils.DataError(f"{path}: token ids outside [0, {codes})")
    return tokens, grid, codes, list(d.get("case_ids", [])), d.get("config")


def model_config(preset, grid, codes):
    """Checkpoint config: preset, token grid, codebook size and the transformer's kwargs."""
    kw = dict(num_codes=codes, seq_len=int(np.prod(grid)), **PRESETS[preset]["model"])
    return {"preset": preset, "grid_shape": list(grid), "num_codes": codes, "model": kw}


def build(config):
    return TokenTransformer(**config["model"])


def load_diffusion(path, device=None):
    """(model in eval mode, checkpoint dict) from a diffusion checkpoint alone."""
    ck = utils.load_checkpoint(path, "diffusion")
    model = build(ck["config"])
    try:
        model.load_state_dict(ck["state"])
    except RuntimeError:
        raise utils.DataError(f"{path}: weights do not match the stored model config")
    return model.to(device or utils.get_device()).eval(), ck


def codebook_fingerprint(vqae):
    """A number that identifies a VQ-AE's codebook (tokens only mean something with their decoder)."""
    return float(vqae.codebook.weight.detach().cpu().double().abs().sum())


@torch.no_grad()
def val_loss(model, tokens, repeats, seed=1234, batch=16):
    """Mean weighted ELBO on held-out grids; fixed draws of t and masks, so runs are comparable."""
    was, dev = model.training, tokens.device
    model.eval()
    gen = torch.Generator(dev).manual_seed(seed)
    data = tokens.repeat(repeats, 1)
    total = 0
    with utils.autocast(dev):  # as training
        for x in data.split(batch):
            total = total + model.loss(x, gen) * len(x)
    model.train(was)
    return float(total) / len(data)


def figure(model, vqae, grid, size, rows, path, seed=0):
    """Loss curves and the coronal MIPs of two sampled pairs (fast sampler), decoded by the VQ-AE."""
    import matplotlib.pyplot as plt

    a = np.array([[np.nan if v == "" else float(v) for v in r] for r in rows])
    n = 0 if vqae is None else 2
    fig, ax = plt.subplots(1, 1 + n, figsize=(4.2 * (1 + n), 3.5), squeeze=False)
    ax[0, 0].plot(a[:, 0], a[:, 1], lw=0.6, label="train")
    ok = ~np.isnan(a[:, 2])
    ax[0, 0].plot(a[ok, 0], a[ok, 2], "o-", label="validation")
    ax[0, 0].set(title="weighted ELBO (bits / token)", xlabel="iteration", yscale="log"), ax[0, 0].legend()
    if vqae is not None:
        dev = next(model.parameters()).device
        ids = model.sample(n, steps=32, schedule="cosine", generator=torch.Generator(dev).manual_seed(seed))
        with torch.no_grad(), utils.autocast(dev):
            fp, mp = VQAE.pair_probs(vqae.decode_tokens(ids, grid), size)
        for i in range(n):
            ax[0, 1 + i].imshow(utils.mip_rgb(fp[i].cpu(), mp[i].cpu()))
            ax[0, 1 + i].set_title(f"sample {i} (fixed blue, moving orange)", fontsize=8), ax[0, 1 + i].axis("off")
    utils.save_figure(fig, path)


def diffusion_step(model, opt, scaler, sched, x0, loss_scale=1.0):
    """One training iteration on token grids x0 (B, L) -> loss in bits per token, on the device
    (no host synchronisation; a non-finite loss is skipped by the GradScaler on CUDA)."""
    with utils.autocast(x0.device):
        loss = model.loss(x0)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * loss_scale).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.detach()


def train(preset, tokens, out, batch, grid, codes, iters=None, val=None, vqae=None, seed=0, resume=False,
          overwrite=False, device=None, extra=None, compile=False):
    """Train on token grids (N, L); `val` (M, L) or None; `vqae` (model) for figures; `extra` is
    stored in the checkpoint (its 'factor': the VQ-AE's). Returns the model."""
    p, config = PRESETS[preset], model_config(preset, grid, codes)
    device = utils.get_device(device)
    iters = iters or p["samples"] // batch
    utils.seed_all(seed)
    model = build(config).to(device)
    utils.compile_modules([model], compile)
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    ref = p.get("reference_batches", False)
    warm = p["warmup"]
    if ref:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, i / warm))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    start, rows = 0, []
    if resume and os.path.exists(out):
        ck = utils.load_checkpoint(out, "diffusion", config)  # other preset / grid / codebook -> one-line error
        model.load_state_dict(ck["state"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        utils.load_scaler_state(scaler, ck["scaler"])
        start, rows, iters = ck["iteration"], ck["log"], ck["iters"]
    else:
        utils.check_output(out, overwrite)
    utils.seed_all(seed + start)
    gen = torch.Generator().manual_seed(seed + start)
    tokens = tokens.to(device)
    val = None if val is None else val.to(device)
    base, size = os.path.splitext(out)[0], utils.grid_shape((extra or {}).get("factor", 4))
    extra = {**(extra or {}), "vqae_fingerprint": codebook_fingerprint(vqae) if vqae is not None else None}
    loss_scale = 1 / codes if ref else 1.0

    def save(it):
        utils.save_checkpoint(out, "diffusion", config, model.state_dict(), optimizer=opt.state_dict(),
                              scheduler=sched.state_dict(), scaler=scaler.state_dict(), iteration=it, iters=iters,
                              batch=batch, seed=seed, log=rows, **extra)
        utils.write_csv(base + ".csv", LOG_HEADER, rows)
        figure(model, vqae, grid, size, rows, base + ".png", seed)

    t0, run = time.time() - (rows[-1][-1] if rows else 0), []
    bar = tqdm(range(start, iters), desc=f"diffusion {preset}", initial=start, total=iters)
    for it in bar:
        if ref and batch <= len(tokens):
            idx = torch.randperm(len(tokens), generator=gen)[:batch]
        else:
            idx = torch.randint(len(tokens), (batch,), generator=gen)
        x0 = tokens[idx.to(device, non_blocking=True)]
        run.append(diffusion_step(model, opt, scaler, sched, x0, loss_scale))
        if (it + 1) % p["every"] == 0 or it + 1 == iters:  # log, validate, checkpoint, figure (host syncs)
            losses = torch.stack(run).float()
            finite = torch.isfinite(losses)
            if not bool(finite.any()) or (device.type != "cuda" and not bool(finite.all())):
                raise RuntimeError(f"diffusion loss not finite before iteration {it + 1}")
            v = val_loss(model, val, p["val_repeats"]) if val is not None else ""
            rows.append([it + 1, float(losses[finite].mean()), v, sched.get_last_lr()[0], round(time.time() - t0, 1)])
            run = []
            bar.set_postfix(loss=f"{rows[-1][1]:.4f}")
            if v != "":
                tqdm.write(f"iter {it + 1}: train {rows[-1][1]:.4f}  val {v:.4f} bits/token")
            save(it + 1)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("batch_size", type=int)
    ap.add_argument("tokens", help="token file of the training pairs (infer_vqae.py output or a list)")
    ap.add_argument("--val", help="token file of held-out pairs (validation loss)")
    ap.add_argument("--vqae", help="VQ-AE checkpoint that made the tokens: decoded samples in the figure")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--iters", type=int, help="default: preset samples // BATCH_SIZE")
    ap.add_argument("--out", help="checkpoint (default diffusion_<preset>.pth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from --out")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--device", help="e.g. cuda:1 (default: cuda if available, else cpu)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the network(s) in place, as the reference does (checkpoints unchanged)")
    a = ap.parse_args(argv)
    if a.batch_size < 1 or (a.iters is not None and a.iters < 1):
        raise utils.DataError("BATCH_SIZE and --iters must be positive")
    out = a.out or f"diffusion_{a.preset}.pth"
    if not a.resume:
        utils.check_output(out, a.overwrite)
    tokens, grid, codes, ids, tok_cfg = load_tokens(a.tokens, a.preset)
    val = load_tokens(a.val, a.preset) if a.val else None
    if val and val[1:3] != (grid, codes):
        raise utils.DataError(f"{a.val}: codebook size differs from {a.tokens}")
    val = val and val[0]
    vqae, factor = None, (tok_cfg or {}).get("factor", 1 if grid == PAPER_GRID else 4)
    if a.vqae:
        from infer_vqae import load_vqae

        vqae, vcfg = load_vqae(a.vqae, device=utils.get_device(a.device))
        factor = vcfg["factor"]
        if vqae.token_grid(utils.grid_shape(factor)) != grid or vqae.num_codes != codes:
            raise utils.DataError(f"{a.vqae}: VQ-AE grid / codebook differ from the tokens in {a.tokens}")
    print(f"{len(tokens)} token grids {'x'.join(map(str, grid))} ({codes} codes, {len(torch.unique(tokens))} used)"
          + (f", {len(val)} validation grids" if val is not None else ""))
    extra = {"tokens": os.path.abspath(a.tokens), "case_ids": ids, "factor": factor,
             "vqae": a.vqae and os.path.abspath(a.vqae)}
    model = train(a.preset, tokens, out, a.batch_size, grid, codes, a.iters, val, vqae, a.seed, a.resume, a.overwrite,
          device=a.device, extra=extra, compile=a.compile)
    print(f"wrote {out}{utils.peak_memory(model.pos.device)}")


if __name__ == "__main__":
    utils.run_main(main)
