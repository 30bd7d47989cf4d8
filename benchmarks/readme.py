"""Regenerate the README's results sections from the committed metrics (never typed by hand).

Every block of README.md between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` is
rewritten from ``metrics/*.json`` and ``reports/`` by the function ``NAME`` below; the text around
the blocks is left alone. ``<!-- generated:NAME@RUN -->`` runs the same function on a kept run,
``results/RUN/`` (the same layout: ``metrics/``, ``reports/``, ...; e.g. ``results/cpu-full``, the
runs of the studies the lean CPU default leaves out). After `dvc repro` (new metrics) run

    python benchmarks/readme.py            # rewrite README.md in place
    python benchmarks/readme.py --check    # exit 1 if README.md differs from what the metrics give

``tests/unit/test_readme.py`` runs the check on the committed metrics, and checks that every file and
image the README references exists. Which rows a table shows is chosen here; every number comes
from the metrics files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from fewstep.ranking import IncomparableError, claim, interval

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated:(?P<name>[a-z0-9-]+(?:@[a-z0-9-]+)?) -->\n)(?P<body>.*?)"
                   r"(<!-- /generated:(?P=name) -->)", re.S)
RESULTS = "results"  # NAME@RUN blocks read results/RUN/

# (evaluation row, label) of the headline table, in order
HEADLINE = [
    ("teacher ddim 64", "teacher DDIM (reference)"),
    ("teacher ddim 16", "teacher DDIM"),
    ("teacher ddim 8", "teacher DDIM"),
    ("student-8 ddim 8", "**student-8** (distilled)"),
    ("teacher olss-8", None),
    ("diffusers unipc 8", "diffusers UniPC"),
    ("diffusers dpmpp_2m 8", "diffusers DPM-Solver++(2M)"),
    ("teacher ddim 4", "teacher DDIM"),
    ("student-4 ddim 4", "**student-4** (distilled)"),
    ("teacher olss-4", None),
    ("teacher olss-paper-4", None),
    ("teacher olss-p-4", None),
    ("teacher olss-open-4", None),
    ("teacher olss-closed-4", None),
    ("teacher olss-ridge-4", None),
    ("diffusers unipc 4", "diffusers UniPC"),
    ("diffusers dpmpp_2m 4", "diffusers DPM-Solver++(2M)"),
    ("teacher ddim 2", "teacher DDIM"),
    ("student-2 ddim 2", "**student-2** (distilled)"),
]
# OLSS rows (label None above) are labelled from metrics/olss/<model>-<N>.json (fit_olss: each variant's
# label, paper or beyond paper, and which variant olss-N is); metrics written before those fields
# (every file then used the x-hat basis, olss-N was the closed loop) get these
OLSS_LEGACY = {"olss": "**OLSS on {model}** (x-hat, closed loop)", "olss-open": "OLSS x-hat, open loop (beyond paper)",
               "olss-p": "OLSS-P, x-hat basis (beyond paper)", "olss-ridge": "OLSS x-hat, ridge 1e-4 (beyond paper)"}
# (grid file under reports/grids, caption) of the headline picture row
GRIDS = [("teacher-ddim-64", "teacher DDIM 64"), ("teacher-ddim-4", "DDIM 4"), ("teacher-olss-4", "OLSS 4"),
         ("student-4-ddim-4", "student 4"), ("diffusers-unipc-4", "UniPC 4")]
STUDY_MODELS = [("teacher", "teacher (P=2)"), ("teacher-p1", "teacher-p1"), ("teacher-p4", "teacher-p4"),
                ("teacher-split", "teacher-split")]
OBJECTIVES = [("eps-snr", "eps, snr (eps-MSE)"), ("x-sqrt_snr", "x, sqrt_snr (PDM)"), ("x-snr_trunc", "x, snr_trunc (PD)"),
              ("x-snr+1", "x, snr+1 (PD)"), ("v-snr+1", "v, snr+1 (PD)"), ("v-snr_trunc", "v, snr_trunc (PD)")]


def _read(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def _path(root: Path, rel: str) -> str:
    """``rel`` as the README names it: under ``results/RUN/`` when ``root`` is a kept run's folder."""
    return f"{RESULTS}/{root.name}/{rel}" if root.parent.name == RESULTS else rel


