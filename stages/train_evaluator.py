"""Stage train_evaluator: the feature network for FD/KID and the training split's reference stats.

Outputs models/evaluator/ (weights, config with test accuracy, ref_stats.safetensors with the
mean, covariance and a feature subset of the training split) and metrics/evaluator.json.
"""

from __future__ import annotations

from pathlib import Path

from fewstep import storage
from fewstep.train.evaluator import train_evaluator
from stages import _common
from stages.train_teacher import write_loss_csv


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--out", default="models/evaluator")
    args = ap.parse_args()
    with _common.clear_errors("train_evaluator") as rec:
        p, device = _common.setup(args)
        m = train_evaluator(p.evaluator, Path(args.data), Path(args.out), Path("checkpoints/evaluator"),
                            p.base.seed, device, progress=not args.no_progress)
        history = m.pop("history")
        write_loss_csv(Path("plots/evaluator_loss.csv"), history)
        rec.log_history("loss", history)
        rec.log_metrics(m)
        storage.write_json("metrics/evaluator.json", m)
        print(f"train_evaluator: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
