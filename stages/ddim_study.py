"""Stage ddim_study: DDIM inversion, consistency and interpolation on the teacher (DDIM paper 5.2-5.4).

Outputs: metrics/ddim_study.json (reconstruction MSE per step count, consistency distances, timings);
DVC plots plots/ddim_reconstruction.csv (steps -> MSE), plots/ddim_consistency.csv (steps -> pixel RMSE
to the full-step image) and plots/ddim_consistency_features.csv (steps -> evaluator-feature distance to
it); grids samples/ddim_reconstruction.png (originals, then one row per step count),
samples/ddim_consistency.png (one row per x_T, one column per step count) and
samples/ddim_interpolation.png (slerp rows between two x_T, then between two encoded test images).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fewstep import models, storage
from fewstep.data import DataError
from fewstep.ddim_study import consistency, interpolation_grid, reconstruction, step_grid
from fewstep.images import from_uint8, save_grid
from stages import _common


def write_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        w.writerow([r[k] if isinstance(r[k], int) else f"{r[k]:.6g}" for k in keys])
    storage.atomic_write_bytes(path, buf.getvalue().encode())


def load_split(data: Path, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """``n`` images of the test split (the train split when there is none), picked with ``seed``."""
    split = "test" if (data / "test_images.npy").exists() else "train"
    if split == "train":
        print(f"ddim_study: no test split in {data}; using the train split", file=sys.stderr)
    arr = storage.load_array(data / f"{split}_images.npy", mmap=True)
    if len(arr) == 0:
        raise DataError(f"{data}/{split}_images.npy holds no images")
    pick = np.sort(np.random.default_rng(seed).permutation(len(arr))[: min(n, len(arr))])
    return from_uint8(np.asarray(arr[pick])), split


def run(args) -> dict:
    p, device = _common.setup(args)
    sp = p.ddim_study
    progress = not args.no_progress
    den = models.load_denoiser(args.model, device)
    den.autocast = False  # float32 on CUDA too: bf16 outputs would put a floor under the reconstruction error
    T, size = den.schedule.T, int(den.config["image_size"])
    shape = (3, size, size)
    images, split = load_split(Path(args.data), sp.n_images, sp.seed)
    if images.shape[1:] != shape:
        raise DataError(f"{args.data}: images are {tuple(images.shape[1:])}, the model expects {shape}")
    feats = None
    if (Path(args.evaluator) / "config.json").exists():
        from fewstep.train.evaluator import features, load_evaluator

        evaluator, _ = load_evaluator(Path(args.evaluator), device)
        feats = lambda x: features(evaluator, x)  # noqa: E731
    else:
        print(f"ddim_study: no evaluator at {args.evaluator}; feature distances skipped", file=sys.stderr)
    out: dict = {"model": str(args.model), "split": split, "n_images": len(images), "T": T, "spacing": sp.spacing,
                 "clip": sp.clip, "seconds": {}}

    t0 = time.perf_counter()
    rec = reconstruction(den, images, sp.recon_steps, sp.spacing, sp.clip, sp.batch_size, device, progress)
    out["seconds"]["reconstruction"] = round(time.perf_counter() - t0, 2)
    out["reconstruction"] = {str(r["steps"]): r for r in rec.rows}

    t0 = time.perf_counter()
    seeds = list(range(sp.seed, sp.seed + sp.n_consistency))
    con = consistency(den, seeds, shape, sp.consistency_steps, feats, sp.spacing, True, sp.batch_size, device,
                      progress)
    out["seconds"]["consistency"] = round(time.perf_counter() - t0, 2)
    out["consistency"] = {"reference_steps": con.reference_steps, "n": len(seeds),
                          "rows": {str(r["steps"]): r for r in con.rows}}

    t0 = time.perf_counter()
    k = sp.interp_pairs
    seed_pairs = [(sp.seed + 2 * i, sp.seed + 2 * i + 1) for i in range(k)]
    image_pairs = [(images[2 * i], images[2 * i + 1]) for i in range(min(k, len(images) // 2))]
    interp = interpolation_grid(den, shape, sp.interp_n, step_grid(T, sp.interp_steps, sp.spacing), seed_pairs,
                                image_pairs, clip_noise=True, clip_images=sp.clip, device=device)
    out["seconds"]["interpolation"] = round(time.perf_counter() - t0, 2)
    out["interpolation"] = {"steps": min(sp.interp_steps, T), "n": sp.interp_n, "seed_pairs": seed_pairs,
                            "image_pairs": len(image_pairs)}

    scale = max(1, 64 // size)
    samples, plots = Path(args.samples), Path(args.plots)
    m = min(8, len(images))
    save_grid(torch.cat([images[:m]] + [rec.images[n][:m] for n in sorted(rec.images)]),
              samples / "ddim_reconstruction.png", nrow=m, scale=scale)
    counts = sorted(con.images)
    save_grid(torch.stack([con.images[n][i] for i in range(len(seeds)) for n in counts]),
              samples / "ddim_consistency.png", nrow=len(counts), scale=scale)
    save_grid(interp, samples / "ddim_interpolation.png", nrow=sp.interp_n, scale=scale)
    write_csv(plots / "ddim_reconstruction.csv", rec.rows, ["steps", "nfe", "mse", "mse_se", "mse_01", "psnr"])
    crows = [r for r in con.rows if r["steps"] != con.reference_steps]
    write_csv(plots / "ddim_consistency.csv", crows, ["steps", "rmse", "psnr"])
    fkeys = ["steps", "feat_dist", "feat_dist_rel"] if feats is not None else ["steps"]
    write_csv(plots / "ddim_consistency_features.csv", crows, fkeys)  # header only without an evaluator
    storage.write_json(args.metrics, out)
    return out


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--evaluator", default="models/evaluator")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--metrics", default="metrics/ddim_study.json")
    ap.add_argument("--plots", default="plots")
    ap.add_argument("--samples", default="samples")
    args = ap.parse_args()
    with _common.clear_errors("ddim_study"):
        out = run(args)
        for n, r in out["reconstruction"].items():
            print(f"ddim_study: reconstruction {n:>5s} steps  MSE {r['mse']:.3g} ([0,1] scale {r['mse_01']:.3g})")
        for n, r in out["consistency"]["rows"].items():
            fd = f"  feature dist {r['feat_dist']:.3g} (rel {r['feat_dist_rel']:.3g})" if "feat_dist" in r else ""
            print(f"ddim_study: consistency {n:>5s} steps  RMSE to {out['consistency']['reference_steps']} "
                  f"{r['rmse']:.3g}{fd}")
        print(f"ddim_study: seconds {out['seconds']}")


if __name__ == "__main__":
    main()