def _g(x: float, digits: int = 3) -> str:
    """``digits`` significant digits, no exponent for ordinary magnitudes; inf as 'inf'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.1e}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


def _cost(gflops: float | dict | None) -> str:
    """GFLOPs per call, per network for a split model."""
    if isinstance(gflops, dict):
        return " / ".join(f"{k} {_g(v)}" for k, v in gflops.items())
    return "-" if gflops is None else _g(gflops)


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ci(r: Mapping[str, Any], key: str = "fd") -> str:
    """``value [lo, hi]`` when the row has an interval for ``key`` (fewstep.ranking), else the value."""
    iv = interval(r, key)  # type: ignore[arg-type]
    return _g(r[key]) + (f" [{_g(iv[0])}, {_g(iv[1])}]" if iv and key != "kid" else "")


def _scored(r: Mapping[str, Any], n: int) -> Mapping[str, Any]:
    """A row's scores at its largest n: the ranked block (``headline``) when it has one, else the
    row (scored at ``n``, the table's sample count, in metrics written before rows had their own n)."""
    return r.get("headline") or {**r, "n": r.get("n", n)}


def _vs(a: Mapping[str, Any], b: Mapping[str, Any] | None, name_b: str, key: str = "fd",
        ref: str | None = None) -> str:
    """fewstep.ranking.claim on ``key`` (paired when ``a`` carries a paired block against row
    ``ref``), or why no claim: the one way a generated sentence orders two rows."""
    if b is None:
        return "-"
    if key == "fd" and (interval(a) is None or interval(b) is None) and not (a.get("paired") or {}).get("fd_diff_lo"):
        return "no interval"
    try:
        return claim(a, b, name_b, key, ref=ref)  # type: ignore[arg-type]
    except IncomparableError:
        return f"not compared (n {a.get('n')} vs {b.get('n')})"


def _rows(root: Path) -> dict[str, dict]:
    return _read(root, "metrics/evaluate.json")["rows"]


def olss_label(root: Path, row: str) -> str:
    """The label of OLSS row "<model> <stem>" (stem olss-N or <variant prefix>-N) from its fit's metrics."""
    model, stem = row.split(" ", 1)
    n = stem.rsplit("-", 1)[1]
    rel = f"metrics/olss/{model}-{n}.json"
    m = _read(root, rel) if (root / rel).exists() else {}
    if "variants" in m:
        if stem == f"olss-{n}":
            return f"**OLSS on {model}** (best held-out: {m['chosen_label']})"
        return next(v["label"] for v in m["variants"].values() if v["file"] == f"{stem}.json")
    return OLSS_LEGACY[stem.rsplit("-", 1)[0]].format(model=model)


def evaluation(root: Path) -> str:
    ev = _read(root, "metrics/evaluate.json")
    acc = _read(root, "metrics/evaluator.json")["test_accuracy"]
    rows = ev["rows"]
    body = [[label or olss_label(root, name), str(r["nfe"]), _ci(r), f"{1e3 * r['kid']:.0f}", _g(r["rmse"]),
             _g(r["psnr"])] for name, label in HEADLINE if (r := rows.get(name))]
    table = _path(root, "reports/evaluation.md")
    return (f"{ev['n_samples']} samples per row, {len(rows)} rows in `{table}`; FD/KID in the pipeline's "
            f"own evaluator features (test accuracy {acc:.4f}), RMSE against the teacher's full-step DDIM sample "
            "from the same noise.\n\n"
            + _table(["sampler", "NFE", "FD", "KID x1e3", "RMSE", "PSNR"], list("lrrrrr"), body))


def ranking(root: Path) -> str:
    """The ranked rows at their own n (the ``headline`` blocks, else the table's n), each against the
    teacher's reference-steps DDIM only where the 95% intervals separate."""
    ev = _read(root, "metrics/evaluate.json")
    rows = ev["rows"]
    ref_name = next((k for k, r in rows.items() if r.get("is_reference")), None)
    n = ev["n_samples"]
    ref = _scored(rows[ref_name], n) if ref_name else None
    ranked = {k: r for k, r in rows.items() if "headline" in r} or {
        name: rows[name] for name, _ in HEADLINE if name in rows}
    body = []
    label = "the teacher's DDIM-" + str(rows[ref_name]["nfe"]) if ref_name else ""
    for name, r in sorted(ranked.items(), key=lambda kv: (-kv[1]["nfe"], _scored(kv[1], n)["fd"])):
        h = _scored(r, n)
        kid = f"{1e3 * h['kid']:.0f}" + (f" ± {1e3 * h['kid_se']:.0f}" if h.get("kid_se") is not None else "")
        dup = _g(h["dup_rate"], 2) if "dup_rate" in h else "-"
        p = h.get("paired") or {}
        diff = (f"{_g(p['fd_diff'], 2)} [{_g(p['fd_diff_lo'], 2)}, {_g(p['fd_diff_hi'], 2)}]"
                if p.get("fd_diff_lo") is not None else "-")
        r_name = p.get("ref", ref_name)  # a conditional row's reference is the teacher's DDIM at its own w
        if r.get("is_reference"):
            vs = ["reference", "reference"]
        elif r_name in rows:
            r_label = "the teacher's DDIM-" + str(rows[r_name]["nfe"]) if r_name != ref_name else label
            vs = [_vs(h, _scored(rows[r_name], n), r_label, key, ref=r_name) for key in ("fd", "kid")]
        else:
            vs = ["-", "-"]
        body.append([name, str(r["nfe"]), str(h["n"]), _ci(h), kid, _g(h["recall"], 2), dup, diff, *vs])
    floor = ev.get("fd_floor")
    sens = _resolution(ranked, rows, n)
    if floor:
        blur = ", ".join(f"sigma {s} px {_ci(b)}" for s, b in ev.get("fd_blur", {}).items())
        sens += (f"\nWhat FD can see (test split, n={floor['n']}): held-out real images score {_ci(floor)} (the floor), "
                f"the same images blurred: {blur}.\n")
    acc_file = root / "metrics/evaluator.json"
    acc = f" (test accuracy {_read(root, 'metrics/evaluator.json')['test_accuracy']:.4f})" if acc_file.exists() else ""
    return ("FD with its 95% bootstrap interval, KID ± its standard error (x1e3), recall, the duplicate rate, all in "
            f"the pipeline's own evaluator features{acc}: an order holds in that feature space only. Every ranked "
            "row is sampled from the same x_T seeds as the reference, so it is compared with it paired: ΔFD is "
            "FD(row) - FD(reference) with the 95% interval of a joint bootstrap over the same images, KID's "
            "difference is claimed beyond 2 paired standard errors. FD and KID are judged separately; an order is "
            "stated only where that metric's uncertainty separates, else \"within noise\" "
            "(`fewstep.ranking`).\n\n"
            + _table(["row", "NFE", "n", "FD [95% CI]", "KID x1e3", "recall", "dup", "ΔFD vs ref [95% CI]",
                      "FD vs reference", "KID vs reference"], list("lrrrrrrrll"), body) + sens)


def _resolution(ranked: Mapping[str, Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]], n: int) -> str:
    """What the ranking can resolve in this run: the 95% half-widths, relative to the reference's FD,
    of each ranked row's own FD interval (unpaired) and of its paired FD difference."""
    unpaired, paired = [], []
    for r in ranked.values():
        h = _scored(r, n)
        p = h.get("paired") or {}
        ref = rows.get(p.get("ref", ""))
        if p.get("fd_diff_lo") is None or ref is None:
            continue
        ref_fd = _scored(ref, n)["fd"]
        paired.append((p["fd_diff_hi"] - p["fd_diff_lo"]) / 2 / ref_fd)
        if h.get("fd_lo") is not None:
            unpaired.append((h["fd_hi"] - h["fd_lo"]) / 2 / ref_fd)
    if not paired:
        return ""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    return (f"\nResolution in this run (95% half-widths relative to the reference's FD, over the {len(paired)} "
            f"paired rows): a row's own FD interval {pct(min(unpaired))}-{pct(max(unpaired))} "
            f"(median {pct(statistics.median(unpaired))}); the paired FD difference {pct(min(paired))}-"
            f"{pct(max(paired))} (median {pct(statistics.median(paired))}).\n") if unpaired else ""


