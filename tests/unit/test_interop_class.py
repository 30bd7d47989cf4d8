"""A class-conditional diffusers UNet2DModel in as a fewstep teacher, guided, and back out (issue 17).

Tiny UNet2DModels are built here (random weights, 16x16): nothing is downloaded. The null label is
the import's option (params ``teacher.source.null_label``): index 0 here, so fewstep's classes
0, 1, 2 are the UNet's class_labels 1, 2, 3 and fewstep's null label 3 is the UNet's 0."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fewstep import models, samplers, storage  # noqa: E402
from fewstep.config import TeacherSource  # noqa: E402
from fewstep.errors import UserError  # noqa: E402
from fewstep.interop import unet2d  # noqa: E402
from fewstep.math.ddim import sample_ddim  # noqa: E402
from fewstep.math.guidance import GuidanceError, guided  # noqa: E402
from fewstep.math.schedules import timesteps  # noqa: E402

T, SIZE, E, NULL = 1000, 16, 4, 0  # E diffusers labels: 3 classes + the null label at index 0
K = E - 1

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _unet(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
               norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=E)
    return diffusers.UNet2DModel(**{**cfg, **kw}).eval()


def _save_src(d: Path, unet) -> Path:
    """v-prediction: a random network's x-hat stays bounded (an eps one's reaches |x| ~ 300 at alpha ~ 0.006,
    where float32 rounding alone moves the clamped images by 2e-4)."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("class_src")
    unet = _unet(0)
    path = _save_src(d / "src", unet)
    card = unet2d.import_teacher(path, d / "teacher", null_label=NULL)
    return {"dir": d, "src": path, "unet": unet, "card": card, "teacher": d / "teacher"}


