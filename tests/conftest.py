"""Shared fixtures: repo paths, the shared real data (tests skip without it), phantom pairs,
and a runner for the scripts as a user calls them."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "lung250m4b")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED):
        pytest.skip("real Lung250M-4B data (../shared/data/lung250m4b) not present")
    return SHARED


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """4 phantom pairs at 4 mm with exact landmarks (made once per test session)."""
    import make_phantoms

    out = str(tmp_path_factory.mktemp("phantoms") / "pairs")
    make_phantoms.make_pairs(out, 4, seed=0)
    return out


def run_script(*args, cwd=ROOT, timeout=600):
    """Run `python SCRIPT ARGS` like a user; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def micro(monkeypatch):
    """The demo preset with a handful of iterations per stage (seconds instead of minutes), one
    thread (tiny models on a shared 2-core machine)."""
    import pipeline
    import torch
    import train_diffusion
    import train_registration
    import train_vqae
    import utils

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(train_vqae.PRESETS, "demo", dict(train_vqae.PRESETS["demo"], samples=16, val_every=4))
    monkeypatch.setitem(train_diffusion.PRESETS, "demo", dict(train_diffusion.PRESETS["demo"], samples=64))
    monkeypatch.setitem(train_registration.PRESETS, "demo", dict(train_registration.PRESETS["demo"], iters=3))
    monkeypatch.setattr(utils, "FIELD_CALIBRATION", 1)  # the free baselines' calibration: one quick registration
    monkeypatch.setitem(pipeline.PRESETS, "demo", dict(pipeline.PRESETS["demo"], tta=2, augment=1, n_train=3,
                                                        n_val=2))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run():
    return run_script


def assert_one_line_error(proc, *needles):
    """Bad input: non-zero exit, a single `error:` line naming the file/problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in err[-1], (n, err[-1])