OLSS_LABELS = {"ddim": "DDIM on the same steps (no fit)", "olss": "registered `olss-N` (x-hat, closed loop)",
               "olss_open": "OLSS x-hat, open loop (beyond paper)", "olss_p": "OLSS-P, x-hat basis (beyond paper)",
               "olss_ridge": "OLSS x-hat, ridge (beyond paper)"}  # metrics/olss files without a variants table


def _olss_variants(m: Mapping[str, Any], model: str, n: int) -> list[tuple[str, str, float]]:
    """(evaluation row, label, held-out RMSE) for DDIM, the registered olss-N and every variant a
    metrics/olss file lists: its ``variants`` table (fit_olss: file, label, paper or beyond paper),
    else (older files) the keys of ``rmse_vs_full_step`` (olss_x_y -> row olss-x-y-N)."""
    held = m.get("rmse_vs_full_step") or {}
    out = [(f"{model} ddim {n}", OLSS_LABELS["ddim"], held.get("ddim"))]
    if "variants" in m:
        out.append((f"{model} olss-{n}", f"registered `olss-N` = {m.get('chosen_label', m.get('chosen'))}",
                    held.get("olss")))
        out += [(f"{model} {Path(v['file']).stem}", v["label"], v.get("holdout_rmse")) for v in m["variants"].values()]
        return out
    return out + [(f"{model} {k.replace('_', '-')}-{n}", OLSS_LABELS.get(k, k), v) for k, v in held.items() if k != "ddim"]


