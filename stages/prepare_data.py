"""Stage prepare_data: image source(s) -> uint8 arrays + manifest with a content hash.

Sources come from params (prepare.train_source / prepare.test_source) unless the environment
sets FEWSTEP_TRAIN_SOURCE / FEWSTEP_TEST_SOURCE. Local paths, directories, tarballs, npz and
fsspec URLs (s3://...) all work.
"""

from __future__ import annotations

import os
from pathlib import Path

from fewstep import storage
from fewstep.data import load_images
from stages import _common


def prepare(p, out: Path, progress: bool = True) -> dict:
    pp = p.prepare
    sources = {
        "train": os.environ.get("FEWSTEP_TRAIN_SOURCE") or pp.train_source,
        "test": os.environ.get("FEWSTEP_TEST_SOURCE") or pp.test_source,
    }
    manifest: dict = {"resolution": p.base.image_size, "dataset": p.base.dataset, "splits": {}}
    arrays = []
    class_names = None
    with storage.atomic_dir(out) as tmp:
        for split, src in sources.items():
            if not src:
                continue
            cap = pp.max_per_class if split == "train" else (pp.test_max_per_class or pp.max_per_class)
            ds = load_images(src, p.base.image_size, pp.classes, cap, pp.max_corrupt_fraction, progress)
            if class_names is None:
                class_names = ds.class_names
            elif ds.class_names != class_names:
                raise storage.StorageError(f"{split} classes {ds.class_names} differ from train classes {class_names}")
            storage.save_array(tmp / f"{split}_images.npy", ds.images)
            storage.save_array(tmp / f"{split}_labels.npy", ds.labels)
            arrays += [ds.images, ds.labels]
            manifest["splits"][split] = {
                "source": str(src),
                "count": len(ds),
                "per_class": {c: int((ds.labels == i).sum()) for i, c in enumerate(ds.class_names)},
                "skipped_non_image": ds.skipped_non_image,
                "corrupt": len(ds.corrupt),
                "corrupt_files": ds.corrupt[:50],
                "sha256": storage.sha256_arrays(ds.images, ds.labels),
            }
        manifest["class_names"] = class_names
        manifest["content_hash"] = storage.sha256_arrays(*arrays)
        storage.write_json(tmp / "manifest.json", manifest)
    return manifest


def main() -> None:
    ap = _common.parser(__doc__)
    ap.add_argument("--out", default="data/prepared")
    args = ap.parse_args()
    with _common.clear_errors("prepare_data") as rec:
        p, _ = _common.setup(args)
        m = prepare(p, Path(args.out), progress=not args.no_progress)
        counts = {k: v["count"] for k, v in m["splits"].items()}
        rec.log_metrics({"images": counts})
        rec.set_tags(data_hash=m["content_hash"])
        print(f"prepare_data: {counts} images at {m['resolution']}px, classes {m['class_names']}, "
              f"hash {m['content_hash'][:12]}")


if __name__ == "__main__":
    main()
