"""Apply a profile to params.yaml so DVC tracks it: `python -m stages.profile gpu`.

DVC only sees params.yaml, not $FEWSTEP_PROFILE, so `make run PROFILE=gpu` writes the merged
params (params.yaml + profiles/gpu.yaml) into params.yaml and DVC re-runs exactly what changed.
`git checkout params.yaml` returns to the CPU default. The merged file is validated first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fewstep.config import ParamsError, deep_merge, validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    path = Path(args.params)
    prof = path.parent / "profiles" / f"{args.profile}.yaml"
    if not prof.exists():
        raise SystemExit(f"profile: error: {prof} does not exist")
    merged = deep_merge(yaml.safe_load(path.read_text()) or {}, yaml.safe_load(prof.read_text()) or {})
    try:
        validate(merged, f"{path} + {prof}")
    except ParamsError as e:
        raise SystemExit(f"profile: error: {e}") from None
    header = f"# params.yaml with profiles/{args.profile}.yaml applied (git checkout params.yaml to undo)\n"
    path.write_text(header + yaml.safe_dump(merged, sort_keys=False))
    print(f"profile: applied {prof} to {path}")


if __name__ == "__main__":
    main()