def olss(root: Path) -> str:
    """One table per metrics/olss/<model>-<N>.json, a row per variant the file lists (generic: a new
    variant appears when fit_olss writes it): held-out RMSE from fit_olss, and the evaluation's row
    of the same scheduler file (RMSE and FD with 95% intervals, same seeds for every variant)."""
    ev = _read(root, "metrics/evaluate.json")
    rows = ev["rows"]
    out = []
    for f in sorted((root / "metrics/olss").glob("*.json"), key=lambda p: (p.stem.rsplit("-", 1)[0],
                                                                          int(p.stem.rsplit("-", 1)[1]))):
        m = json.loads(f.read_text())
        model, n = m.get("model", f.stem.rsplit("-", 1)[0]), int(m.get("steps", f.stem.rsplit("-", 1)[1]))
        body = []
        for name, label, held in _olss_variants(m, model, n):
            r = rows.get(name)
            h = _scored(r, ev["n_samples"]) if r else None
            body.append([f"`{name.split(' ', 1)[1]}`", label, _g(held),
                         _ci(h, "rmse") if h else "-", _ci(h) if h else "-", str(h.get("n", "-")) if h else "-"])
        out.append(f"{model}, {n} steps (olss-N's path {m.get('path')}; held-out RMSE on {m.get('holdout_seeds', '-')} seeds "
                   "against the full-step DDIM sample):\n\n"
                   + _table(["variant", "what", "held-out RMSE", "eval RMSE [95% CI]", "FD [95% CI]", "n"],
                            list("llrrrr"), body))
    return "\n".join(out) if out else "No OLSS metrics.\n"


def grids(root: Path) -> str:
    """The headline grids this run made (a sampler the run left out, e.g. the diffusers peers, has none)."""
    shown = [(name, cap) for name, cap in GRIDS if (root / f"reports/grids/{name}.png").exists()]
    cells = [f"![{cap}]({_path(root, f'reports/grids/{name}.png')})" for name, cap in shown]
    return (_table([cap for _, cap in shown], ["l"] * len(shown), [cells])
            + "\n*Same seeds in every grid (`evaluate`).*\n")


def pareto(root: Path) -> str:
    rows = _rows(root)
    pts = sorted((r["gflops"], r["fd"], name) for name, r in rows.items() if math.isfinite(r["fd"]))
    front, best = [], math.inf
    for gflops, fd, name in pts:
        if fd < best:
            front.append((gflops, fd, name))
            best = fd
    return "Front (GFLOPs per image, FD): " + ", ".join(f"{n} ({_g(g)}, {_g(f)})" for g, f, n in front) + ".\n"


def teacher(root: Path) -> str:
    t = _read(root, "metrics/teacher.json")
    return (f"Teacher training (`{_path(root, 'metrics/teacher.json')}`): {t['steps']:,} steps, {t['params']:,} parameters, "
            f"{t['images_per_s']:.0f} images/s on the `{t['device']}` (final loss {_g(t['final_loss'])}).\n")


def distill(root: Path) -> str:
    out = []
    for f in sorted((root / "metrics").glob("student-*.json"), key=lambda p: -int(p.stem.split("-")[1])):
        m = json.loads(f.read_text())
        out.append([f.stem, f"{m['parent_steps']} -> {m['student_steps']}", _g(m["rmse_student_vs_parent"]),
                    _g(m["rmse_parent_half_steps_vs_parent"]), f"{m['seconds']:.0f}"])
    return _table(["round", "steps", "RMSE student vs parent", "RMSE parent at half steps vs parent", "s"],
                  list("lrrrr"), out)