def _noise(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def _cfg_loop(unet, card: models.ModelCard, x_T: torch.Tensor, k: int, class_labels: list[int], null: int,
              s: float) -> torch.Tensor:
    """A hand-written diffusers DDIM loop with class_labels and classifier-free guidance at scale s."""
    sched = diffusers.DDIMScheduler(**unet2d.scheduler_config(card))
    sched.set_timesteps(k)
    c, u = torch.tensor(class_labels), torch.full((len(class_labels),), null)
    z = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps_c, eps_u = unet(z, t, class_labels=c).sample, unet(z, t, class_labels=u).sample
            z = sched.step(eps_u + s * (eps_c - eps_u), t, z).prev_sample
    return z


def test_the_card_records_the_class_conditioning_and_the_null_label(src):
    card = models.load_card(src["teacher"])
    raw = storage.read_json(src["teacher"] / models.CONFIG)
    assert raw["conditioning"] == {"kind": "class", "num_classes": K} and raw["diffusers_null_label"] == NULL
    assert card == src["card"] and card.arch.num_classes == K and card.lineage.source["null_label"] == NULL
    den = models.load_denoiser(src["teacher"])
    assert den.num_classes == K and den.has_null_label
    z, t = _noise(1), torch.tensor([10, 900])
    with torch.no_grad():  # fewstep labels map to the UNet's: class c -> c + 1, null -> 0
        ours = den(z, t, torch.tensor([0, 2]))
        theirs = src["unet"](z, t - 1, class_labels=torch.tensor([1, 3])).sample
        null = src["unet"](z, t - 1, class_labels=torch.tensor([0, 0])).sample
        assert (ours - theirs).abs().max() <= 1e-6 and (den(z, t) - null).abs().max() <= 1e-6


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_imported_guided_ddim_equals_a_hand_written_diffusers_cfg_loop(src, w):
    den, labels, k = models.load_denoiser(src["teacher"]), [0, 2], 4
    ours = sample_ddim(guided(den, labels, w), _noise(3), timesteps(T, k), clip=False)
    theirs = _cfg_loop(src["unet"], src["card"], _noise(3), k, [1, 3], NULL, 1.0 + w)
    assert (ours.clamp(-1, 1) - theirs.clamp(-1, 1)).abs().max().item() <= 1e-4
    assert samplers.nfe("ddim", k) * guided(den, labels, w).evals_per_call == (2 * k if w else k)


def test_export_keeps_the_class_embedding(src, tmp_path):
    out = unet2d.export_unet2d(src["teacher"], tmp_path / "export")
    info = storage.read_json(out / unet2d.EXPORT_INFO)
    assert info["conditioning"]["num_classes"] == K and info["conditioning"]["null_class_label"] == NULL
    assert info["conditioning"]["class_labels"] == [1, 2, 3] and "guidance" not in info
    back = diffusers.UNet2DModel.from_pretrained(out / "unet", use_safetensors=True).eval()
    assert back.config.num_class_embeds == E
    z, t, y = _noise(4, 3), torch.tensor([5, 500, 999]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        assert (back(z, t, class_labels=y).sample - src["unet"](z, t, class_labels=y).sample).abs().max() <= 1e-6


def test_a_conditional_only_import_refuses_guidance(src, tmp_path):
    card = unet2d.import_teacher(src["src"], tmp_path / "t")
    assert card.conditioning.num_classes == E and unet2d.NULL_KEY not in card.to_dict()
    den = models.load_denoiser(tmp_path / "t")
    assert not den.has_null_label
    ours = sample_ddim(guided(den, [0, 3], 0.0), _noise(0), timesteps(T, 2), clip=False)
    theirs = _cfg_loop(src["unet"], card, _noise(0), 2, [0, 3], 0, 1.0)  # s = 1: conditional only, no remap
    assert (ours.clamp(-1, 1) - theirs.clamp(-1, 1)).abs().max() <= 1e-4
    with pytest.raises(GuidanceError, match="imported without teacher.source.null_label") as e:
        samplers.generate("ddim", den, [0, 1], (3, SIZE, SIZE), steps=2, labels=[0, 3], guidance=1.0)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    from fewstep.train.distill import DistillSetupError, round_guidance

    with pytest.raises(DistillSetupError, match="imported without teacher.source.null_label"):
        round_guidance(card, tmp_path / "t", 1.0)  # a guided round is refused before any work
    assert round_guidance(card, tmp_path / "t", None) == 0.0  # plain conditional distillation works


def test_bad_null_labels_and_labels_are_one_clear_error_each(src, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    for bad in (E, -1, True):
        with pytest.raises(unet2d.DiffusersSourceError, match="teacher.source.null_label .* out of range") as e:
            unet2d.import_teacher(src["src"], out / "t", null_label=bad)
        assert "\n" not in str(e.value)
    plain = _save_src(tmp_path / "plain", _unet(1, num_class_embeds=None))
    with pytest.raises(unet2d.DiffusersSourceError, match="null_label 0 given, but this UNet2DModel is uncond"):
        unet2d.import_teacher(plain, out / "t", null_label=0)
    assert list(out.iterdir()) == []
    with pytest.raises(pydantic.ValidationError, match="null_label"):
        TeacherSource(kind="diffusers", path="x", null_label=-1)
    den = models.load_denoiser(src["teacher"])
    with pytest.raises(GuidanceError, match=f"class label {K} out of range: this model has {K} classes"):
        samplers.generate("ddim", den, [0], (3, SIZE, SIZE), steps=2, labels=[K], guidance=1.0)
    with pytest.raises(models.ModelCardError, match="diffusers_null_label must be a label index 0..3"):
        models.ModelCard.from_dict({**src["card"].to_dict(), unet2d.NULL_KEY: 7})


def test_a_timestep_class_embedding_imports_and_guides(tmp_path):
    unet = _unet(2, class_embed_type="timestep")  # num_class_embeds states the label count
    card = unet2d.import_teacher(_save_src(tmp_path / "src", unet), tmp_path / "t", null_label=E - 1)
    den = models.load_denoiser(tmp_path / "t")
    # k divides T: DDIMScheduler steps back by T // k, which is fewstep's trailing grid only then
    ours = sample_ddim(guided(den, [0, 2], 2.0), _noise(5), timesteps(T, 4), clip=False)
    theirs = _cfg_loop(unet, card, _noise(5), 4, [0, 2], E - 1, 3.0)  # null at the end: classes unmoved
    assert (ours.clamp(-1, 1) - theirs.clamp(-1, 1)).abs().max().item() <= 1e-4


def test_a_guided_student_of_the_imported_teacher_trains_and_exports(src, tmp_path):
    from fewstep.train.distill import distill_loss

    teacher = models.load_denoiser(src["teacher"])
    student = models.student_start(teacher)
    assert student.arch.null_label == NULL and student.num_classes == K
    z, t, y = _noise(6), torch.tensor([300, 1000]), torch.tensor([2, 0])
    with torch.no_grad():
        assert torch.equal(student(z, t.float() / T, y), teacher(z, t, y))  # starts as the conditional teacher
    data = torch.randint(0, 255, (8, 3, SIZE, SIZE), dtype=torch.uint8)
    loss = distill_loss(teacher, data, 2, "snr", 4, False, 1.0)(student.train(), torch.Generator().manual_seed(0))
    loss.backward()
    assert student.unet.class_embedding.weight.grad.abs().sum() > 0
    parent = teacher.card
    card = models.ModelCard(arch=models.student_arch(student, parent), role="student",
                            parameterization=parent.parameterization, schedule=parent.schedule,
                            image_size=parent.image_size, sample_steps=2, weighting="snr",
                            conditioning=parent.conditioning, guidance=1.0)
    models.save(tmp_path / "student", card, student.state_dict(), kind="diffusers-unet2d")
    info = storage.read_json(unet2d.export_unet2d(tmp_path / "student", tmp_path / "export") / unet2d.EXPORT_INFO)
    assert info["guidance"] == 1.0 and info["conditioning"]["class_labels"] == [1, 2, 3]


def test_params_teacher_source_null_label_reaches_the_import(src, tmp_path):
    from fewstep.config import validate
    from fewstep.teacher_source import import_source
    from tests.helpers import tiny_params

    p = tiny_params()
    p["base"]["image_size"] = SIZE
    p["teacher"]["net"]["attn_resolutions"] = []
    p["teacher"]["source"] = {"kind": "diffusers", "path": str(src["src"]), "null_label": NULL}
    card = import_source(validate(p), tmp_path / "models" / "teacher")
    assert card.conditioning == models.Conditioning(K) and card.arch.null_label == NULL
    del p["teacher"]["source"]["null_label"]  # absent: conditional only
    assert import_source(validate(p), tmp_path / "t2").arch.num_classes == E
