"""base.cpu_bf16 / base.channels_last (issue 19.1): native-bf16 detection, params validation, and
that the CPU default (auto on a CPU without native bf16) trains bitwise as float32 always did."""

from __future__ import annotations

import pytest
import torch

from fewstep import models, storage
from fewstep.config import ParamsError, validate
from fewstep.math import precision
from fewstep.math.param import NetDenoiser, full_precision
from fewstep.math.schedules import make_schedule
from fewstep.nets.unet import UNet, UNetConfig
from fewstep.train.teacher import run_hash, train_teacher
from tests.helpers import tiny_params, write_prepared

# /proc/cpuinfo flag lines, abridged
EPYC_AVX2 = "flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni"
ZEN4 = "flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f avx512_fp16 amx_bf16 amx_tile amx_int8 avx512_bf16"
SKYLAKE_X = "flags\t\t: fpu avx2 avx512f avx512dq avx512cd avx512bw avx512vl"  # AVX-512 without BF16
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm svebf16"


@pytest.mark.parametrize("text, native", [(EPYC_AVX2, False), (ZEN4, True), (SAPPHIRE, True), (SKYLAKE_X, False),
                                          (GRAVITON3, True), ("", False)])
def test_native_bf16_from_cpuinfo(text, native):
    assert precision.native_bf16(text) is native
    assert precision.native_bf16(precision.parse_cpu_flags(text)) is native  # the flag set itself


def test_a_scalar_torch_build_is_not_native_and_capability_alone_is_not_enough():
    assert not precision.native_bf16(SAPPHIRE, capability="DEFAULT")  # ATEN_CPU_CAPABILITY=default
    assert precision.native_bf16(SAPPHIRE, capability="AVX512")
    assert not precision.native_bf16(SKYLAKE_X, capability="AVX512")
    assert precision.native_bf16("avx2 avx512_bf16")  # plain flag names


def test_auto_resolves_to_native_only():
    assert precision.resolve_cpu_bf16("auto", native=precision.native_bf16(EPYC_AVX2, "AVX2")) is False
    assert precision.resolve_cpu_bf16("auto", native=precision.native_bf16(ZEN4, "AVX512")) is True
    assert precision.resolve_cpu_bf16(True, native=False) is True
    assert precision.resolve_cpu_bf16(False, native=True) is False
    with pytest.raises(ValueError):
        precision.resolve_cpu_bf16("sometimes")


def test_detect_reads_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("model name\t: Test CPU\n" + ZEN4 + "\n")
    info = precision.detect.__wrapped__(str(f))
    assert info.native_bf16 == (info.capability.upper() not in ("DEFAULT", "NO AVX"))
    assert info.bf16_flags == ("avx512_bf16",) and info.model == "Test CPU"
    assert not precision.detect.__wrapped__(str(tmp_path / "missing")).native_bf16


def test_params_validate_the_switch_and_keep_old_hashes():
    p = tiny_params()
    p["base"]["cpu_bf16"] = "sometimes"
    with pytest.raises(ParamsError, match="base.cpu_bf16"):
        validate(p)
    q = tiny_params()
    for v, want in (("auto", "auto"), (True, True), ("false", False)):
        q["base"]["cpu_bf16"] = v
        assert validate(q).base.cpu_bf16 == want
    q["base"].pop("cpu_bf16")
    q["base"].pop("channels_last")
    old = validate(q)
    assert "cpu_bf16" not in old.base.model_dump()  # at its default, left out: hashes do not move
    q["base"].update(cpu_bf16=True, channels_last=True)
    new = validate(q)
    assert run_hash(new, "d") == run_hash(old, "d")  # how it computes, not what (like device, threads)


def _den(cpu_autocast=None) -> NetDenoiser:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          head_dim=8, dropout=0.0))
    for prm in net.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    return NetDenoiser(net.eval(), make_schedule("cosine", 64), "v", cpu_autocast=cpu_autocast)


def test_net_denoiser_follows_the_policy_and_full_precision_overrides_it():
    den, forced_off = _den(), _den(cpu_autocast=False)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(4, 3, 8, 8, generator=g), torch.randint(1, 65, (4,), generator=g)
    with torch.no_grad():
        ref = den(z, t)
        with precision.using(bf16=True):
            amp = den(z, t)
            assert not torch.equal(amp, ref) and float((amp - ref).norm() / ref.norm()) < 5e-2
            assert torch.equal(forced_off(z, t), ref)
            with full_precision(den):
                assert torch.equal(den(z, t), ref)
        with precision.using(channels_last=True):
            assert torch.allclose(den(z, t), ref, atol=1e-5)
        assert torch.equal(den(z, t), ref)  # the policy came back


def _train(tmp_path, name: str, p: dict) -> str:
    data = tmp_path / "data"
    if not data.exists():
        write_prepared(data)
    params = validate(p)
    precision.configure_from(params.base)
    try:
        _, card = train_teacher(params, data, tmp_path / name / "model", tmp_path / name / "ck",
                                torch.device("cpu"), progress=False)
    finally:
        precision.configure()
    return card.weights_sha256


def test_the_cpu_default_trains_bitwise_as_float32_on_avx2(tmp_path, monkeypatch, torch_one_thread):
    avx2 = precision.CpuInfo("AVX2", (), precision.native_bf16(EPYC_AVX2, "AVX2"))
    monkeypatch.setattr(precision, "detect", lambda *a: avx2)
    p = tiny_params(steps=4, checkpoint_every=4, log_every=2, batch_size=8)
    shas = {}
    for setting in ("auto", False, True):
        p["base"]["cpu_bf16"] = setting
        shas[setting] = _train(tmp_path, str(setting), p)
    assert shas["auto"] == shas[False]
    assert shas[True] != shas[False]  # the control: bf16 forwards do change the weights
    assert storage.sha256_file(tmp_path / "auto" / "model" / models.WEIGHTS) == shas["auto"]