def study_rows(root: Path) -> str:
    rows = _rows(root)
    body = []
    for model, label in STUDY_MODELS:
        for nfe in (4, 16):
            r = rows.get(f"{model} ddim {nfe}")
            if r:
                body.append([label, str(nfe), _g(r["fd"]), _g(r["rmse"]), _g(r["gflops"]), f"{r['images_per_s']:.0f}"])
    train = []
    for f in sorted((root / "metrics/study").glob("*.json")):
        m = json.loads(f.read_text())
        secs = m.get("train_seconds")
        train.append([f.stem, str(m.get("patch_size", "-")), str(m.get("steps", "-")),
                      _cost(m.get("gflops_per_call")),
                      f"{secs:.0f}" if secs is not None else "-"])
    return (_table(["model", "NFE", "FD", "RMSE", "GFLOPs/img", "img/s"], list("lrrrrr"), body) + "\n"
            + _table(["study model", "P", "steps", "GFLOPs/call", "train s"], list("lrrrr"), train))


def redundancy(root: Path) -> str:
    d = _read(root, "metrics/redundancy.json")
    models = list(d["models"])
    bins = d["models"][models[0]]["bins"]
    body = [[f"{b['logsnr']:.1f}"] + [_g(d["models"][m]["bins"][i]["mse"]) for m in models] for i, b in enumerate(bins)]
    return (f"{d['n_images']} test images, x-MSE per dimension by log-SNR bin:\n\n"
            + _table(["log-SNR"] + [d["models"][m]["label"] for m in models], ["l"] + ["r"] * len(models), body))


def objective(root: Path) -> str:
    d = root / "metrics/objective"
    body = []
    for variant, label in OBJECTIVES:
        cells = [label]
        for p in (1, 4):
            f = d / f"{variant}-p{p}.json"
            m = json.loads(f.read_text()) if f.exists() else None
            cells += [_g(m["x_mse"]), _g(m["x_mse_high_noise"]), _g(m["fd"])] if m else ["-"] * 3
        body.append(cells)
    return _table(["variant (param-weighting)", "P=1 x-MSE", "high noise", "FD", "P=4 x-MSE", "high noise", "FD"],
                  list("lrrrrrr"), body)


def ddim_study(root: Path) -> str:
    d = _read(root, "metrics/ddim_study.json")
    rec = sorted(d["reconstruction"].values(), key=lambda r: r["steps"])
    cons = sorted((r for r in d["consistency"]["rows"].values() if r["steps"] != d["consistency"]["reference_steps"]),
                  key=lambda r: r["steps"])
    t1 = _table(["steps (each way)"] + [str(r["steps"]) for r in rec], ["l"] + ["r"] * len(rec),
                [["MSE, images in [-1, 1]"] + [f"{_g(r['mse'], 2)} ± {_g(r['mse_se'], 2)}" for r in rec],
                 ["MSE on the [0, 1] scale"] + [_g(r["mse_01"], 2) for r in rec]])
    t2 = _table(["steps"] + [str(r["steps"]) for r in cons], ["l"] + ["r"] * len(cons),
                [[f"pixel RMSE to the {d['consistency']['reference_steps']}-step image"] + [_g(r["rmse"], 2) for r in cons],
                 ["evaluator-feature distance (relative)"]
                 + [f"{_g(r['feat_dist'], 2)} ({_g(r['feat_dist_rel'], 2)})" for r in cons]])
    return f"{d['n_images']} test images, {d['spacing']} spacing:\n\n" + t1 + "\n" + t2


COND_RESULTS = "results/cpu-cond"  # a profiles/cpu-cond.yaml run: its metrics/evaluate.json, copied here


