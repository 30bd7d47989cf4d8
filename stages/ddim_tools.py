"""DDIM tools on any model directory: interpolate, encode (image -> x_T), decode (x_T -> image).

    python -m stages.ddim_tools interpolate --model models/teacher --seeds 1 2 --steps 50 --n 8 --out samples/interp.png
    python -m stages.ddim_tools interpolate --model models/teacher --images a.png b.png --steps 50 --out interp.png
    python -m stages.ddim_tools interpolate --model models/teacher --data data/prepared --index 0 1 2 3 --out interp.png
    python -m stages.ddim_tools encode --model models/teacher --images a.png b.png --steps 100 --out latents.safetensors
    python -m stages.ddim_tools decode --model models/teacher --latents latents.safetensors --steps 100 --out rec.png

Seeds give x_T exactly as the evaluation and the samplers draw it (one generator per seed), so
``--seeds 3 7`` interpolates between the images of seeds 3 and 7. Images (files, or ``--index`` into
a prepared split) are encoded with the deterministic DDIM ODE first. Pairs are taken in order
(1 2 3 4 -> two rows). Latents are safetensors with the model's weights hash and the encode grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fewstep import models, storage
from fewstep.ddim_study import interpolation_grid, load_latents, save_latents, step_grid
from fewstep.images import from_uint8, load_images, save_grid
from fewstep.math.inversion import decode, encode
from fewstep.math.param import set_autocast
from stages._common import StageError, user_errors


def _images(args, size: int) -> torch.Tensor | None:
    if args.images:
        return load_images(args.images, size)
    if args.index:
        arr = storage.load_array(Path(args.data) / f"{args.split}_images.npy", mmap=True)
        bad = [i for i in args.index if not 0 <= i < len(arr)]
        if bad:
            raise StageError(f"--index {bad} out of range: the {args.split} split has {len(arr)} images")
        x = from_uint8(np.asarray(arr[args.index]))
        if x.shape[-1] != size:
            raise StageError(f"{args.data}: images are {x.shape[-1]}x{x.shape[-1]}, the model expects {size}x{size}")
        return x
    return None


def _pairs(items: list, what: str) -> list[tuple]:
    if len(items) < 2 or len(items) % 2:
        raise StageError(f"interpolation needs pairs: an even number (>= 2) of {what}, got {len(items)}")
    return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]


def cmd_interpolate(args, den, device) -> None:
    size = den.card.image_size
    steps = step_grid(den.schedule.T, args.steps, args.spacing)
    imgs = _images(args, size)
    seed_pairs = _pairs(list(args.seeds), "seeds") if args.seeds else []
    image_pairs = _pairs(list(imgs), "images") if imgs is not None else []
    if not seed_pairs and not image_pairs:
        raise StageError("give --seeds, --images or --index")
    grid = interpolation_grid(den, args.n, steps, seed_pairs, image_pairs,
                              clip_noise=not args.no_clip, clip_images=args.clip, device=device)
    save_grid(grid, args.out, nrow=args.n, scale=args.scale or max(1, 64 // size))
    print(f"ddim_tools: {len(seed_pairs) + len(image_pairs)} row(s) x {args.n}, {len(steps)} DDIM steps -> {args.out}")


def cmd_encode(args, den, device) -> None:
    imgs = _images(args, den.card.image_size)
    if imgs is None:
        raise StageError("give --images or --index")
    steps = step_grid(den.schedule.T, args.steps, args.spacing)
    z = encode(den, imgs.to(device), steps[::-1], clip=args.clip, progress=not args.no_progress).float().cpu()
    save_latents(args.out, z, den.card.weights_sha256, steps, args.clip)
    print(f"ddim_tools: encoded {len(z)} image(s) on {len(steps)} steps (latent std {float(z.std()):.3f}) -> {args.out}")


def cmd_decode(args, den, device) -> None:
    z, enc = load_latents(args.latents)
    if enc.weights_sha256 not in (None, str(den.card.weights_sha256)):
        print("ddim_tools: note: these latents were encoded with another model", file=sys.stderr)
    steps = step_grid(den.schedule.T, args.steps, args.spacing)
    if enc.steps is not None and enc.steps != steps:
        print(f"ddim_tools: note: decoding on {len(steps)} steps, encoded on {len(enc.steps)}: "
              "the reconstruction is exact only in the limit", file=sys.stderr)
    x = decode(den, z.to(device), steps, clip=args.clip, progress=not args.no_progress).float().cpu()
    size = x.shape[-1]
    save_grid(x, args.out, scale=args.scale or max(1, 64 // size))
    print(f"ddim_tools: decoded {len(x)} latent(s) on {len(steps)} steps -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, images: bool = True) -> None:
        p.add_argument("--model", default="models/teacher", help="model directory (config.json + safetensors)")
        p.add_argument("--steps", type=int, default=50, help="DDIM steps (capped at the schedule's T)")
        p.add_argument("--spacing", default="trailing", choices=["trailing", "linspace", "quadratic"])
        p.add_argument("--clip", action="store_true", help="clip x_hat to [-1, 1] while encoding/decoding images")
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
        p.add_argument("--no-progress", action="store_true")
        if images:
            p.add_argument("--images", nargs="+", default=None, help="image files (resized to the model's size)")
            p.add_argument("--data", default="data/prepared", help="prepared data, for --index")
            p.add_argument("--split", default="test", choices=["train", "test"])
            p.add_argument("--index", type=int, nargs="+", default=None, help="images of the prepared split")

    p = sub.add_parser("interpolate", help="slerp grid between seeds' x_T and/or encoded images")
    common(p)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="pairs of x_T seeds")
    p.add_argument("--n", type=int, default=8, help="images per row (>= 2)")
    p.add_argument("--no-clip", action="store_true", help="do not clip while decoding x_T rows")
    p.add_argument("--scale", type=int, default=0, help="grid upscaling (0: to about 64 px per image)")
    p.add_argument("--out", default="samples/interp.png")
    p.set_defaults(fn=cmd_interpolate)

    p = sub.add_parser("encode", help="images -> x_T latents (safetensors)")
    common(p)
    p.add_argument("--out", default="latents.safetensors")
    p.set_defaults(fn=cmd_encode)

    p = sub.add_parser("decode", help="x_T latents (safetensors) -> image grid")
    common(p, images=False)
    p.add_argument("--latents", required=True)
    p.add_argument("--scale", type=int, default=0)
    p.add_argument("--out", default="samples/decoded.png")
    p.set_defaults(fn=cmd_decode)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    """Not a DVC stage (no params file, no MLflow run); the same clear errors: one line, exit 2."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors("ddim_tools"):
        try:
            device = models.resolve_device(args.device)
        except RuntimeError as e:  # cuda asked for, none there
            raise StageError(str(e)) from None
        den = models.load_denoiser(args.model, device)
        set_autocast(den, False)  # float32 on CUDA too (both nets of a split model): inversion needs the precision
        with torch.no_grad():
            args.fn(args, den, device)


if __name__ == "__main__":
    main()
