"""Stage objective@<variant>-<P>: one teacher of the objective study (eps / x / v prediction under
PDM's sqrt-SNR x weighting and the distillation paper's truncated-SNR and SNR+1 weightings), at
patch size P; variant = <parameterization>-<weighting> (fewstep.math.losses.WEIGHTINGS).

The teacher section overridden by objective.teacher and objective.nets.p<P>. Scores: the
x-prediction MSE on the test split per log-SNR bin (redundancy.* bins, objective.n_test images) and,
when models/evaluator exists and objective.n_samples > 0, FD/KID of DDIM samples at
objective.sample_steps. Outputs: study/objective/<variant>-p<P>/ (model dir, outside models/ so
evaluate and register leave it alone), checkpoints/objective-<variant>-p<P>/,
metrics/objective/<variant>-p<P>.json.
"""

from __future__ import annotations

import math
from pathlib import Path

from fewstep import models, storage
from fewstep.math import metrics as M
from fewstep.math.ddim import generate
from fewstep.math.schedules import timesteps
from fewstep.study import bin_edges, images_from_uint8, mean_error, x_error_by_logsnr
from fewstep.train.teacher import train_teacher
from stages import _common


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--variant", required=True, help="<eps|x|v>-<weighting>, one of objective.variants")
    ap.add_argument("--patch-size", type=int, required=True, choices=(1, 2, 4, 8))
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--out", default="study/objective")
    ap.add_argument("--evaluator", default="models/evaluator")
    args = ap.parse_args()
    name = f"{args.variant}-p{args.patch_size}"
    with _common.clear_errors(f"objective@{name}"):
        p, device = _common.setup(args)
        op = p.objective
        if args.variant not in op.variants or args.patch_size not in op.patch_sizes:
            from fewstep.config import ParamsError

            raise ParamsError(f"objective: {args.variant} at P={args.patch_size} is not in objective.variants x "
                              f"objective.patch_sizes ({op.variants} x {op.patch_sizes})")
        tp = op.teacher_for(p.teacher, args.variant, args.patch_size)
        model_dir = Path(args.out) / name
        result, meta = train_teacher(p.model_copy(update={"teacher": tp}), args.data, model_dir,
                                     Path("checkpoints") / f"objective-{name}", device, progress=not args.no_progress,
                                     extra_meta={"study": "objective", "variant": name})
        den = models.load_denoiser(model_dir, device)
        rp = p.redundancy
        test = storage.load_array(Path(args.data) / "test_images.npy")
        bins = x_error_by_logsnr(den, images_from_uint8(test, op.n_test), bin_edges(rp.logsnr_min, rp.logsnr_max, rp.bins),
                                 seed=rp.seed, batch_size=rp.batch_size)
        hi_noise = [b for b in bins if b.n and b.hi <= 0.0]
        lo_noise = [b for b in bins if b.n and b.lo >= 0.0]
        out = {"variant": args.variant, "parameterization": tp.parameterization, "weighting": meta["weighting"],
               "patch_size": args.patch_size, "train_steps": tp.steps,
               "final_loss": result.history[-1][1] if result.history else None,
               "x_mse": mean_error(bins), "x_mse_high_noise": mean_error(hi_noise),
               "x_mse_low_noise": mean_error(lo_noise), "bins": [b.to_dict() for b in bins]}
        if op.n_samples and (Path(args.evaluator) / "config.json").exists():
            from fewstep.train.evaluator import features, load_evaluator

            ev, stats = load_evaluator(Path(args.evaluator), device)
            size = p.base.image_size
            seeds = range(p.evaluate.seed, p.evaluate.seed + op.n_samples)
            steps = timesteps(den.schedule.T, min(op.sample_steps, den.schedule.T))
            imgs = generate(den, seeds, (3, size, size), steps, batch_size=p.evaluate.batch_size, device=device)
            feats = features(ev, imgs.clamp(-1, 1))
            out["fd"] = M.frechet_distance(*M.mean_cov(feats), stats["mu"], stats["sigma"])
            out["kid"] = M.kid(feats, stats["subset"], subsets=p.evaluate.kid_subsets,
                               subset_size=min(1000, len(feats)), seed=p.evaluate.seed)[0]
            out.update(fd_n=op.n_samples, fd_steps=len(steps))
        storage.write_json(f"metrics/objective/{name}.json", out)
        fd = out.get("fd", math.nan)
        print(f"objective@{name}: x-MSE {out['x_mse']:.4f} (high noise {out['x_mse_high_noise']:.4f}, "
              f"low noise {out['x_mse_low_noise']:.4f}), FD {fd:.3f}")


if __name__ == "__main__":
    main()