def per_class_table(ev: Mapping[str, Any], steps: tuple[int, ...] = (4, 8)) -> str:
    """The class-conditional rows of ``ev`` (an evaluate.json) at ``steps``: DDIM, the headline
    olss-N and the students, at every guidance scale w, with FD/KID overall, the evaluator's
    accuracy on the asked class (± s.e.) and FD / accuracy per class."""
    rows = {k: r for k, r in ev["rows"].items() if "accuracy" in r and r.get("steps") in steps
            and r["family"] in ("ddim", "student", "olss")}
    names = list(ev.get("class_names") or [])
    if not rows:
        return "No class-conditional rows at " + " or ".join(map(str, steps)) + " steps in this evaluation.\n"
    n, k = ev["n_samples"], max(1, len(names))
    body = []
    for name, r in sorted(rows.items(), key=lambda kv: (kv[1]["steps"], kv[1]["guidance"], kv[1]["family"], kv[0])):
        per = r.get("per_class", {})
        note = f" (distilled at w={r['distilled_guidance']:g})" if r.get("distilled_guidance") is not None else ""
        body.append([name + note, f"{r['guidance']:g}", str(r["nfe"]), _ci(r),
                     f"{1e3 * r['kid']:.0f} ± {1e3 * r['kid_se']:.0f}",
                     f"{_g(r['accuracy'], 2)} ± {_g(r['accuracy_se'], 1)}"]
                    + [f"{_g(per[c]['fd'])} / {_g(per[c]['accuracy'], 2)}" if c in per else "-" for c in names])
    return (f"{n} samples per row ({n // k} per class: seed s is of class (s - seed) mod {k}); w is the guidance scale "
            "(diffusers' guidance_scale = 1 + w) and NFE counts both evaluations of a guided step; acc is the share "
            f"of samples the evaluator classifies as the asked class (chance {1 / k:.2f}); per class: FD against the "
            "test images of that class / acc.\n\n"
            + _table(["row", "w", "NFE", "FD [95% CI]", "KID x1e3", "acc"] + [f"{c}: FD / acc" for c in names],
                     list("lrrrrr") + ["r"] * len(names), body))


def per_class(root: Path) -> str:
    """The class-conditional CPU profile's results (``results/cpu-cond/evaluate.json``)."""
    path = root / COND_RESULTS / "evaluate.json"
    if not path.exists():
        return (f"Not run yet: `python -m stages.profile cpu-cond && dvc repro`, then copy `metrics/evaluate.json` "
                f"to `{COND_RESULTS}/`.\n")
    return per_class_table(json.loads(path.read_text()))


HOUR_RESULTS = "results/cpu-hour"  # a profiles/cpu-hour.yaml run: evaluate.json, grids/, stage_times.json


def _hour_order(r: Mapping[str, Any]) -> tuple:
    fam = {"ddim": 0, "olss": 1, "student": 2, "peer": 3}.get(r["family"], 4)
    return (not r.get("is_reference"), -r.get("steps", 0) if r.get("is_reference") else r.get("steps", 0), fam)


def cpu_hour(root: Path) -> str:
    """The one-hour CPU profile's run (``results/cpu-hour/``): its evaluation table (DDIM, the headline
    olss-N, the students and the diffusers peers, each with its w and NFE), the stage times, and the
    per-class grids of the rows that have one; before that run, one line saying so."""
    d = root / HOUR_RESULTS
    if not (d / "evaluate.json").exists():
        return ("Not run yet: `python -m stages.profile cpu-hour && dvc repro` (projected under 50 min on 2 cores), then "
                f"copy `metrics/evaluate.json`, `reports/grids/*-classes.png` (to `grids/`) and `python "
                f"benchmarks/stage_times.py --json stage_times.json` to `{HOUR_RESULTS}/`.\n")
    ev = json.loads((d / "evaluate.json").read_text())
    rows = {k: r for k, r in ev["rows"].items() if r["family"] in ("ddim", "olss", "student", "peer")}
    names = list(ev.get("class_names") or [])
    body = []
    for name, r in sorted(rows.items(), key=lambda kv: (_hour_order(kv[1]), kv[0])):
        note = f" (distilled at w={r['distilled_guidance']:g})" if r.get("distilled_guidance") is not None else ""
        acc = f"{_g(r['accuracy'], 2)} ± {_g(r['accuracy_se'], 1)}" if "accuracy" in r else "-"
        body.append([name + note + (" (reference)" if r.get("is_reference") else ""),
                     f"{r['guidance']:g}" if "guidance" in r else "-", str(r["nfe"]), _ci(r),
                     f"{1e3 * r['kid']:.0f} ± {1e3 * r['kid_se']:.0f}", acc,
                     "-" if r.get("is_reference") else _g(r["rmse"])])
    out = (f"{ev['n_samples']} samples per row, {len(names)} classes (seed s is of class (s - seed) mod {len(names)}); "
           "w is the guidance scale (diffusers' guidance_scale = 1 + w), NFE counts both evaluations of a guided step; "
           f"acc: the share the evaluator classifies as the asked class (chance {1 / max(1, len(names)):.2f}); RMSE "
           "against the reference.\n\n"
           + _table(["row", "w", "NFE", "FD [95% CI]", "KID x1e3", "acc", "RMSE"], list("lrrrrrr"), body))
    times = d / "stage_times.json"
    if times.exists():
        st = json.loads(times.read_text())
        wall = (f"Wall time {st['wall_s'] / 60:.1f} min for the whole `dvc repro` on 2 cores (the stages "
                f"{st['total_s'] / 60:.1f} min, DVC and process starts the rest)" if "wall_s" in st
                else f"The stages took {st['total_s'] / 60:.1f} min on 2 cores")
        out += (f"\n{wall}: " + ", ".join(f"{s} {sec / 60:.1f}" for s, sec in st["stages"].items()) + " (min).\n")
    pics = [(n, f"{HOUR_RESULTS}/grids/{n.replace(' ', '-').replace('=', '-')}-classes.png")
            for n, _ in sorted(rows.items(), key=lambda kv: (_hour_order(kv[1]), kv[0]))]
    pics = [(n, f) for n, f in pics if (root / f).exists()]
    if pics:
        out += "\n" + "\n".join(f"![{n}]({f})" for n, f in pics) + "\n"
    return out


