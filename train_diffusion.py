"""Stage 3: train the absorbing-diffusion transformer (models.TokenTransformer) on VQ token grids.

    python train_diffusion.py [BATCH_SIZE] TOKENS [--val TOKENS] [--vqae CKPT | --decoder CKPT] [--preset paper|cpu|demo]
                              [--iters N] [--out CKPT] [--seed S] [--resume | --overwrite]

TOKENS: infer_vqae.py's file ({case_ids, tokens (N, L), grid_shape, config, ...}) or a plain list of
1-D token tensors of 3328 = 16x13x16 ids (codebook 1024; the format of paper_tokens_97.pth).
Each step: t ~ U{1..256}/256 per grid, every token masked with probability t, loss = the weighted
ELBO (models.TokenTransformer.weighted_elbo). --val: the same loss on held-out grids with fixed
draws of t and masks (comparable between runs). --vqae: a sampled pair is decoded into a figure
(--decoder: by decode_tokens.py's decoder, for tokens without a VQ-AE; synthesise.py then uses it).
Writes CKPT (kind 'diffusion': preset, factor, frame and token grid of the tokens, model kwargs), CKPT.csv, CKPT.png.
"""
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import utils
from models import TokenTransformer, load_decoder, model_config

PAPER_BATCH = 8
# The token grid, codebook size and data factor come from the token file (utils.read_tokens).
# samples: iterations x batch (paper: 15000 * 8 // BATCH_SIZE iterations); val_repeats: draws per val grid
# reference_batches: the reference's training details - batches of distinct grids (randperm), the
# warm-up lr = base * i / warmup from i = 0, and the loss divided by ln2 * K * L (K times smaller than
# bits per token; Adam sees the scale only through its eps). Logs always show bits per token.
PRESETS = {
    "paper": dict(samples=15000 * PAPER_BATCH, batch=PAPER_BATCH, lr=1e-4, warmup=500, every=1000, val_repeats=4,
                  reference_batches=True, model={}),
    # a 4-layer, 192-wide transformer for the 8x7x8 tokens of the cpu VQ-AE. max_positions (not in the
    # paper): a larger grid (the reference's 16x13x16) takes one position per 2x2x2 block of tokens
    # (TokenTransformer's group), which keeps the 448 positions the cpu preset's attention is sized for
    # compact (not in the paper): the model predicts only the codes its grids use (TokenTransformer's
    # vocab): training would only push a code no grid holds towards zero probability; the head shrinks
    "cpu": dict(samples=24000, batch=32, lr=5e-4, warmup=200, every=250, val_repeats=16, max_positions=448,
                compact=True, model=dict(dim=192, layers=4, heads=6, ff=384, attn_dropout=0.0)),
    "demo": dict(samples=1600, batch=16, lr=1e-3, warmup=20, every=50, val_repeats=4, max_positions=448,
                 compact=True, model=dict(dim=64, layers=2, heads=4, ff=128, attn_dropout=0.0)),
}
LOG_FIELDS = ["iter", "loss", "val_loss", "lr", "seconds"]


def read_tokens(path, preset):
    """utils.read_tokens, refusing tokens of a VQ-AE trained at another preset."""
    d = utils.read_tokens(path)
    made_by = (d["config"] or {}).get("preset")
    if made_by is not None and made_by != preset:
        raise utils.DataError(f"{path}: tokens of a '{made_by}' VQ-AE, not of the '{preset}' preset")
    return d


