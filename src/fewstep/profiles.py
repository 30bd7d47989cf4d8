"""Profiles: params.yaml with profiles/NAME.yaml merged over it, and the smoke version of a profile.

DVC only sees params.yaml, not $FEWSTEP_PROFILE, so `make run PROFILE=gpu` writes the merged
params into params.yaml (:func:`apply_profile`) and DVC re-runs exactly what changed. The smoke
version shrinks every size (training steps, batches, samples, images, reference steps) and keeps
the structure (models, distillation rounds, patch sizes, split model, OLSS models and step counts,
samplers): every stage of a GPU profile runs on a laptop CPU in minutes.
"""

from __future__ import annotations

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
    "evaluate": {"n_samples": 10, "batch_size": 10, "reference_steps": 64, "kid_subsets": 2, "grid_n": 4,
                 "n_headline": 0, "fd_resamples": 20},
    "study": {"teacher": {"steps": 2, "warmup": 1, "checkpoint_every": 2, "sample": {"n": 4, "steps": 4}}},
    "objective": {"teacher": {"steps": 2, "warmup": 1, "checkpoint_every": 2, "batch_size": 8},
                  "n_test": 8, "n_samples": 10, "sample_steps": 4},
    "redundancy": {"n_images": 8, "bins": 4},
    "ddim_study": {"n_images": 2, "recon_steps": [10], "consistency_steps": [10, 20], "n_consistency": 2,
                   "interp_pairs": 1, "interp_n": 2, "interp_steps": 4},
}


SMOKE_ALL_CLASSES = 10  # the class count a smoke run assumes for prepare.classes: null (CIFAR-10)


class ProfileError(ParamsError):
    """A profile that does not exist."""


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
    if (out.get("teacher") or {}).get("conditioning") and ev.get("per_class", True):
        # per-class FD/KID needs 3 samples of every class (fewstep.per_class): classes null = all of CIFAR-10's
        k = len((out.get("prepare") or {}).get("classes") or []) or SMOKE_ALL_CLASSES
        ev["n_samples"] = ev["batch_size"] = max(int(ev["n_samples"]), 3 * k)
    cap = lambda xs: sorted({min(int(n), 64) for n in xs})  # noqa: E731  (64 = the smoke reference)
    for key in ("ddim_steps", "eta_steps", "study_steps"):
        if key in ev:
            ev[key] = cap(ev[key])
    return out


def apply_profile(params: Path, profile: str, smoke_sizes: bool = False) -> Path:
    """Write params.yaml + profiles/``profile``.yaml (next to ``params``), validated first, into
    ``params``; with ``smoke_sizes`` the smoke version. Returns the profile file."""
    prof = params.parent / "profiles" / f"{profile}.yaml"
    if not prof.exists():
        raise ProfileError(f"{prof} does not exist")
    merged = deep_merge(yaml.safe_load(params.read_text()) or {}, yaml.safe_load(prof.read_text()) or {})
    if smoke_sizes:
        merged = smoke(merged)
    validate(merged, f"{params} + {prof}")
    what = f"profiles/{profile}.yaml{' (smoke sizes)' if smoke_sizes else ''}"
    header = f"# params.yaml with {what} applied (git checkout params.yaml to undo)\n"
    params.write_text(header + yaml.safe_dump(merged, sort_keys=False))
    return prof
