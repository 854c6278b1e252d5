"""Estimate: activation memory of one training step of every stage at the paper's shapes and batch
sizes, counted on the `meta` device (no memory is allocated, no GPU needed).

    python tools/estimate_memory.py [--vqae-batch 8] [--diffusion-batch 8] [--registration-batch 8]

Counts the bytes of the tensors autograd saves for the backward pass (torch.autograd.graph.
saved_tensors_hooks), parameters excluded, each tensor once. The per-step registration loss frees
step 1's graph before step 2 runs, so its peak is the larger step.
Meta tensors run in fp32: on CUDA the UNets, the VQ-AE and the transformer run under fp16 autocast,
so the real figure is lower (measured peaks, weights and optimiser included: RESULTS.md, "Runs on a GPU").
Last line: `registration batch B: X GiB`.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's scripts and modules

import train_diffusion
import train_registration
import train_vqae
import utils
from models import RegistrationNet, TokenTransformer, VQAE

META = torch.device("meta")
GIB = 2 ** 30


class SavedBytes:
    """Context manager counting the bytes autograd saves; .peak is the most held at once, with
    .release() marking a backward pass that frees everything saved so far."""

    def __init__(self, params):
        self.params = {id(p) for p in params}
        self.seen, self.now, self.peak = set(), 0, 0

    def pack(self, t):
        if id(t) not in self.params and id(t) not in self.seen:
            self.seen.add(id(t))
            self.now += t.numel() * t.element_size()
            self.peak = max(self.peak, self.now)
        return t

    def release(self):
        self.seen, self.now = set(), 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def vqae(batch, patch=128):
    model = VQAE().to(META)
    with SavedBytes(model.parameters()) as s:
        x = torch.zeros(batch, 2, patch, patch, patch, device=META)
        logits, cb, _ = model(x)
        train_vqae.recon_loss(logits, x, soft=False) + train_vqae.CB_WEIGHT * cb
    return s.peak


def diffusion(batch):
    model = TokenTransformer().to(META)
    with SavedBytes(model.parameters()) as s:
        model.loss(torch.zeros(batch, model.seq_len, dtype=torch.long, device=META))
    return s.peak


def registration(batch):
    net = RegistrationNet().to(META)  # the paper configuration
    fixed = torch.zeros(batch, 1, *utils.grid_shape(train_registration.PRESETS["paper"]["factor"], utils.LUNG250M4B), device=META)
    reg = train_registration.REG
    with SavedBytes(net.parameters()) as s:
        _, v = train_registration.step_loss(net, 0, fixed, fixed, reg, META)
        s.release()  # step 1's backward frees its graph before step 2 runs
        with torch.no_grad():
            pair = net.halfway(v.detach(), fixed, fixed)
        train_registration.step_loss(net, 1, *pair, reg, META)
    return s.peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vqae-batch", type=int, default=8)
    ap.add_argument("--diffusion-batch", type=int, default=train_diffusion.PAPER_BATCH)
    ap.add_argument("--registration-batch", type=int, default=8)
    args = ap.parse_args(argv)
    if min(args.vqae_batch, args.diffusion_batch, args.registration_batch) < 1:
        raise utils.DataError("batch sizes must be >= 1")
    rows = [(f"VQ-AE batch {args.vqae_batch} of 128^3 patches", vqae(args.vqae_batch)),
            (f"diffusion batch {args.diffusion_batch} of 3328 tokens (math attention: meta saves the 3328^2 attention "
             f"maps; CUDA's flash kernel does not)", diffusion(args.diffusion_batch)),
            (f"registration batch {args.registration_batch}", registration(args.registration_batch))]
    print("saved activations of one training step (fp32 on meta; an upper bound for fp16 autocast):")
    for name, b in rows:
        print(f"{name}: {b / GIB:.1f} GiB")


if __name__ == "__main__":
    utils.run_main(main)
