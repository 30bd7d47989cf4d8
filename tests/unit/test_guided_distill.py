"""Progressive distillation of a class-conditional, guided teacher (issue 17; Meng et al. 2023, stage
two at a fixed w): the round's guidance, the target (two guided DDIM steps of the teacher), the
student (a conditional copy of the teacher), its card's ``guidance`` and the sampling refusal."""

from __future__ import annotations

import pytest
import torch

from fewstep import models, samplers
from fewstep.config import DistillRoundParams, ParamsError, validate
from fewstep.errors import UserError
from fewstep.math.ddim import sample_ddim
from fewstep.math.distill import ddim_to, distill_target_path
from fewstep.math.guidance import GuidanceError, GuidedDenoiser
from fewstep.math.param import full_precision
from fewstep.nets.unet import UNet, UNetConfig
from fewstep.train.distill import (DistillSetupError, check_round, distill_loss, distill_round, round_guidance,
                                   student_guidance, teacher_grid)
from tests.helpers import tiny_params, write_prepared

NET = UNetConfig(image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), head_dim=8,
                 dropout=0.0)
SCHEDULE = models.ScheduleSpec("cosine", 64, -20.0, 20.0)
K = 2

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _net(num_classes: int | None = K, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**NET.to_dict(), "num_classes": num_classes}))
    with torch.no_grad():  # zero-init output layers would make every net predict 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _card(net: UNet, role: str = "teacher", steps: int = 64, guidance: float | None = None) -> models.ModelCard:
    return models.ModelCard(arch=models.UNetArch(net.cfg), role=role, parameterization="v", schedule=SCHEDULE,
                            image_size=8, sample_steps=steps, weighting="snr+1",
                            conditioning=models.Conditioning(net.cfg.num_classes), guidance=guidance)


def _den(guidance: float | None = None, role: str = "teacher", steps: int = 64):
    net = _net()
    return models.denoiser_from_card(_card(net, role, steps, guidance), net.state_dict())


def _z(b: int = 4) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(1))


LABELS = torch.tensor([0, 1, 1, 0])


def test_the_student_starts_as_the_teachers_conditional_model():
    teacher = _den()
    student = models.student_start(teacher)
    assert student is not teacher.net
    assert student.num_classes == K and all(p.requires_grad for p in student.parameters())
    z, t = _z(), torch.tensor([1, 20, 40, 64])
    with torch.no_grad():
        s = student(z, t.float() / 64, LABELS)
        c = GuidedDenoiser(teacher, LABELS, 0.0)(z, t)  # w = 0: the teacher's conditional output
        g = GuidedDenoiser(teacher, LABELS, 2.0)(z, t)
    assert torch.equal(s, c)
    assert (s - g).abs().max() > 1e-3  # what the student must still learn: the guided prediction


@pytest.mark.parametrize("i", [1, 3])  # student step 1 ends at t'' = 0 (x-hat target), step 3 inside
def test_the_target_equals_two_guided_ddim_steps_of_sample_ddim(i):
    teacher, w = _den(), 1.5
    g = GuidedDenoiser(teacher, LABELS, w)
    grid = teacher_grid(64, 8)
    t, t1, t2 = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
    z = _z()
    with torch.no_grad():
        x_tgt = distill_target_path(g, z, *(torch.full((4,), k) for k in (t, t1, t2)))
        # independent reference: sample_ddim with the guided denoiser for 2 steps t -> t' -> t''
        seen = []
        steps = [t, t1] + ([t2] if t2 > 0 else [])
        ref_final = sample_ddim(GuidedDenoiser(teacher, LABELS, w), z, steps, clip=False,
                                callback=lambda d: seen.append(d["z_next"]))
    z2 = seen[1] if t2 > 0 else ref_final
    a_t, s_t = teacher.schedule.at(torch.full((4,), t), torch.float64)
    a_2, s_2 = teacher.schedule.at(torch.full((4,), t2), torch.float64)
    one_step = ddim_to(x_tgt.double(), z.double(), a_t, s_t, a_2, s_2)  # the student's one DDIM step
    torch.testing.assert_close(one_step.float(), z2.float(), rtol=0, atol=2e-5)
    # and it is the guided teacher's, not the conditional one's
    with torch.no_grad():
        idx = [torch.full((4,), k) for k in (t, t1, t2)]
        plain = distill_target_path(GuidedDenoiser(teacher, LABELS, 0.0), z, *idx)
    assert (plain - x_tgt).abs().max() > 1e-3


def test_the_loss_draws_labels_uniformly_and_the_guided_target_counts_two_evaluations_per_image():
    teacher = _den()
    data = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    student = models.student_start(teacher)
    calls = []
    orig = GuidedDenoiser._guided

    def spy(self, fn, z, t):
        calls.append((self.w, self.labels.clone(), self.evals_per_call))
        return orig(self, fn, z, t)

    GuidedDenoiser._guided = spy
    try:
        with full_precision(teacher):
            loss = distill_loss(teacher, data, 4, "snr+1", 64, True, 2.0)(student, torch.Generator().manual_seed(0))
    finally:
        GuidedDenoiser._guided = orig
    assert torch.isfinite(loss) and loss > 0  # the copy is not yet the guided teacher
    assert len(calls) == 2 and all(w == 2.0 and e == 2 for w, _, e in calls)  # two guided teacher steps
    y = calls[0][1]
    assert set(y.tolist()) == {0, 1} and int(y.max()) < K  # uniform classes, never the null label
    with pytest.raises(DistillSetupError, match="class-conditional teacher"):
        plain = _net(None)
        distill_loss(models.denoiser_from_card(_card(plain), plain.state_dict()), data, 4, "snr+1", 8, True, 1.0)


