"""Stage prepare_data: image source(s) -> uint8 arrays + manifest with a content hash.

Sources come from params (prepare.train_source / prepare.test_source) unless the environment
sets FEWSTEP_TRAIN_SOURCE / FEWSTEP_TEST_SOURCE. Local paths, directories, tarballs, npz and
fsspec URLs (s3://...) all work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep.data import prepare
from stages._common import StageContext, run_stage


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="data/prepared")


def body(ctx: StageContext) -> None:
    s = ctx.settings
    m = prepare(ctx.params, Path(ctx.args.out), s.train_source, s.test_source, progress=ctx.progress)
    counts = {k: v["count"] for k, v in m["splits"].items()}
    ctx.record.log_metrics({"images": counts})
    ctx.record.set_tags(data_hash=m["content_hash"])
    print(f"prepare_data: {counts} images at {m['resolution']}px, classes {m['class_names']}, "
          f"hash {m['content_hash'][:12]}")


def main(argv: Sequence[str] | None = None) -> None:
    run_stage("prepare_data", argv, add_args, body)


if __name__ == "__main__":
    main()
