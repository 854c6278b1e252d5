"""torchrun on the CPU: 2 processes (gloo, loopback) take the same steps and write the same files
as one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

import infer_vqae
import train_diffusion
import train_vqae
import utils
from conftest import ROOT
from models import TokenTransformer, VQAE

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def torchrun(*args, procs=2, timeout=600):
    """`torchrun --standalone --nproc-per-node 2 ARGS` (the rendezvous on a free loopback port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
           str(procs), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def single(*args):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def distance(a, b):
    """Euclidean distance between two dicts of tensors (same keys)."""
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def relative_error(a, b):
    return distance(a, b) / distance(b, {k: torch.zeros_like(v) for k, v in b.items()})


@pytest.fixture(scope="module")
def steps(phantoms, tmp_path_factory):
    """ddp_worker.py's results: one process (global batch 2) and two processes (1 each)."""
    one, two = (tmp_path_factory.mktemp(n) for n in ("one", "two"))
    single("tests/ddp_worker.py", phantoms, one)
    torchrun("tests/ddp_worker.py", phantoms, two)
    return [torch.load(one / "rank0.pt")] + [torch.load(two / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("stage", ["vqae", "diffusion", "registration"])
def test_two_processes_take_the_single_process_step(steps, stage):
    one, r0, r1 = (s[stage] for s in steps)
    assert set(one) == set(r0) == set(r1) and len(one) > 0
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP averaged: identical on both processes
    assert all(v.dtype == torch.float64 for v in one.values())  # the worker's exact-arithmetic run
    assert relative_error(r0, one) < 1e-10  # and equal to one process on the whole batch


def test_codebook_restart_keeps_codebooks_identical(steps):
    one, r0, r1 = steps
    assert r0["restarted"] == r1["restarted"] == 64  # codes 2, 3 mod 4: used by neither process
    assert one["restarted"] == 96  # one process: only codes 0 mod 4 were used
    assert torch.equal(r0["codebook"], r1["codebook"])


def test_checkpoint_of_two_processes_resumes_exactly_and_in_one(phantoms, tmp_path):
    """A torchrun checkpoint resumes under torchrun bit-identically to an uninterrupted run, has plain
    keys, and loads and resumes in the single-process scripts. (Across process counts the steps agree
    only up to the CPU's batch-1 vs batch-2 kernels, which Adam's 1/sqrt(v) can amplify to ~lr on
    small weights: that comparison is test_two_processes_take_the_single_process_step's, in float64.)"""
    ck = tmp_path / "reg.pth"
    common = ["train_registration.py", 2, phantoms, "--preset", "demo", "--seed", 3]
    torchrun(*common, "--iters", 1, "--out", ck)
    state = torch.load(ck, weights_only=True)
    assert state["iteration"] == 1 and not any(k.startswith("module.") for k in state["state"])
    torchrun(*common, "--iters", 2, "--out", ck, "--resume")
    torchrun(*common, "--iters", 2, "--out", tmp_path / "straight.pth")
    straight = torch.load(tmp_path / "straight.pth", weights_only=True)
    resumed = torch.load(ck, weights_only=True)
    assert resumed["iteration"] == 2 and all(torch.equal(resumed["state"][k], straight["state"][k]) for k in straight["state"])
    single(*common, "--iters", 3, "--out", ck, "--resume")
    once = torch.load(ck, weights_only=True)
    assert once["iteration"] == 3 and all(torch.isfinite(v).all() for v in once["state"].values())
    assert 0 < distance(once["state"], resumed["state"])  # it took a step from the checkpoint


@pytest.fixture(scope="module")
def generator(phantoms, tmp_path_factory):
    """Untrained demo VQ-AE and diffusion checkpoints and the VQ-AE's token file (only the plumbing
    matters here)."""
    d = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    config = train_vqae.config_of("demo", utils.LUNG250M4B)
    utils.save_checkpoint(str(d / "v.pth"), "vqae", config, VQAE.build(config).state_dict())
    infer_vqae.infer(str(d / "v.pth"), phantoms, str(d / "t.pth"))
    config = train_diffusion.config_of("demo", utils.read_tokens(str(d / "t.pth")))
    utils.save_checkpoint(str(d / "d.pth"), "diffusion", config, TokenTransformer.build(config).state_dict())
    return d


def test_sharded_synthesis_and_encoding_write_the_same_files(generator, phantoms, tmp_path):
    d = generator
    synth = ["synthesise.py", 5, "--preset", "demo", "--diffusion", d / "d.pth", "--vqae", d / "v.pth", "--batch", 2,
             "--steps", 4]
    single(*synth, "--out", tmp_path / "one")
    torchrun(*synth, "--out", tmp_path / "two")
    names = sorted(f for f in os.listdir(tmp_path / "one") if f.endswith(".nii.gz"))
    assert len(names) == 10 and names == sorted(f for f in os.listdir(tmp_path / "two") if f.endswith(".nii.gz"))
    for f in names:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    manifest = json.load(open(tmp_path / "two" / "manifest.json"))
    assert manifest["complete"] and manifest["pairs_made"] == 5
    encode = ["infer_vqae.py", d / "v.pth", "--data", phantoms, "--augment", 1]
    single(*encode, "--out", tmp_path / "t1.pth")
    torchrun(*encode, "--out", tmp_path / "t2.pth")
    one, two = (torch.load(tmp_path / f"t{k}.pth", weights_only=True) for k in (1, 2))
    assert len(one["case_ids"]) == 8 and one["case_ids"] == two["case_ids"]
    assert torch.equal(one["tokens"], two["tokens"])  # augmented copies included


def test_sharded_evaluation_gives_the_single_process_summary(phantoms, tmp_path):
    data = tmp_path / "three"  # an odd number of pairs: the processes evaluate 2 and 1
    (data / "landmarks").mkdir(parents=True)
    for c in ("case_000", "case_001", "case_002"):
        for k in (1, 2):
            os.symlink(os.path.join(phantoms, f"{c}_{k}.nii.gz"), data / f"{c}_{k}.nii.gz")
        os.symlink(os.path.join(phantoms, "landmarks", f"{c}.csv"), data / "landmarks" / f"{c}.csv")
    ev = ["evaluate_registration.py", 1, "none", "--preset", "demo", "--data", data]
    single(*ev, "--out", tmp_path / "one")
    torchrun(*ev, "--out", tmp_path / "two")
    one, two = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    assert one["num_pairs"] == 3 and one["num_landmarks"] > 0
    for k in ("seconds_per_pair", "checkpoint"):
        one.pop(k)
        two.pop(k)
    assert one == two
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