def test_round_guidance_decides_per_parent():
    plain, cond = _card(_net(None)), _card(_net())
    assert round_guidance(plain, "t", None) is None and student_guidance(plain, None) is None
    with pytest.raises(DistillSetupError, match="guidance 1 needs a class-conditional parent, but this one is uncond"):
        check_round(plain, "models/teacher", 4, "snr+1", 1.0)
    # a conditional teacher: null = plain conditional distillation (w = 0), recorded as 0
    assert round_guidance(cond, "t", None) == 0.0 and student_guidance(cond, None) == 0.0
    assert round_guidance(cond, "t", 3.0) == 3.0 and student_guidance(cond, 3.0) == 3.0
    # a guided-distilled parent is distilled as a plain conditional model at its own w
    guided_parent = _card(_net(), "student", 8, 3.0)
    assert round_guidance(guided_parent, "s", 3.0) == 0.0 and round_guidance(guided_parent, "s", None) == 0.0
    assert student_guidance(guided_parent, 3.0) == 3.0 and student_guidance(guided_parent, None) == 3.0
    with pytest.raises(DistillSetupError, match="distilled at w=3 and its output is already guided") as e:
        check_round(guided_parent, "models/student-8", 4, "snr+1", 1.0)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_the_card_records_guidance_and_old_cards_are_unchanged():
    cond = _card(_net(), "student", 8, 2.0)
    assert cond.to_dict()["guidance"] == 2.0 and models.ModelCard.from_json(cond.to_json()) == cond
    assert "guidance" not in _card(_net()).to_dict() and "guidance" not in cond.to_dict().get("extra", {})
    assert models.ModelCard.from_json(_card(_net()).to_json()).guidance is None
    with pytest.raises(models.ModelCardError, match="only a class-conditional student"):
        _card(_net(None), guidance=1.0)
    with pytest.raises(models.ModelCardError, match="must be a number >= 0"):
        models.ModelCard.from_dict({**cond.to_dict(), "guidance": -1})
    # params: the round key, omitted from dumps (run and params hashes) while null
    rp = DistillRoundParams(parent="teacher", steps=4)
    assert "guidance" not in rp.model_dump()
    assert DistillRoundParams(parent="teacher", steps=4, guidance=1.0).model_dump()["guidance"] == 1.0
    raw = tiny_params()
    raw["distill"]["defaults"]["guidance"] = -1.0
    with pytest.raises(ParamsError, match="guidance"):
        validate(raw).distill.round("student-8")


def test_a_guided_student_samples_at_w0_and_refuses_guidance():
    student = _den(guidance=2.0, role="student", steps=4)
    x = samplers.generate("ddim", student, range(4), (3, 8, 8), steps=4, labels=[0, 1, 0, 1])
    assert x.shape == (4, 3, 8, 8)
    assert samplers.nfe("ddim", 4) * GuidedDenoiser(student, [0, 1], 0.0).evals_per_call == 4  # NFE = steps
    with pytest.raises(GuidanceError, match="student distilled at w=2: its conditional output already is") as e:
        samplers.generate("ddim", student, range(4), (3, 8, 8), steps=4, labels=[0, 1, 0, 1], guidance=1.0)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_a_tiny_guided_round_then_a_plain_round_of_its_student(tmp_path):
    net = _net()
    models.save(tmp_path / "teacher", _card(net), net.state_dict())
    write_prepared(tmp_path / "data", n=16)
    rp = DistillRoundParams(parent="teacher", steps=4, train_steps=2, batch_size=4, checkpoint_every=2, log_every=1,
                            guidance=1.0)
    _, card = distill_round(tmp_path / "teacher", tmp_path / "s4", tmp_path / "ck4", tmp_path / "data", 4, rp, 0,
                            torch.device("cpu"), progress=False)
    assert card.guidance == 1.0 and card.conditioning == models.Conditioning(K)
    assert models.load_card(tmp_path / "s4").guidance == 1.0
    rp2 = rp.model_copy(update={"parent": "s4", "steps": 2})
    _, card2 = distill_round(tmp_path / "s4", tmp_path / "s2", tmp_path / "ck2", tmp_path / "data", 2, rp2, 0,
                             torch.device("cpu"), progress=False)
    assert card2.guidance == 1.0 and card2.sample_steps == 2


def test_the_round_check_samples_the_parent_guided_and_the_student_at_w0_with_cycled_labels():
    from fewstep.config import SampleParams
    from fewstep.distill_eval import student_vs_parent
    from fewstep.math.ddim import generate
    from fewstep.math.schedules import timesteps

    teacher, student = _den(), _den(guidance=1.0, role="student", steps=2)
    sp = SampleParams(n=4, seed=3)
    check = student_vs_parent(teacher, student, 2, sp, torch.device("cpu"), guidance=1.0)
    labels = [0, 1, 0, 1]  # seed s: class (s - sp.seed) mod K
    ref = generate(teacher, range(3, 7), (3, 8, 8), timesteps(64, 4), labels=labels, guidance=1.0)
    stud = generate(student, range(3, 7), (3, 8, 8), timesteps(64, 2), labels=labels)
    assert torch.equal(check.student_images, stud)
    assert check.metrics["rmse_student_vs_parent"] == pytest.approx((stud - ref).pow(2).mean().sqrt().item(), rel=1e-5)
