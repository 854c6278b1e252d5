"""Run by test_distributed.py, under torchrun or as one process: one step of each training stage
on the same global batch, through the stage scripts' own step, batch-drawing and augmentation
functions, with a zero learning rate so the gradients stay to be compared. Then a codebook restart
with a different code usage per process. Writes OUT/rank{R}.pt = {stage: {name: grad}, 'codebook'}.

Everything runs in float64: two processes convolve batches of 1 where one process convolves a batch
of 2, and in float32 a CPU may take other kernels (other summation orders) for the two, which moves
the gradients by ~1e-3 relative on some CPUs. In float64 the same rounding differences are ~1e-16
relative per operation, so "the same gradients" can be asserted at 1e-10 on any CPU.

    python tests/ddp_worker.py PAIRS OUT
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_diffusion  # noqa: E402
import train_registration  # noqa: E402
import train_vqae  # noqa: E402
import utils  # noqa: E402
from models import RegistrationNet, TokenTransformer, VQAE  # noqa: E402

BATCH = 2  # the global batch: 1 per process under torchrun --nproc-per-node 2


def grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def frozen(params):
    """(optimiser, scheduler) that leave the parameters as they are: the gradients are the result."""
    opt = torch.optim.SGD(params, lr=0.0)
    return opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)


def main(data, out):
    torch.set_default_dtype(torch.float64)  # models, draws and fields in float64 (see above)
    rank, procs, device = utils.distributed("cpu")
    local = utils.local_batch(BATCH)
    part = slice(rank * local, (rank + 1) * local)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    result = {}

    utils.seed_all(0)
    vqae = VQAE.build(train_vqae.config_of("demo", utils.LUNG250M4B))
    opt, sched = frozen(vqae.parameters())
    pairs = train_vqae.load_data(data, 4, utils.LUNG250M4B).double()
    x = train_vqae.sample_batch(pairs, BATCH, None, torch.Generator().manual_seed(0), part)
    x = utils.augment(x, generator=torch.Generator().manual_seed(0), share=(rank, procs))
    train_vqae.vqae_step(vqae, opt, scaler, sched, x, True, 0.0, utils.parallel(vqae, device))
    result["vqae"] = grads(vqae)
    seen = torch.zeros(vqae.num_codes, dtype=torch.bool)
    seen[rank::4] = True  # each process used other codes; codes 2, 3 (mod 4) were used by none
    result["restarted"] = train_vqae.restart_dead_codes(vqae, seen)
    result["codebook"] = vqae.codebook.weight.detach().clone()

    utils.seed_all(0)
    x0 = torch.randint(32, (BATCH, 448), generator=torch.Generator().manual_seed(0)) * 4  # 32 of 128 codes
    tokens = dict(grid_shape=(8, 7, 8), num_codes=128, factor=4, tokens=x0, frame=utils.LUNG250M4B)
    config = train_diffusion.config_of("demo", tokens)  # compact: the vocab's buffers go through DDP too
    config["model"]["dropout"] = 0.0  # dropout masks are drawn per process: alike in law, not in value
    model = TokenTransformer.build(config)
    opt, sched = frozen(model.parameters())
    train_diffusion.diffusion_step(model, opt, scaler, sched, x0[part], 1.0, utils.parallel(model, device))
    result["diffusion"] = grads(model)

    reg_pairs = utils.load_pairs(data, train_registration.PRESETS["demo"]["factor"], utils.LUNG250M4B)[1]
    utils.seed_all(0)
    net = RegistrationNet.build(train_registration.config_of("demo", utils.LUNG250M4B)).parallel(device)
    opts = [frozen(u.parameters())[0] for u in net.unets]
    xr = reg_pairs[:BATCH][part].double()
    train_registration.train_step(net, opts, scaler, xr[:, :1], xr[:, 1:], train_registration.REG, device)
    result["registration"] = grads(net)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    utils.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
