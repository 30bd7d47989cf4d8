"""Every benchmark of issue #7 in one run, one after another on the same machine, each printing its
table: teacher training images/s against diffusers' UNet2DModel (train_throughput.py), per-net cost
and sampling images/s for P = 1, 2, 4, 8 and the split nets (patch_study.py), the OLSS fit time
(olss_fit.py), the sampler table (samplers.py, needs a finished pipeline) and the per-stage wall time
of the last pipeline run (stage_times.py, from the MLflow stage runs), where a training and a sampling
step spend their time with the MFU (profile_step.py), the GPU profile's projected time per stage
(gpu_budget.py) and, on the CPU, what bf16 / channels_last / threads do to every hot loop
(cpu_precision.py --quick).

    python benchmarks/run_all.py              # CPU: small settings (minutes)
    python benchmarks/run_all.py --gpu        # the GPU sizes (batch 128 training, batch 1000 sampling)

Ratios are only comparable within one run; a table's absolute times are meaningful only on an idle
machine (and quoted only from the GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="GPU-sized settings")
    ap.add_argument("--skip", nargs="*", default=[], help="benchmark names to skip")
    a = ap.parse_args()
    py = sys.executable
    if a.gpu:
        runs = {
            "train_throughput": [py, "benchmarks/train_throughput.py", "--batch", "128", "--channels-last"],
            "patch_study": [py, "benchmarks/patch_study.py", "--profile", "gpu"],
            "olss_fit": [py, "benchmarks/olss_fit.py", "--steps", "4", "5", "8", "10"],
            "samplers": [py, "benchmarks/samplers.py", "--profile", "gpu"],
            "stage_times": [py, "benchmarks/stage_times.py"],
            "profile_step": [py, "benchmarks/profile_step.py", "--profile", "gpu", "--peak-tflops", "989"],
            "gpu_budget": [py, "benchmarks/gpu_budget.py"],
        }
    else:
        runs = {
            "train_throughput": [py, "benchmarks/train_throughput.py", "--batch", "8", "--iters", "2", "--warmup", "1"],
            "patch_study": [py, "benchmarks/patch_study.py", "--iters", "3"],
            "olss_fit": [py, "benchmarks/olss_fit.py", "--steps", "4", "10", "--images", "64", "--size", "16"],
            "samplers": [py, "benchmarks/samplers.py", "--nfe", "4", "8"],
            "stage_times": [py, "benchmarks/stage_times.py"],
            "profile_step": [py, "benchmarks/profile_step.py", "--steps", "5"],
            "gpu_budget": [py, "benchmarks/gpu_budget.py"],
            "cpu_precision": [py, "benchmarks/cpu_precision.py", "--quick"],
        }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"# fewstep benchmarks, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit.strip()}, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}\n", flush=True)
    failed = []
    for name, cmd in runs.items():
        if name in a.skip:
            continue
        print(f"## {name}: {' '.join(cmd[1:])}\n", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s, rc {r.returncode})\n", flush=True)
        if r.returncode:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