def cpu_recipe(root: Path) -> str:
    """The CPU default's teacher against the previous recipe (benchmarks/results/teacher_recipe.json: the
    same seeds, evaluator and n) and against the stock diffusers recipe given its seconds
    (benchmarks/results/stock_recipe.json); a line saying what is missing otherwise."""
    res = root / "benchmarks" / "results"
    out = []
    sw = res / "teacher_sweep.jsonl"
    if sw.exists():
        pts = [json.loads(line) for line in sw.read_text().splitlines() if line.strip()]
        body = []
        for r in pts:
            t = r["teacher"]
            ts = t.get("t_sampling") or {"kind": "uniform"}
            tsl = "uniform t" if ts["kind"] == "uniform" else f"log-SNR ~ N({ts['mean']:g}, {ts['std']:g}^2)"
            body.append([f"`{r['name']}`", f"{t['steps']:,}", f"{t['lr']:g}", str(t["warmup"]), tsl,
                         f"{_g(r['fd64'][0])} [{_g(r['fd64'][1])}, {_g(r['fd64'][2])}]",
                         f"{_g(r['fd8'][0])} [{_g(r['fd8'][1])}, {_g(r['fd8'][2])}]"])
        out.append("The sweep (`benchmarks/teacher_sweep.py`, `benchmarks/results/teacher_sweep.jsonl`; every other key "
                   "as in the previous default; n = 500, seeds 0..499, that default's evaluator):\n\n"
                   + _table(["point", "steps", "lr", "warmup", "noise levels", "FD, DDIM 64 [95% CI]",
                             "FD, DDIM 8 [95% CI]"], list("lrrrlrr"), body) + "\n")
    tr = res / "teacher_recipe.json"
    if tr.exists():
        m = json.loads(tr.read_text())
        body = []
        for label, r in m["rows"].items():
            body.append([label, str(r["train_steps"]), _ci(r), f"{1e3 * r['kid']:.0f} ± {1e3 * r['kid_se']:.0f}",
                         f"{r['confident']:.2f}"])
        body.append(["real training images", "", "", "", f"{m['real_confident']:.2f}"])
        q = m["ratio"]
        out.append(f"DDIM {m['steps']} steps, n = {m['n']} on the same seeds, one evaluator "
                   f"(`{Path(m['evaluator']).name}`); p >= {m['confident_threshold']:g}: the share of images the "
                   "evaluator gives one class at least that probability.\n\n"
                   + _table(["teacher", "train steps", "FD [95% CI]", "KID x1e3", f"p >= {m['confident_threshold']:g}"],
                            list("lrrrr"), body)
                   + f"\nFD(new) / FD(previous) = {_g(q['candidate_over_baseline'])} [{_g(q['lo'])}, {_g(q['hi'])}] "
                   f"(paired 95%): the previous teacher's FD is {_g(q['improvement'])}x the new one's.\n")
    else:
        out.append("No teacher comparison yet: `python benchmarks/teacher_recipe.py --baseline OLD_TEACHER --json "
                   "benchmarks/results/teacher_recipe.json`.\n")
    st = res / "stock_recipe.json"
    if st.exists():
        m = json.loads(st.read_text())
        sc, rows = m["scores"], m["rows"]
        out.append(f"\nThe stock diffusers recipe given the teacher's {m['seconds']:.0f} s on the same images "
                   f"({rows['stock']['train_steps']:,} steps of a {rows['stock']['params'] / 1e6:.1f}M-parameter "
                   f"UNet2DModel against {rows['fewstep']['train_steps']:,} of fewstep's "
                   f"{rows['fewstep']['params'] / 1e6:.2f}M), DDIM {m['steps']}, n = {m['n']}: FD "
                   f"{_ci(sc['stock'])} against fewstep's {_ci(sc['fewstep'])}, "
                   f"ratio {_g(m['fd_ratio_stock_over_fewstep'])} (> 1: fewstep's teacher is better).\n")
        if (res / "stock_recipe.png").exists() and (root / "samples" / "teacher.png").exists():
            out.append("\n![fewstep's teacher](samples/teacher.png) ![the stock recipe](benchmarks/results/stock_recipe.png)\n\n"
                       "fewstep's teacher (its DDIM-64 grid, `samples/teacher.png`) and the stock recipe "
                       "(`benchmarks/results/stock_recipe.png`), the same seconds.\n")
    cc = res / "cpu_compile.json"
    if cc.exists():
        m = json.loads(cc.read_text())
        body = [[r["loop"], f"{1e3 * r['seconds']['eager']:.0f}", f"{1e3 * r['seconds']['compile']:.0f}",
                 f"{r['ratio']:.2f}", f"{r['compile_s']:.0f}",
                 "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:,.0f}"] for r in m["rows"]]
        out.append(f"\n`torch.compile` (TorchInductor, mode {m['mode']}) on the same CPU, {m['threads']} threads, the "
                   "default's net and batches, eager and compiled interleaved in one run "
                   "(`python benchmarks/cpu_compile.py`, `benchmarks/results/cpu_compile.json`); compile s: the "
                   "first calls' extra seconds (the compilation a stage's process would pay); break-even: the steps "
                   "after which the faster steps have paid for it:\n\n"
                   + _table(["loop", "eager ms", "compiled ms", "eager / compiled", "compile s", "break-even steps"],
                            list("lrrrrr"), body))
    return "".join(out)