def config_of(preset, tokens):
    """Checkpoint config: preset, the tokens' frame factor and grid, the transformer's kwargs (with
    the smallest block grouping that keeps the preset's max_positions, and with `compact` the codes
    of the training grids as vocab - never the validation grids': they are held out; neither at
    paper). tokens: a utils.read_tokens dict (without 'tokens', e.g. utils.REFERENCE_TOKENS: the
    shapes alone, every code)."""
    grid = list(tokens["grid_shape"])
    kw = dict(num_codes=tokens["num_codes"], seq_len=int(np.prod(grid)), **PRESETS[preset]["model"])
    if PRESETS[preset].get("compact") and "tokens" in tokens:
        kw.update(vocab=torch.unique(tokens["tokens"]).tolist())
    limit = PRESETS[preset].get("max_positions")
    group = 1
    while limit and np.prod([-(-n // group) for n in grid]) > limit:
        group *= 2
    if group > 1:
        kw.update(grid_shape=grid, group=group)
    classes = ((tokens.get("config") or {}).get("model") or {}).get("classes", 1)  # of the VQ-AE that made them
    return model_config(preset, tokens["factor"], kw, grid_shape=grid, frame=tokens["frame"],
                        **({"classes": classes} if classes > 1 else {}))


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


def figure(model, vqae, grid, rows, path, seed=0):
    """Loss curves and the coronal MIPs of two sampled pairs (fast sampler), decoded by `vqae` (a
    VQAE or TokenDecoder; None: curves only); grid: the token grid (h, w, d)."""
    import matplotlib.pyplot as plt

    col = {h: np.array([np.nan if r[h] == "" else float(r[h]) for r in rows]) for h in LOG_FIELDS}
    n = 0 if vqae is None else 2
    fig, ax = plt.subplots(1, 1 + n, figsize=(4.2 * (1 + n), 3.5), squeeze=False)
    ax[0, 0].plot(col["iter"], col["loss"], lw=0.6, label="train")
    ok = ~np.isnan(col["val_loss"])
    ax[0, 0].plot(col["iter"][ok], col["val_loss"][ok], "o-", label="validation")
    ax[0, 0].set(title="weighted ELBO (bits / token)", xlabel="iteration", yscale="log")
    ax[0, 0].legend()
    if vqae is not None:
        dev = next(model.parameters()).device
        ids = model.sample(n, steps=32, schedule="cosine", generator=torch.Generator(dev).manual_seed(seed))
        with torch.no_grad(), utils.autocast(dev):
            fixed, moving = vqae.decode_pair(ids.reshape(-1, *grid), utils.grid_shape(vqae.config["factor"], vqae.config["frame"]),
                                             foreground=True)
        for i in range(n):
            ax[0, 1 + i].imshow(utils.mip_rgb(fixed[i].cpu(), moving[i].cpu()))
            ax[0, 1 + i].set_title(f"sample {i} (fixed blue, moving orange)", fontsize=8)
            ax[0, 1 + i].axis("off")
    utils.save_figure(fig, path)


def diffusion_step(model, opt, scaler, sched, x0, loss_scale=1.0, net=None):
    """One training iteration on token grids x0 (B, L) -> loss in bits per token, on the device
    (no host synchronisation; a non-finite loss is skipped by the GradScaler on CUDA). net: what
    runs the model (its DistributedDataParallel wrapper under torchrun)."""
    with utils.autocast(x0.device):
        loss = model.loss(x0, net=net, share=utils.world())
    utils.optimiser_step(loss * loss_scale, opt, scaler)
    sched.step()
    return loss.detach()


def train(*, data, out, preset, batch_size, iters=None, seed=0, resume=False, overwrite=False, val=None, vqae=None,
          device=None, compile=False, decoder=None):
    """Train on the token grids of the token file `data` (`val`: held-out token file; `vqae`: the
    VQ-AE checkpoint that made the tokens, or `decoder` a TokenDecoder's, for decoded samples in the
    figure and as synthesise.py's default). Returns the model."""
    p = PRESETS[preset]
    # warm-up, then a constant rate: a larger --iters simply trains on to the new target
    ck, batch_size, seed = utils.start_training(out, "diffusion", resume=resume, overwrite=overwrite,
                                                batch_size=batch_size, seed=seed, iters=iters, default_batch=p["batch"],
                                                outputs=utils.log_paths(out), tokens=os.path.abspath(data))
    tokens = read_tokens(data, preset)
    grid, codes = tokens["grid_shape"], tokens["num_codes"]
    val_tokens = None
    if val:
        v = read_tokens(val, preset)
        if (v["grid_shape"], v["num_codes"], v["frame"]) != (grid, codes, tokens["frame"]):
            raise utils.DataError(f"{val}: token grid, codebook size or frame differs from {data}")
        val_tokens = v["tokens"]
    config = config_of(preset, tokens)
    if ck is not None:
        utils.check_config(out, ck, config)  # other preset / grid / codebook -> one-line error
        iters = iters or ck["iters"]
    rank, _, device = utils.distributed(device)
    local = utils.local_batch(batch_size)
    vqae_model = None
    if vqae or decoder:
        vqae_model = load_decoder(grid, codes, vqae, decoder, device, config.get("classes", 1))
    vocab = config["model"].get("vocab", range(codes))
    unseen = 0 if val_tokens is None else float((~torch.isin(val_tokens, torch.as_tensor(vocab))).float().mean())
    utils.main_print(f"{len(tokens['tokens'])} token grids {'x'.join(map(str, grid))} ({codes} codes, "
          f"{len(torch.unique(tokens['tokens']))} used; the model predicts {len(vocab)})"
          + (f", {len(val_tokens)} validation grids ({100 * unseen:.2f} % of their tokens outside the vocab: "
             "the validation loss leaves them out)" if val else ""))
    iters = iters or p["samples"] // batch_size
    utils.seed_all(seed)
    model = TokenTransformer.build(config).to(device)
    utils.compile_modules([model], compile)
    net = utils.parallel(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    ref = p.get("reference_batches", False)
    warm = p["warmup"]
    if ref:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, i / warm))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    utils.seed_all(seed)
    gen = torch.Generator().manual_seed(seed)
    start, rows = 0, []
    if ck is not None:
        utils.resume_state(ck, out, model, opt, sched, scaler)  # ck: read and checked above
        utils.set_rng_state(ck["rng"], [gen])
        start, rows = ck["iteration"], ck["log"]
    train_tokens = tokens["tokens"].to(device)
    val_tokens = None if val_tokens is None else val_tokens.to(device)
    base = os.path.splitext(out)[0]
    extra = {"tokens": os.path.abspath(data), "case_ids": tokens["case_ids"], "vqae": vqae and os.path.abspath(vqae),
             "vqae_fingerprint": vqae_model.fingerprint() if vqae and not decoder else None,
             "decoder": decoder and os.path.abspath(decoder)}
    loss_scale = 1 / codes if ref else 1.0

    def save(it):
        if not utils.is_main():
            return utils.barrier()  # one writer; nobody reads before it has written
        utils.save_checkpoint(out, "diffusion", config, model.state_dict(), optimizer=opt.state_dict(),
                              scheduler=sched.state_dict(), scaler=scaler.state_dict(), iteration=it, iters=iters,
                              batch=batch_size, seed=seed, log=rows, rng=utils.rng_state([gen]),
                              precision=utils.precision(device), **extra)
        utils.write_csv(base + ".csv", LOG_FIELDS, rows)
        figure(model, vqae_model, grid, rows, base + ".png", seed)
        utils.barrier()

    t0 = time.time() - (rows[-1]["seconds"] if rows else 0)
    run = []
    bar = tqdm(range(start, iters), desc=f"diffusion {preset}", initial=start, total=iters, disable=not utils.is_main())
    for it in bar:
        if ref and batch_size <= len(train_tokens):
            idx = torch.randperm(len(train_tokens), generator=gen)[:batch_size]
        else:
            idx = torch.randint(len(train_tokens), (batch_size,), generator=gen)
        idx = idx[rank * local:(rank + 1) * local]  # the global batch's draws, this process's share
        x0 = train_tokens[idx.to(device, non_blocking=True)]
        run.append(diffusion_step(model, opt, scaler, sched, x0, loss_scale, net))
        if (it + 1) % p["every"] == 0 or it + 1 == iters:  # log, validate, checkpoint, figure (host syncs)
            losses = torch.stack(run).float()
            finite = torch.isfinite(losses)
            total, n_finite, n_bad = utils.all_mean([losses[finite].sum(), finite.sum(), (~finite).sum()], device)
            if n_finite == 0 or (device.type != "cuda" and n_bad > 0):
                raise RuntimeError(f"diffusion loss not finite before iteration {it + 1}")
            main_val = val_tokens is not None and utils.is_main()
            v = val_loss(model, val_tokens, p["val_repeats"]) if main_val else ""
            mean = float(losses[finite].mean()) if utils.world()[1] == 1 else total / n_finite
            rows.append({"iter": it + 1, "loss": mean, "val_loss": v,
                         "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)})
            run = []
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
            if v != "":
                tqdm.write(f"iter {it + 1}: train {rows[-1]['loss']:.4f}  val {v:.4f} bits/token")
            save(it + 1)
    return model


def main(argv=None):
    ap = utils.training_parser(__doc__, PRESETS, "diffusion_<preset>.pth")
    ap.add_argument("tokens", help="token file of the training pairs (infer_vqae.py output or a list)")
    ap.add_argument("--val", help="token file of held-out pairs (validation loss)")
    ap.add_argument("--vqae", help="VQ-AE checkpoint that made the tokens: decoded samples in the figure")
    ap.add_argument("--decoder", help="decode_tokens.py decoder of the tokens (instead of --vqae)")
    args = ap.parse_args(argv)
    out = args.out or f"diffusion_{args.preset}.pth"
    model = train(data=args.tokens, out=out, preset=args.preset, batch_size=args.batch_size, iters=args.iters,
                  seed=args.seed, resume=args.resume, overwrite=args.overwrite, val=args.val, vqae=args.vqae,
                  device=args.device, compile=args.compile, decoder=args.decoder)
    utils.main_print(f"wrote {out}{utils.peak_memory(model.pos.device)}")


if __name__ == "__main__":
    utils.run_main(main)
