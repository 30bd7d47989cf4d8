"""Human-readable outputs made from results: markdown tables, PNG plots and the CSV files DVC plots.

The evaluation (reports/evaluation.md, FD/RMSE vs NFE, FD vs GFLOPs with its Pareto front,
plots/evaluate.csv), the redundancy analysis (study/redundancy.md and .png, plots/redundancy.csv)
and the objective study (study/objective.md, plots/objective.csv). Functions of plain dicts; no
model runs here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

from fewstep import storage
from fewstep.evaluation import pareto_front
from fewstep.outputs import write_csv
from fewstep.ranking import claim, separated_pairs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(name: str) -> str:
    """A row name as a file name: ``teacher ddim 8 eta=0.5`` -> ``teacher-ddim-8-eta-0.5``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


# --- evaluation ---------------------------------------------------------------------------------

def evaluation_plots(results: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """fd_vs_nfe.png, rmse_vs_nfe.png (one curve per family) and pareto.png (FD vs GFLOPs); marks
    the rows on the Pareto front with ``pareto: True``. Returns the file names."""
    plt = _pyplot()
    made = []
    fams: dict[str, list] = {}
    for name, r in results.items():
        fam = r["family"] + ("" if r["family"] != "olss" else f" ({r['model']})")
        fams.setdefault(fam + (f" w={r['guidance']:g}" if r.get("guidance") else ""), []).append(r)  # guided: own curve
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


def _per_net(r: Mapping[str, Any]) -> str:
    g, n = r.get("gflops_by_net"), r.get("nfe_by_net")
    return f" (high {g['high']:.3f} x{n['high']} + low {g['low']:.3f} x{n['low']})" if g else ""


def _ci(r: Mapping[str, Any], key: str, fmt: str) -> str:
    """``value [lo, hi]`` when the row has an interval for ``key``, else the value."""
    v = format(r[key], fmt)
    return f"{v} [{r[key + '_lo']:{fmt}}, {r[key + '_hi']:{fmt}}]" if key + "_lo" in r else v


def _note(r: Mapping[str, Any]) -> str:
    """A row's note after its name (OLSS: paper / beyond paper / which variant olss-N is; a
    guided-distilled student: the scale it was distilled at)."""
    notes = [r["note"]] if r.get("note") else []
    if r.get("distilled_guidance") is not None:
        notes.append(f"distilled at w={r['distilled_guidance']:g}")
    return f" ({'; '.join(notes)})" if notes else ""


def _acc(b: Mapping[str, Any]) -> str:
    return f"{b['accuracy']:.3f} ± {b['accuracy_se']:.3f}"


def per_class_markdown(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> list[str]:
    """Class-conditional rows (the ones with ``accuracy``): the evaluator's accuracy on their
    samples, overall and per class, FD per class against the test images of that class, and the
    per-class grids (one row per class) of the reference, student and olss-N rows."""
    cond = {k: r for k, r in results.items() if "accuracy" in r}
    if not cond:
        return []
    names = list(meta.get("class_names") or [])
    per = any("per_class" in r for r in cond.values())
    lines = ["## Per class (class-conditional models)", "",
             "The sample of seed s is of class (s - evaluate.seed) mod K; w is the classifier-free guidance scale "
             "(diffusers' guidance_scale = 1 + w); NFE counts both evaluations of a guided step. acc: the fraction "
             "of samples the evaluator classifies as the asked class (± its standard error; chance = 1/K)."
             + (" Per class: FD [95% CI] / acc of that class's samples against the test images of that class "
                "(compare within this table only)." if per else ""), ""]
    head = "| sampler | w | NFE | acc |" + "".join(f" {c} |" for c in names if per) + " grid |"
    lines += [head, "|---|---:|---:|---:|" + "---:|" * (len(names) if per else 0) + "---|"]
    for name, r in sorted(cond.items(), key=lambda kv: (kv[1]["nfe"], kv[1].get("guidance", 0), kv[1]["fd"])):
        cells = "".join(f" {_ci(r['per_class'][c], 'fd', '.2f')} / {r['per_class'][c]['accuracy']:.2f} |"
                        for c in names if per and c in r.get("per_class", {}))
        lines.append(f"| {name}{_note(r)} | {r.get('guidance', 0):g} | {r['nfe']} | {_acc(r)} |{cells} "
                     f"[grid](grids/{slug(name)}-classes.png) |")
    shown = [k for k, r in cond.items() if r.get("is_reference") or r["family"] in ("student", "olss")]
    if shown:
        lines += ["", "Samples, one row per class (" + ", ".join(names) + "):" if names else "", ""]
        lines += [f"![{k}](grids/{slug(k)}-classes.png) {k}" for k in shown]
    return lines + [""]


def _dup(r: Mapping[str, Any]) -> str:
    return f"{r['dup_rate']:.3f}" if "dup_rate" in r else "-"


def _paired_diff(h: Mapping[str, Any]) -> str:
    """``-0.120 [-0.180, -0.060]``: FD(row) - FD(reference) with its joint-bootstrap interval."""
    p = h.get("paired") or {}
    if p.get("fd_diff_lo") is None:
        return "-"
    return f"{p['fd_diff']:+.3f} [{p['fd_diff_lo']:+.3f}, {p['fd_diff_hi']:+.3f}]"


def headline_markdown(results: dict[str, dict[str, Any]], meta: Mapping[str, Any] | None = None) -> list[str]:
    """The ranked rows at their own n (the ``headline`` blocks): FD with its interval, KID +- SE,
    recall and duplicates, the paired FD difference to the reference, FD's and KID's verdicts
    against the reference row separately (fewstep.ranking: paired where the rows share seeds), and
    the separated pairs at equal NFE (paired, ``meta["paired_pairs"]``, where present)."""
    heads = {k: r["headline"] for k, r in results.items() if "headline" in r}
    if not heads:
        return []
    n_h = next(iter(heads.values()))["n"]
    ref = next((k for k in heads if results[k].get("is_reference")), None)
    lines = [f"## Ranked rows ({n_h} samples each)", "",
             "FD with its 95% bootstrap interval (bias-corrected, resampling the generated set), KID +- its "
             "standard error (sampling and subsets). Every ranked row uses the same x_T seeds, so each is compared "
             "with the reference paired: ΔFD is FD(row) - FD(reference) with the 95% interval of a joint bootstrap "
             "over the same image indices, KID by its paired difference beyond 2 standard errors. FD and KID are "
             "judged separately; an order is claimed only where that metric's uncertainty separates "
             f"(fewstep.ranking). Compare these FDs only with each other (n={n_h}), not with the full table below.",
             "", "| sampler | NFE | FD [95% CI] | KID (x1e3) | rec | dup | RMSE [95% CI] | ΔFD vs ref [95% CI] | "
             "FD vs reference | KID vs reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, h in sorted(heads.items(), key=lambda kv: (results[kv[0]]["nfe"], kv[1]["fd"])):
        r_i = (h.get("paired") or {}).get("ref", ref)  # a conditional row's reference is the teacher's at its w
        if results[name].get("is_reference"):
            vs = ["reference", "reference"]
        else:
            vs = [claim(h, heads[r_i], r_i, key, ref=r_i) if r_i in heads else "-" for key in ("fd", "kid")]
        lines.append(f"| {name}{_note(results[name])} | {results[name]['nfe']} | {_ci(h, 'fd', '.3f')} | "
                     f"{1e3 * h['kid']:.2f} ± "
                     f"{1e3 * h['kid_se']:.2f} | {h['recall']:.2f} | {_dup(h)} | {_ci(h, 'rmse', '.4f')} | "
                     f"{_paired_diff(h)} | {vs[0]} | {vs[1]} |")
    by_nfe: dict[int, dict[str, Mapping[str, Any]]] = {}
    for name, h in heads.items():
        by_nfe.setdefault(results[name]["nfe"], {})[name] = h
    paired = (meta or {}).get("paired_pairs")
    for key in ("fd", "kid"):
        pairs = [f"{a} < {b}" for nfe in sorted(by_nfe) for a, b in separated_pairs(by_nfe[nfe], key, paired)]
        lines += ["", f"Separated on {key.upper()} at equal NFE (lower first"
                  + (", paired" if paired else "") + "): " + ("; ".join(pairs) if pairs else "none") + "."]
    return lines + [""]


def sensitivity_markdown(meta: Mapping[str, Any]) -> list[str]:
    """What FD can see: the noise floor (held-out real images) and a known blur, at the same n."""
    floor, blur = meta.get("fd_floor"), meta.get("fd_blur")
    if not floor:
        return []
    lines = [f"## FD sensitivity (test split, n={floor['n']})", "",
             "FD of held-out real images against the training reference (the floor: what a perfect sampler scores "
             "at this n) and of the same images blurred; a difference smaller than the floor's interval is not "
             "visible to this evaluator.", "",
             "| images | FD [95% CI] | KID (x1e3) |", "|---|---:|---:|",
             f"| test split | {_ci(floor, 'fd', '.3f')} | {1e3 * floor['kid']:.2f} ± {1e3 * floor['kid_se']:.2f} |"]
    lines += [f"| blurred, sigma {s} px | {_ci(b, 'fd', '.3f')} | {1e3 * b['kid']:.2f} ± {1e3 * b['kid_se']:.2f} |"
              for s, b in (blur or {}).items()]
    return lines + [""]


def evaluation_markdown(results: dict[str, dict[str, Any]], pngs: list[str], n: int, acc: str, ref_steps: int,
                        meta: Mapping[str, Any] | None = None) -> str:
    """reports/evaluation.md: the ranked rows at their own n, the FD sensitivity check, the table
    sampler x NFE at n (sorted by NFE, then FD), standard FID when scored, and the plots. A row's
    note (OLSS: paper / beyond paper / which variant olss-N is) follows its name."""
    meta = meta or {}
    lines = [f"# Evaluation ({n} samples per row, evaluator test accuracy {acc})", ""]
    lines += headline_markdown(results, meta) + sensitivity_markdown(meta) + per_class_markdown(results, meta)
    dup = meta.get("dup_threshold")
    lines += [f"## All rows ({n} samples each)", "",
              "FD is comparable only at equal n (small-sample bias, DESIGN.md). RMSE/PSNR against the teacher's "
              f"{ref_steps}-step DDIM sample from the same noise. * = on the FD-vs-GFLOPs Pareto front."
              + (f" dup: share of samples whose nearest other sample (evaluator features) is closer than the "
                 f"{100 * meta.get('dup_quantile', 0.01):g}th percentile of real-real distances." if dup else ""), "",
              "| sampler | NFE | FD | KID (x1e3) | prec | rec | dup | RMSE | PSNR | GFLOPs/img | img/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(results.items(), key=lambda kv: (kv[1]["nfe"], kv[1]["fd"])):
        lines.append(f"| {name}{_note(r)}{' *' if r.get('pareto') else ''} | {r['nfe']} | {_ci(r, 'fd', '.3f')} | "
                     f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
                     f"{_dup(r)} | {r['rmse']:.4f} | {r['psnr']:.1f} | {r['gflops']:.3f}{_per_net(r)} | "
                     f"{r['images_per_s']:.0f} |")
    inc = {k: r["inception"] for k, r in results.items() if "inception" in r}
    if inc:
        lines += ["", "Standard FID (Inception-v3 pool features, user-supplied weights; training-split statistics):", "",
                  "| sampler | FID | KID (x1e3) |", "|---|---:|---:|"]
        lines += [f"| {k} | {s['fd']:.3f} | {1e3 * s['kid']:.2f} ± {1e3 * s['kid_se']:.2f} |" for k, s in inc.items()]
    lines += [""] + [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def write_evaluation_report(results: dict[str, dict[str, Any]], out: Path, n: int, acc: float | None,
                            ref_steps: int, meta: Mapping[str, Any] | None = None) -> None:
    """The plots and reports/evaluation.md under ``out`` (marks the Pareto rows in ``results``)."""
    pngs = evaluation_plots(results, out)
    md = evaluation_markdown(results, pngs, n, f"{acc:.3f}" if acc is not None else "n/a", ref_steps, meta)
    storage.atomic_write_bytes(out / "evaluation.md", md.encode())


def write_evaluation_csv(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """The DVC plot of the evaluation: sampler, family, nfe, fd, kid, rmse, gflops."""
    write_csv(path, ["sampler", "family", "nfe", "fd", "kid", "rmse", "gflops"],
              ([name, r["family"], r["nfe"], f"{r['fd']:.6g}", f"{r['kid']:.6g}", f"{r['rmse']:.6g}",
                f"{r['gflops']:.6g}"] for name, r in results.items()))


# --- redundancy ---------------------------------------------------------------------------------

def redundancy_plot(results: Mapping[str, Mapping[str, Any]], path: Path, boundary: float | None) -> None:
    """One x-error curve per model against log-SNR (dashed: not a patch-study teacher)."""
    plt = _pyplot()
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


def redundancy_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
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


def write_redundancy_csv(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """The DVC plot: model, patch, logsnr, mse (non-empty bins)."""
    write_csv(path, ["model", "patch", "logsnr", "mse"],
              ([name, "/".join(map(str, r["patch_sizes"])), f"{b['logsnr']:.4g}", f"{b['mse']:.6g}"]
               for name, r in results.items() for b in r["bins"] if b["n"]))


# --- objective study ----------------------------------------------------------------------------

OBJECTIVE_COLS = ("x_mse", "x_mse_high_noise", "x_mse_low_noise", "fd", "kid")


def _f(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def objective_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """study/objective.md: variant x patch size (x-MSE overall, high and low noise, FD/KID)."""
    lines = ["# Objective study: eps / x / v prediction and loss weighting, by patch size", ""]
    if not rows:
        lines.append("Off: set objective.variants in params.yaml (see its comment) to run it.")
    else:
        r0 = next(iter(rows.values()))
        lines += [f"Each teacher: {r0['train_steps']} training steps. x-MSE: per-dimension MSE of x-hat on "
                  f"the test split, mean over equal-width log-SNR bins (high noise: bins with log-SNR <= 0). "
                  f"FD/KID: {r0.get('fd_n', '-')} DDIM samples at {r0.get('fd_steps', '-')} steps, evaluator "
                  "features (comparable only within this table).", "",
                  "| variant | P | x-MSE | x-MSE high noise | x-MSE low noise | FD | KID x1e3 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows.values(), key=lambda r: (r["patch_size"], r["variant"])):
            lines.append(f"| {r['variant']} | {r['patch_size']} | {_f(r['x_mse'], '.4f')} | "
                         f"{_f(r['x_mse_high_noise'], '.4f')} | {_f(r['x_mse_low_noise'], '.4f')} | "
                         f"{_f(r.get('fd'), '.3f')} | {_f(1e3 * r['kid'] if 'kid' in r else None, '.1f')} |")
    return "\n".join(lines) + "\n"


def write_objective_csv(rows: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    write_csv(path, ["variant", "patch", *OBJECTIVE_COLS],
              ([r["variant"], r["patch_size"], *[f"{r[c]:.6g}" if c in r else "" for c in OBJECTIVE_COLS]]
               for r in rows.values()))
