"""Stage objective_report: the objective study's table from metrics/objective/*.json.

Outputs: study/objective.md (variant x patch size: x-MSE on the test split overall, at high noise
(log-SNR bins <= 0) and low noise (>= 0), FD/KID when scored) and plots/objective.csv.
With objective.variants empty the table says the study is off.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from fewstep import storage
from stages import _common

COLS = ("x_mse", "x_mse_high_noise", "x_mse_low_noise", "fd", "kid")


def _f(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--metrics", default="metrics/objective")
    ap.add_argument("--out", default="study/objective.md")
    args = ap.parse_args()
    with _common.clear_errors("objective_report"):
        p, _ = _common.setup(args)
        wanted = {f"{v}-p{P}" for v in p.objective.variants for P in p.objective.patch_sizes}
        rows = {f.stem: storage.read_json(f) for f in sorted(Path(args.metrics).glob("*.json")) if f.stem in wanted}
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
            order = sorted(rows.values(), key=lambda r: (r["patch_size"], r["variant"]))
            for r in order:
                lines.append(f"| {r['variant']} | {r['patch_size']} | {_f(r['x_mse'], '.4f')} | "
                             f"{_f(r['x_mse_high_noise'], '.4f')} | {_f(r['x_mse_low_noise'], '.4f')} | "
                             f"{_f(r.get('fd'), '.3f')} | {_f(1e3 * r['kid'] if 'kid' in r else None, '.1f')} |")
        storage.atomic_write_bytes(Path(args.out), ("\n".join(lines) + "\n").encode())
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["variant", "patch", *COLS])
        for r in rows.values():
            w.writerow([r["variant"], r["patch_size"], *[f"{r[c]:.6g}" if c in r else "" for c in COLS]])
        storage.atomic_write_bytes(Path("plots/objective.csv"), buf.getvalue().encode())
        print("\n".join(lines))


if __name__ == "__main__":
    main()
