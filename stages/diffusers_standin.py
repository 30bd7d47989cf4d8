"""Write a small stand-in for google/ddpm-cifar10-32 (not a DVC stage): a diffusers source dir of the
same config family (UNet2DModel in DDPM's configuration, narrower; DDPMScheduler, linear betas,
T = 1000, epsilon), so profiles/ddpm-cifar10.yaml runs without the download:

    python -m stages.diffusers_standin data/ddpm-cifar10-32            # random weights (a smoke run)
    python -m stages.diffusers_standin data/ddpm-cifar10-32 --train-steps 300 --data data/prepared

Needs diffusers (pip install -e '.[peers]').
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fewstep import storage
from fewstep.interop.standin import write_standin
from stages._common import user_errors


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="data/ddpm-cifar10-32", help="the source dir to write")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=16, help="first block's width (the real model: 128)")
    ap.add_argument("--train-steps", type=int, default=0, help="DDPM epsilon-loss steps (0: random weights)")
    ap.add_argument("--data", default="data/prepared", help="prepared data to train on (train_images.npy)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(None if argv is None else list(argv))
    with user_errors("diffusers_standin"):
        images = storage.load_array(Path(a.data) / "train_images.npy") if a.train_steps else None
        out = write_standin(a.out, image_size=a.image_size, channels=a.channels, seed=a.seed, images=images,
                            train_steps=a.train_steps, batch_size=a.batch_size, progress=not a.no_progress)
    print(f"diffusers_standin: wrote {out} (UNet2DModel, DDPMScheduler linear T=1000 epsilon; "
          f"{'random weights' if not a.train_steps else f'{a.train_steps} training steps'})")


if __name__ == "__main__":
    main()
