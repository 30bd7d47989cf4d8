"""Stage evaluate: one table sampler x NFE over every model and scheduler the pipeline made.

Rows: the teacher with DDIM at evaluate.ddim_steps, the eta family and sigma-hat, every OLSS
variant, every distilled student, OLSS on students, diffusers' schedulers as peers (same teacher,
same noise, equal NFE). Outputs: metrics/evaluate.json (DVC metrics), plots/evaluate.csv (DVC
plots: FD and RMSE vs NFE), reports/evaluation.md with PNG plots (FD vs NFE, RMSE vs NFE, FD vs
GFLOPs with its Pareto front) and one sample grid per row under reports/grids/.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import torch

from fewstep import parallel, storage
from fewstep.config import ParamsError
from fewstep.evaluation import build_rows, feature_scores, inception_space, pareto_front, run_row, score
from fewstep.images import from_uint8, save_grid
from fewstep.math.ddim import sample_ddim
from fewstep.math.schedules import timesteps
from fewstep.train.evaluator import features, load_evaluator
from stages import _common


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fams: dict[str, list] = {}
    for name, r in results.items():
        fams.setdefault(r["family"] + ("" if r["family"] != "olss" else f" ({r['model']})"), []).append(r)
    for key, label in (("fd", "FD (evaluator features)"), ("rmse", "RMSE vs teacher full-step DDIM")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for fam, rs in sorted(fams.items()):
            rs = sorted(rs, key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rs], [r[key] for r in rs], "o-", label=fam)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{key}_vs_nfe.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    names = list(results)
    pts = [(results[n]["gflops"], results[n]["fd"]) for n in names]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, c="gray")
    fr = sorted((pts[i] for i in front))
    ax.plot([p[0] for p in fr], [p[1] for p in fr], "r-o", label="Pareto front")
    for i in front:
        ax.annotate(names[i], pts[i], fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("model GFLOPs per image")
    ax.set_ylabel("FD")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    made.append("pareto.png")
    for i in front:
        results[names[i]]["pareto"] = True
    return made


def _per_net(r: dict) -> str:
    g, n = r.get("gflops_by_net"), r.get("nfe_by_net")
    return f" (high {g['high']:.3f} x{n['high']} + low {g['low']:.3f} x{n['low']})" if g else ""


def report(results: dict, p, out: Path, pngs: list[str], meta: dict) -> None:
    lines = [f"# Evaluation ({meta['n']} samples per row, evaluator test accuracy {meta['acc']})", "",
             "FD is comparable only at equal n (small-sample bias, DESIGN.md). RMSE/PSNR against the teacher's "
             f"{meta['ref_steps']}-step DDIM sample from the same noise. * = on the FD-vs-GFLOPs Pareto front.", "",
             "| sampler | NFE | FD | KID (x1e3) | prec | rec | RMSE | PSNR | GFLOPs/img | img/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(results.items(), key=lambda kv: (kv[1]["nfe"], kv[1]["fd"])):
        lines.append(f"| {name}{' *' if r.get('pareto') else ''} | {r['nfe']} | {r['fd']:.3f} | "
                     f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
                     f"{r['rmse']:.4f} | {r['psnr']:.1f} | {r['gflops']:.3f}{_per_net(r)} | {r['images_per_s']:.0f} |")
    inc = {n: r["inception"] for n, r in results.items() if "inception" in r}
    if inc:
        lines += ["", "Standard FID (Inception-v3 pool features, user-supplied weights; training-split statistics):", "",
                  "| sampler | FID | KID (x1e3) |", "|---|---:|---:|"]
        lines += [f"| {n} | {s['fd']:.3f} | {1e3 * s['kid']:.2f} ± {1e3 * s['kid_se']:.2f} |" for n, s in inc.items()]
    lines += [""] + [f"![{n}]({n})" for n in pngs]
    storage.atomic_write_bytes(out / "evaluation.md", ("\n".join(lines) + "\n").encode())


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--models", default="models")
    ap.add_argument("--schedulers", default="schedulers")
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--data", default="data/prepared", help="training split for Inception reference statistics")
    args = ap.parse_args()
    with _common.clear_errors("evaluate") as rec:
        p, device = _common.setup(args)
        ep = p.evaluate
        evaluator, stats = load_evaluator(Path(args.models) / "evaluator", device)
        rows, dens = build_rows(Path(args.models), Path(args.schedulers), ep, device)
        inception = None
        if ep.inception_weights:  # standard FID: the user's Inception weights, same FD/KID code
            train = from_uint8(storage.load_array(Path(args.data) / "train_images.npy"))
            try:
                inception = inception_space(ep.inception_weights, train, p.evaluator.ref_subset, ep.seed, device)
            except ValueError as e:  # a file that is not an FID Inception state dict: one clear line
                raise ParamsError(f"evaluate.inception_weights: {e}") from None
        teacher = dens["teacher"]
        size = p.base.image_size
        shape = (3, size, size)
        seeds = list(range(ep.seed, ep.seed + ep.n_samples))
        ref_steps = timesteps(teacher.schedule.T, min(ep.reference_steps, teacher.schedule.T))
        from fewstep.evaluation import Row

        ref_row = Row("reference", "ddim", "teacher", len(ref_steps),
                      lambda x_T, noise: sample_ddim(teacher, x_T, ref_steps))
        reference, ref_ips = run_row(ref_row, seeds, shape, ep.batch_size, device)
        ref_name = f"teacher ddim {len(ref_steps)}"  # the same sampler, steps, seeds: its images are the reference
        out = Path(args.reports)
        (out / "grids").mkdir(parents=True, exist_ok=True)
        results = {}
        for row in rows:
            if row.name == ref_name:
                images, ips = reference, ref_ips
            else:
                images, ips = run_row(row, seeds, shape, ep.batch_size, device)
            if not parallel.is_main():  # under torchrun: the other ranks sample their share, rank 0 scores
                continue
            feats = features(evaluator, images.to(device) if device.type == "cuda" else images)
            r = score(feats, images, reference, stats, ep.kid_subsets, ep.seed)
            r.update(family=row.family, model=row.model, nfe=row.nfe, gflops=row.gflops, images_per_s=ips)
            if row.name == ref_name:
                r["is_reference"] = True  # not sampled twice
            if row.gflops_by_net:  # a split model: the cost per network
                r.update(nfe_by_net=row.nfe_by_net, gflops_by_net=row.gflops_by_net)
            if inception is not None:
                r["inception"] = feature_scores(inception[0](images), inception[1], ep.kid_subsets, ep.seed)
            results[row.name] = r
            save_grid(images[: ep.grid_n], out / "grids" / f"{slug(row.name)}.png", scale=max(1, 32 // size))
            print(f"evaluate: {row.name:32s} NFE {row.nfe:4d} FD {r['fd']:8.3f} RMSE {r['rmse']:.4f}", flush=True)
        if not parallel.is_main():
            return
        pngs = plots(results, out)
        acc = storage.read_json(Path(args.models) / "evaluator" / "config.json").get("test_accuracy")
        report(results, p, out, pngs, {"n": ep.n_samples, "acc": f"{acc:.3f}" if acc is not None else "n/a",
                                       "ref_steps": len(ref_steps)})
        storage.write_json("metrics/evaluate.json", {"n_samples": ep.n_samples, "rows": results})
        rec.log_metrics({name: {k: v for k, v in r.items() if k in ("fd", "kid", "rmse", "psnr", "nfe", "images_per_s")}
                         for name, r in results.items()})
        rec.log_artifact(out, "reports")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["sampler", "family", "nfe", "fd", "kid", "rmse", "gflops"])
        for name, r in results.items():
            w.writerow([name, r["family"], r["nfe"], f"{r['fd']:.6g}", f"{r['kid']:.6g}", f"{r['rmse']:.6g}",
                        f"{r['gflops']:.6g}"])
        storage.atomic_write_bytes(Path("plots/evaluate.csv"), buf.getvalue().encode())


if __name__ == "__main__":
    main()