def make_run(root: Path) -> str:
    """The fresh-clone `make run` of benchmarks/results/make_run.json (benchmarks/make_run.py)."""
    f = root / "benchmarks" / "results" / "make_run.json"
    if not f.exists():
        return "Not measured yet: `python benchmarks/make_run.py DIR` (alone on the machine).\n"
    m = json.loads(f.read_text())
    body = [[f"`{st}`", f"{sec:.0f}", f"{sec / m['total_s']:.0%}"] for st, sec in m["stages"].items()]
    body.append(["install (`make setup`, until the first stage starts)", f"{m['install_s']:.0f}",
                 f"{m['install_s'] / m['total_s']:.0%}"])
    body.append(["DVC and each stage process's start, between the stages", f"{m['between_stages_s']:.0f}",
                 f"{m['between_stages_s'] / m['total_s']:.0%}"])
    return (f"`make run` from a fresh clone of {m['commit']} ({m['date'][:10]}, {m['cores']} cores, {m['cpu']}): "
            f"**{m['total_s'] / 60:.1f} minutes** ({m['total_s']:.0f} s) end to end.\n\n"
            + _table(["part", "seconds", "share"], list("lrr"), body))


SECTIONS: dict[str, Callable[[Path], str]] = {
    "evaluation": evaluation, "grids": grids, "pareto": pareto, "teacher": teacher, "distill": distill,
    "ranking": ranking, "olss": olss, "study-rows": study_rows, "redundancy": redundancy, "objective": objective,
    "ddim-study": ddim_study, "per-class": per_class, "cpu-hour": cpu_hour,
    "cpu-recipe": cpu_recipe, "make-run": make_run,
}


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated block rewritten from the metrics under ``root``."""
    def sub(m: re.Match) -> str:
        name, _, run = m.group("name").partition("@")
        if name not in SECTIONS:
            raise SystemExit(f"README.md: unknown generated section {name!r} (known: {', '.join(SECTIONS)})")
        src = root / RESULTS / run if run else root
        if not src.is_dir():
            raise SystemExit(f"README.md: generated section {m.group('name')!r} reads {src}, which does not exist")
        return m.group(1) + SECTIONS[name](src) + m.group(4)

    return BLOCK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README differs from the metrics")
    a = ap.parse_args(argv)
    text = a.readme.read_text()
    new = render(text, a.readme.resolve().parent)
    if a.check:
        if new != text:
            print(f"{a.readme}: generated sections are stale; run `python benchmarks/readme.py`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        a.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
