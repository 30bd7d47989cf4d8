"""Stage redundancy: the x-prediction error of every teacher against the noise level, on the test
split (the patched-diffusion paper's redundancy argument: at high noise the optimal x is blurry, so
the curves of coarse, patched nets and full-resolution nets should coincide there).

Every model dir under models/ with role teacher (the teacher, the study's teacher-p<P>, split
models) is scored on the same test images, timesteps and noise per log-SNR bin (redundancy.*).
Outputs: metrics/redundancy.json, plots/redundancy.csv (DVC plot: model, patch, logsnr, mse),
study/redundancy.png (one curve per model), study/redundancy.md (the table).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from fewstep import models, storage
from fewstep.study import bin_edges, images_from_uint8, mean_error, x_error_by_logsnr
from stages import _common


def teachers(models_dir: Path) -> list[Path]:
    """Model dirs with role teacher, the finest patch size first."""
    found = []
    for d in sorted(models_dir.iterdir()) if models_dir.is_dir() else []:
        if (d / models.CONFIG).exists() and models.load_config(d).get("role") == "teacher":
            found.append(d)
    return sorted(found, key=lambda d: (min(patch_sizes(models.load_config(d))), d.name))


def patch_sizes(cfg: dict) -> list[int]:
    if models.is_split(cfg):
        return [int(cfg["nets"][s]["patch_size"]) for s in ("high", "low")]
    return [int(cfg["net"]["patch_size"])]


def label(name: str, cfg: dict) -> str:
    ps = patch_sizes(cfg)
    p = f"P={ps[0]}" if len(ps) == 1 else f"P={ps[0]} high / {ps[1]} low"
    return f"{name} ({p}, {cfg.get('train_steps')} steps)"


def plot(results: dict, path: Path, boundary: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in results.items():
        bins = [b for b in r["bins"] if b["n"]]
        ax.plot([b["logsnr"] for b in bins], [b["mse"] for b in bins], "o-" if name.startswith("teacher-p") else "s--",
                label=r["label"], ms=3)
    if boundary is not None:
        ax.axvline(boundary, color="gray", lw=0.8, ls=":", label="split boundary")
    ax.set_yscale("log")
    ax.set_xlabel("log-SNR  (left: high noise)")
    ax.set_ylabel("x-prediction MSE per dim (test split)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    names = list(results)
    lines = ["# x-prediction error per noise level (test split)", "",
             "MSE per dimension of x-hat against the clean test image, images in [-1, 1]; the same images, "
             "timesteps and noise for every model.", "",
             "| log-SNR bin | mean log-SNR | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    first = results[names[0]]["bins"]
    for k, b in enumerate(first):
        cells = [f"{results[n]['bins'][k]['mse']:.4f}" if results[n]["bins"][k]["n"] else "" for n in names]
        lines.append(f"| [{b['lo']:.1f}, {b['hi']:.1f}) | {b['logsnr']:.2f} | " + " | ".join(cells) + " |")
    lines.append("| mean over bins | | " + " | ".join(f"{results[n]['mean']:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--models", default="models")
    ap.add_argument("--out", default="study")
    args = ap.parse_args()
    with _common.clear_errors("redundancy"):
        p, device = _common.setup(args)
        rp = p.redundancy
        test = Path(args.data) / "test_images.npy"
        if not test.exists():
            raise FileNotFoundError(f"{test}: the redundancy analysis needs the test split (prepare.test_source)")
        images = images_from_uint8(storage.load_array(test), rp.n_images)
        edges = bin_edges(rp.logsnr_min, rp.logsnr_max, rp.bins)
        results, boundary = {}, None
        for d in teachers(Path(args.models)):
            den = models.load_denoiser(d, device)
            cfg = den.config
            bins = x_error_by_logsnr(den, images, edges, seed=rp.seed, batch_size=rp.batch_size)
            results[d.name] = {"patch_sizes": patch_sizes(cfg), "train_steps": cfg.get("train_steps"),
                               "label": label(d.name, cfg), "bins": [b.to_dict() for b in bins],
                               "mean": mean_error(bins)}
            if models.is_split(cfg):
                boundary = float(cfg["split"]["boundary_logsnr"])
            print(f"redundancy: {d.name:16s} " + " ".join(f"{b.mse:.4f}" for b in bins if b.n), flush=True)
            del den
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not results:
            raise FileNotFoundError(f"no teacher model dirs under {args.models}")
        out = Path(args.out)
        storage.write_json("metrics/redundancy.json", {"n_images": int(images.shape[0]), "models": results})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["model", "patch", "logsnr", "mse"])
        for name, r in results.items():
            for b in r["bins"]:
                if b["n"]:
                    w.writerow([name, "/".join(map(str, r["patch_sizes"])), f"{b['logsnr']:.4g}", f"{b['mse']:.6g}"])
        storage.atomic_write_bytes(Path("plots/redundancy.csv"), buf.getvalue().encode())
        plot(results, out / "redundancy.png", boundary)
        storage.atomic_write_bytes(out / "redundancy.md", table(results).encode())


if __name__ == "__main__":
    main()
