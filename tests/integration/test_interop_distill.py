"""Progressive distillation rounds on an imported diffusers teacher (fewstep.train.distill, unchanged):
the student is a copy of the diffusers network, saves and resumes through the same family, carries the
source's lineage, and its export reproduces fewstep's samples in a diffusers DDIMPipeline."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fewstep import models, storage  # noqa: E402
from fewstep.config import DistillRoundParams  # noqa: E402
from fewstep.interop import unet2d  # noqa: E402
from fewstep.math.ddim import sample_ddim  # noqa: E402
from fewstep.math.schedules import timesteps  # noqa: E402
from fewstep.train.distill import distill_round  # noqa: E402
from tests.helpers import write_prepared  # noqa: E402


def test_distillation_rounds_on_an_imported_teacher(tmp_path, torch_one_thread):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, dropout=0.1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "src")
    teacher = unet2d.import_teacher(tmp_path / "src", tmp_path / "teacher")
    write_prepared(tmp_path / "data", size=16, n=32)
    dev = torch.device("cpu")

    rp = DistillRoundParams(parent="teacher", steps=2, train_steps=4, batch_size=8, weighting="snr+1", ema_decay=0.9,
                            checkpoint_every=2, log_every=2, hflip=False)
    _, s2 = distill_round(tmp_path / "teacher", tmp_path / "s2", tmp_path / "ck2", tmp_path / "data", 2, rp, 0, dev,
                          progress=False)
    assert s2.family == "diffusers-unet2d" and s2.sample_steps == 2 and s2.role == "student"
    assert s2.arch.config["dropout"] == 0.0 and teacher.arch.config["dropout"] == 0.1  # the student's dropout is off
    assert s2.lineage.source == teacher.lineage.source and s2.lineage.parent.weights_sha256 == teacher.weights_sha256
    assert storage.load_tensors(tmp_path / "s2" / models.WEIGHTS).keys() == \
        storage.load_tensors(tmp_path / "teacher" / models.WEIGHTS).keys()  # the UNet's own keys
    # a finished round resumes from its checkpoint (the adapter's state dict round trips) to the same weights
    result, again = distill_round(tmp_path / "teacher", tmp_path / "s2b", tmp_path / "ck2", tmp_path / "data", 2, rp,
                                  0, dev, progress=False)
    assert result.resumed_from == 4 and again.weights_sha256 == s2.weights_sha256

    rp1 = DistillRoundParams(parent="s2", steps=1, train_steps=2, batch_size=8, weighting="snr+1", checkpoint_every=2,
                             log_every=2, hflip=False)
    _, s1 = distill_round(tmp_path / "s2", tmp_path / "s1", tmp_path / "ck1", tmp_path / "data", 1, rp1, 0, dev,
                          progress=False)
    assert s1.lineage.parent.sample_steps == 2 and s1.lineage.source["sha256"] == teacher.lineage.source["sha256"]

    out = unet2d.export_unet2d(tmp_path / "s1", tmp_path / "export")
    assert storage.read_json(out / unet2d.EXPORT_INFO)["steps"] == 1
    pipe = diffusers.DDIMPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=1,
                  output_type="pt").images
    x_T = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    ours = sample_ddim(models.load_denoiser(tmp_path / "s1"), x_T, timesteps(1000, 1), clip=False)
    assert (theirs - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-4
