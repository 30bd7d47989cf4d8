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
from typing import Sequence

from fewstep.profiles import apply_profile
from stages._common import user_errors


def main(argv: Sequence[str] | None = None) -> None:
    """Not a DVC stage (it writes params.yaml itself); the same clear errors: one line, exit 2."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile")
    ap.add_argument("--smoke", action="store_true", help="shrink every size, keep every stage (a CPU dry run)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(None if argv is None else list(argv))
    path = Path(args.params)
    with user_errors("profile"):
        prof = apply_profile(path, args.profile, args.smoke)
    print(f"profile: applied {prof} to {path}")


if __name__ == "__main__":
    main()
