"""A class-conditional teacher through the train_teacher stage (issue 17): label dropout training,
the card, the per-class grid, and guided DDIM samples of class c that look like class c.

The toy data (tests.helpers.tiny_images) has two classes told apart by colour (a red or a blue
square), so the class of a sample is read off its colour: the fraction of samples of the asked
class is measured at 4 and 8 DDIM steps, unguided (w = 0) and guided (w = 1, 3). Measured on this
2-core box after 150 steps (~12 s of training): 1.00 at every setting, against 0.5 by chance;
the null label's (unconditional) samples are a mixture of both colours (about 1 in 5 red)."""

import subprocess
import sys

import pytest
import torch

from fewstep import models, samplers, storage
from tests.helpers import subprocess_env, tiny_params, write_params, write_prepared


def _colour_class(x: torch.Tensor) -> torch.Tensor:
    """0 for a red-dominated image, 1 for a blue one (the toy data's two classes)."""
    return (x[:, 2].mean((1, 2)) > x[:, 0].mean((1, 2))).long()


def test_the_stage_trains_a_conditional_teacher_whose_guided_samples_have_the_asked_class(tmp_path):
    write_prepared(tmp_path / "data", n=128)
    p = tiny_params(steps=150, lr=3e-3, checkpoint_every=150, log_every=50, conditioning={"p_uncond": 0.1})
    p["base"]["threads"] = 1
    p["teacher"]["sample"].update(n=4, guidance=1.0)
    write_params(tmp_path / "params.yaml", p)
    cmd = [sys.executable, "-m", "stages.train_teacher", "--params", str(tmp_path / "params.yaml"),
           "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
           "--checkpoints", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "metrics.json"),
           "--loss-csv", str(tmp_path / "loss.csv"), "--grid", str(tmp_path / "grid.png"), "--no-progress"]
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "grid.png").stat().st_size > 0
    card = models.load_card(tmp_path / "model")
    assert card.conditioning == models.Conditioning(2)
    assert storage.read_json(tmp_path / "model" / models.CONFIG)["conditioning"] == {"kind": "class", "num_classes": 2}

    torch.set_num_threads(1)
    den = models.load_denoiser(tmp_path / "model")
    n = 16
    labels = [i % 2 for i in range(2 * n)]
    for w in (0.0, 1.0, 3.0):
        for steps in (4, 8):
            x = samplers.generate("ddim", den, range(2 * n), card.image_shape, steps=steps, labels=labels, guidance=w)
            acc = (_colour_class(x) == torch.tensor(labels)).float().mean().item()
            assert acc >= 0.9, f"w={w} steps={steps}: only {acc:.2f} of the samples have the asked class"
    uncond = _colour_class(samplers.generate("ddim", den, range(2 * n), card.image_shape, steps=8))
    assert 0 < uncond.sum() < 2 * n  # the null label's model draws both classes


def test_a_guidance_scale_without_a_conditional_teacher_is_refused(tmp_path):
    from fewstep.math.guidance import GuidanceError

    with pytest.raises(GuidanceError, match="without class labels"):
        samplers.generate("ddim", object(), [0], (3, 8, 8), steps=2, guidance=1.0)
