"""Apply a profile to params.yaml so DVC tracks it: `python -m stages.profile gpu`.

DVC only sees params.yaml, not $FEWSTEP_PROFILE, so `make run PROFILE=gpu` writes the merged
params (params.yaml + profiles/gpu.yaml) into params.yaml and DVC re-runs exactly what changed.
`git checkout params.yaml` returns to the CPU default. The merged file is validated first.

`--smoke` shrinks every size (training steps, batches, samples, images, reference steps) and keeps
the structure (models, distillation rounds, patch sizes, split model, OLSS models and step counts,
samplers): `python -m stages.profile gpu --smoke && dvc repro` runs every stage of the GPU profile on
a laptop CPU in minutes, before any GPU time is spent on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fewstep.config import ParamsError, deep_merge, validate

# Sizes only: every key exists in any profile, none adds or removes a stage.
SMOKE = {
    "prepare": {"max_per_class": 50, "test_max_per_class": 20},
    "teacher": {"steps": 4, "batch_size": 8, "warmup": 1, "checkpoint_every": 2, "log_every": 2,
                "sample": {"n": 4, "steps": 4}},
    "distill": {"defaults": {"train_steps": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
                             "sample": {"n": 4}}},
    "trajectories": {"n_fit": 4, "reference_steps": 64, "batch_size": 4, "shard_size": 2},
    "olss": {"n_holdout": 2, "max_elements": 4096},
    "evaluator": {"steps": 4, "batch_size": 16, "ref_subset": 50},
    "evaluate": {"n_samples": 10, "batch_size": 10, "reference_steps": 64, "kid_subsets": 2, "grid_n": 4},
    "study": {"teacher": {"steps": 2, "warmup": 1, "checkpoint_every": 2, "sample": {"n": 4, "steps": 4}}},
    "objective": {"teacher": {"steps": 2, "warmup": 1, "checkpoint_every": 2, "batch_size": 8},
                  "n_test": 8, "n_samples": 10, "sample_steps": 4},
    "redundancy": {"n_images": 8, "bins": 4},
    "ddim_study": {"n_images": 2, "recon_steps": [10], "consistency_steps": [10, 20], "n_consistency": 2,
                   "interp_pairs": 1, "interp_n": 2, "interp_steps": 4},
}


def smoke(params: dict) -> dict:
    """``params`` with every size shrunk and the structure kept (see the module docstring)."""
    out = deep_merge(params, SMOKE)
    for r in (out.get("distill", {}).get("rounds") or {}).values():
        r.pop("train_steps", None)
        r.pop("batch_size", None)
    for sm in (out.get("split", {}).get("models") or {}).values():
        for side in ("high", "low"):
            sm.setdefault(side, {}).update({"steps": 2, "warmup": 1, "checkpoint_every": 2})
    ev = out.setdefault("evaluate", {})
    cap = lambda xs: sorted({min(int(n), 64) for n in xs})  # noqa: E731  (64 = the smoke reference)
    for key in ("ddim_steps", "eta_steps", "study_steps"):
        if key in ev:
            ev[key] = cap(ev[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile")
    ap.add_argument("--smoke", action="store_true", help="shrink every size, keep every stage (a CPU dry run)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    path = Path(args.params)
    prof = path.parent / "profiles" / f"{args.profile}.yaml"
    if not prof.exists():
        raise SystemExit(f"profile: error: {prof} does not exist")
    merged = deep_merge(yaml.safe_load(path.read_text()) or {}, yaml.safe_load(prof.read_text()) or {})
    if args.smoke:
        merged = smoke(merged)
    try:
        validate(merged, f"{path} + {prof}")
    except ParamsError as e:
        raise SystemExit(f"profile: error: {e}") from None
    what = f"profiles/{args.profile}.yaml{' (smoke sizes)' if args.smoke else ''}"
    header = f"# params.yaml with {what} applied (git checkout params.yaml to undo)\n"
    path.write_text(header + yaml.safe_dump(merged, sort_keys=False))
    print(f"profile: applied {prof} to {path}")


if __name__ == "__main__":
    main()
