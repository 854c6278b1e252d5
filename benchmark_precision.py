"""Benchmark: bf16 autocast vs fp32 on the CPU, one training step of every stage at a preset's
shapes, timed side by side (interleaved) in one run, and how far the bf16 step's loss and gradients
lie from the fp32 step's on the same batch and weights.

    python benchmark_precision.py [--data FOLDER] [--preset cpu] [--steps 5] [--batch 2] [--stages vqae registration ...]

Without --data it makes phantom pairs. bf16 only pays on CPUs that compute it natively
(utils.cpu_bf16(): AVX512-BF16 or AMX); elsewhere the numbers show what it costs. Last line:
`speedup: STAGE X.XX, ...` (fp32 seconds / bf16 seconds per step).
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

import decode_tokens
import train_diffusion
import train_registration
import train_vqae
import utils
from models import RegistrationNet, TokenDecoder, TokenTransformer, VQAE

STAGES = ("vqae", "diffusion", "registration", "decoder")  # decoder: decode_tokens.TokenDecoder


def frozen(params):
    """(optimiser, scheduler) that leave the weights as they are: every step computes the same."""
    opt = torch.optim.SGD(params, lr=0.0)
    return opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)


def grads(*modules):
    return torch.cat([p.grad.flatten().float() for m in modules for p in m.parameters() if p.grad is not None])


def steps(preset, pairs, batch):
    """{stage: (step() -> loss, modules)}: one training iteration of each stage at `preset`, through
    the stage scripts' own step functions, on fixed inputs and frozen weights."""
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    x = pairs[torch.arange(batch) % len(pairs)].float()
    out = {}

    utils.seed_all(0)
    vqae = VQAE.build(train_vqae.config_of(preset))
    opt, sched = frozen(vqae.parameters())
    xp = utils.pad_to_multiple(x, vqae.stride)[0]
    dw = train_vqae.PRESETS[preset].get("diff_weight", 0.0)
    out["vqae"] = (lambda: train_vqae.vqae_step(vqae, opt, scaler, sched, xp, True, dw)[0], [vqae])

    tokens = dict(grid_shape=vqae.token_grid(x.shape[2:]), num_codes=vqae.num_codes, factor=4)
    cfg = train_diffusion.config_of(preset, tokens)
    model = TokenTransformer.build(cfg)
    dopt, dsched = frozen(model.parameters())
    x0 = torch.randint(vqae.num_codes, (train_diffusion.PRESETS[preset]["batch"], cfg["model"]["seq_len"]),
                       generator=torch.Generator().manual_seed(0))

    def diffusion():
        torch.manual_seed(1)  # the same masks and dropout in both precisions
        return train_diffusion.diffusion_step(model, dopt, scaler, dsched, x0)
    out["diffusion"] = (diffusion, [model])

    net = RegistrationNet.build(train_registration.config_of(preset))
    ropts = [frozen(u.parameters())[0] for u in net.unets]
    cpu = torch.device("cpu")
    out["registration"] = (lambda: train_registration.train_step(net, ropts, scaler, x[:, :1], x[:, 1:],
                                                                 train_registration.REG, cpu)[0], [net])

    ref = dict(utils.REFERENCE_TOKENS)
    dcfg = decode_tokens.config_of(preset, ref)
    dec = TokenDecoder.build(dcfg)
    topt = frozen(dec.parameters())[0]
    grids = torch.randint(ref["num_codes"], (batch, *ref["grid_shape"]), generator=torch.Generator().manual_seed(0))
    dw_dec = decode_tokens.PRESETS[preset]["diff_weight"]  # the pairs are at the decoder's factor 4 (cpu, demo)
    out["decoder"] = (lambda: decode_tokens.decoder_step(dec, topt, scaler, grids, x, dw_dec), [dec])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--preset", default="cpu", choices=("cpu", "demo"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = ap.parse_args(argv)
    utils.check_positive({"--steps": args.steps, "--batch": args.batch})
    if args.data is None:
        import make_phantoms

        with tempfile.TemporaryDirectory() as tmp:
            make_phantoms.make_pairs(os.path.join(tmp, "phantoms"), 2, seed=1)
            pairs = utils.load_pairs(os.path.join(tmp, "phantoms"), 4, progress=False)[1]
    else:
        pairs = utils.load_pairs(args.data, 4, progress=False)[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {utils.cpu_bf16()}")
    ratios = []
    for name, (step, modules) in steps(args.preset, pairs, args.batch).items():
        if name not in args.stages:
            continue
        times, loss, grad = {False: [], True: []}, {}, {}
        for i in range(args.steps + 1):  # interleaved; step 0 = warm-up (oneDNN builds its kernels)
            for bf16 in (False, True):
                with utils.cpu_precision(bf16):
                    t = time.perf_counter()
                    value = step()
                    if i:
                        times[bf16].append(time.perf_counter() - t)
                loss[bf16], grad[bf16] = float(value), grads(*modules)
        fp32, bf16 = np.median(times[False]), np.median(times[True])
        dg = float((grad[True] - grad[False]).norm() / grad[False].norm())
        print(f"{name:14s} fp32 {fp32:.3f} s  bf16 {bf16:.3f} s  ratio {fp32 / bf16:.2f}  |  loss {loss[False]:.5f} vs "
              f"{loss[True]:.5f} (rel {abs(loss[True] - loss[False]) / abs(loss[False]):.1e}), gradient rel diff {dg:.1e}")
        ratios.append(f"{name} {fp32 / bf16:.2f}")
    print("speedup: " + ", ".join(ratios))


if __name__ == "__main__":
    utils.run_main(main)
