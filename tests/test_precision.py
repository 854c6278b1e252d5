"""bf16 autocast on the CPU (utils.cpu_precision, --bf16): off unless asked, computes what fp32
computes up to bf16 rounding, keeps the sensitive parts in fp32; and benchmark_precision.py runs."""
import pytest
import torch

import benchmark_precision
import train_registration
import train_vqae
import utils
from models import RegistrationNet, VQAE

CPU = torch.device("cpu")


def test_fp32_keeps_float64_and_lifts_everything_else():
    assert utils.fp32(torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert utils.fp32(torch.zeros(2, dtype=torch.uint8)).dtype == torch.float32
    assert utils.fp32(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64


def test_cpu_precision_switches_autocast_and_restores_it():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)
    with utils.autocast(CPU):
        assert lin(x).dtype == torch.float32  # the default: fp32
    with utils.cpu_precision(True):
        with utils.autocast(CPU):
            assert lin(x).dtype == torch.bfloat16
        with utils.cpu_precision(False), utils.autocast(CPU):
            assert lin(x).dtype == torch.float32
        assert utils.CPU_BF16
    assert not utils.CPU_BF16
    with pytest.raises(RuntimeError), utils.cpu_precision(True):
        raise RuntimeError("an error inside the block")
    assert not utils.CPU_BF16  # restored on errors too


def test_bf16_registration_step_computes_the_fp32_step(phantoms):
    """The same batch and weights: bf16 rounds each UNet output by ~0.4 % (8 bits of mantissa); the
    velocity is the difference of two nearly equal outputs of the untrained net (tanh(o_ab) -
    tanh(o_ba)), which magnifies that ~20x (7 % measured; bound 25 %); the loss moves far less
    (bound 1 %); the fields come out fp32."""
    torch.manual_seed(0)
    net = RegistrationNet.build(train_registration.config_of("demo"))
    x = utils.load_pairs(phantoms, 4, progress=False)[1][:2].float()
    out = {}
    for bf16 in (False, True):
        with torch.no_grad(), utils.cpu_precision(bf16):
            loss, v = train_registration.step_loss(net, 0, x[:, :1], x[:, 1:], train_registration.REG, CPU)
        out[bf16] = loss, v
    (l32, v32), (l16, v16) = out[False], out[True]
    assert v16.dtype == torch.float32 and l16.dtype == torch.float32
    assert (v16 - v32).norm() < 0.25 * v32.norm()
    assert abs(float(l16 - l32)) < 0.01 * abs(float(l32))


def test_bf16_keeps_the_code_choice_of_fp32():
    """The quantiser's distances stay fp32 under bf16 autocast: codes a small step apart around a
    common centre (|z|^2 and z.e dwarf their differences, which bf16's 0.4 % rounding would drown)
    are picked exactly as in fp32."""
    torch.manual_seed(0)
    model = VQAE.build(train_vqae.config_of("demo"))
    centre = torch.randn(model.code_dim)
    model.codebook.weight.data = centre + 0.01 * torch.randn(model.num_codes, model.code_dim)
    z = (centre + 0.01 * torch.randn(2, 4, 4, 4, model.code_dim)).movedim(-1, 1)
    ids32 = model.quantise(z)[2]
    with utils.cpu_precision(True), utils.autocast(CPU):
        ids16 = model.quantise(z)[2]
    assert torch.equal(ids16, ids32)


def test_precision_benchmark_runs_and_reports(phantoms, capsys):
    benchmark_precision.main(["--data", phantoms, "--preset", "demo", "--steps", "1", "--batch", "1",
                              "--stages", "vqae", "decoder"])
    out = capsys.readouterr().out
    assert "vqae" in out and "decoder" in out and "registration " not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("speedup: vqae ") and float(last.split()[2].rstrip(",")) > 0


def test_checkpoints_record_their_precision(phantoms, tmp_path):
    """A checkpoint says whether it was trained under bf16 autocast (--bf16) or in fp32."""
    import train_diffusion

    tokens = str(tmp_path / "t.pth")
    utils.write_tokens(tokens, torch.randint(0, 4, (4, 4, 3, 4)), list("abcd"), 16, {"preset": "demo", "factor": 4})
    runs = {"vqae": (train_vqae, ["1", "--data", phantoms]), "regnet": (train_registration, ["1", phantoms]),
            "diffusion": (train_diffusion, ["2", tokens])}
    for kind, (script, args) in runs.items():
        for flags, want in (([], "fp32"), (["--bf16"], "bf16")):
            out = str(tmp_path / f"{kind}{want}.pth")
            script.main(args + ["--preset", "demo", "--iters", "1", "--out", out] + flags)
            assert utils.load_checkpoint(out, kind)["precision"] == want
            assert not utils.CPU_BF16  # the flag ends with the run
