"""Image sources -> uint8 arrays (N, H, W, 3) and int64 labels.

A source is an ImageFolder directory (``<root>/<class>/<file>``), a .tar / .tar.gz / .tgz of one,
or an .npz with ``images`` (N, H, W, 3 uint8) and ``labels``; local or any fsspec URL (s3:// ...).
The class of an image is the name of the directory that holds it. Files without an image
extension are skipped and counted; image files that do not decode are skipped and counted, and
above ``max_corrupt_fraction`` the load fails with the list of bad files. Archive members that
are links, absolute, or climb out of the archive root are refused (UnsafeArchiveError).
"""

from __future__ import annotations

from fewstep.errors import UserError

import io
import posixpath
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from fewstep.progress import progress as progress_bar

from fewstep import storage

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class DataError(UserError, ValueError):
    """The data source is unusable (too many corrupt files, no images, unknown classes...)."""


class UnsafeArchiveError(DataError):
    """An archive member would escape the extraction root (absolute path, '..', or a link)."""


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    skipped_non_image: int = 0
    corrupt: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def _safe_member_name(name: str) -> str:
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or norm.startswith("../") or norm == ".." or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} escapes the archive root; refusing this archive")
    return norm


def _iter_tar(url: str) -> Iterator[tuple[str, bytes]]:
    with storage.open_read(url) as f:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                name = _safe_member_name(m.name)
                if m.issym() or m.islnk():
                    raise UnsafeArchiveError(f"archive member {m.name!r} is a link; refusing this archive")
                if not m.isfile():
                    continue
                data = tar.extractfile(m)
                yield name, data.read() if data is not None else b""


def _iter_folder(url: str) -> Iterator[tuple[str, bytes]]:
    if storage.is_remote(url):
        fs, root = storage.filesystem(url)
        for path in sorted(fs.find(root)):
            rel = posixpath.relpath(path, root)
            with fs.open(path, "rb") as f:
                yield rel, f.read()
        return
    root = storage.local_path(url)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        yield path.relative_to(root).as_posix(), path.read_bytes()


def _decode(data: bytes, size: int | None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BOX if im.size[0] >= size else Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)


def load_images(
    source: str,
    resolution: int | None = None,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
    max_corrupt_fraction: float = 0.01,
    progress: bool = True,
) -> ImageSet:
    """Read an image source into memory (see module docstring)."""
    s = str(source)
    if s.endswith(".npz"):
        return _load_npz(s, resolution, classes, max_per_class)
    if not storage.is_remote(s) and not storage.local_path(s).exists():
        raise DataError(f"data source not found: {s}")
    files = _iter_tar(s) if s.endswith(TAR_SUFFIXES) else _iter_folder(s)

    wanted = set(classes) if classes else None
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    skipped = 0
    for name, data in files:
        if Path(name).suffix.lower() not in IMAGE_EXTS:
            skipped += 1
            continue
        cls = posixpath.basename(posixpath.dirname(name)) or "_"
        if wanted is None or cls in wanted:
            by_class.setdefault(cls, []).append((name, data))
    if wanted is not None and (missing := sorted(wanted - set(by_class))):
        raise DataError(f"classes {missing} not found in {s}; found {sorted(by_class)}")
    if not by_class:
        raise DataError(f"no images found in {s}")

    names = sorted(by_class)
    images, labels, corrupt = [], [], []
    total = sum(len(v) if max_per_class is None else min(len(v), max_per_class) for v in by_class.values())
    bar = progress_bar(total=total, desc=f"decode {Path(s).name}", enabled=progress, leave=False)
    for label, cls in enumerate(names):
        members = sorted(by_class[cls])
        kept = 0
        for name, data in members:
            if max_per_class is not None and kept >= max_per_class:
                break
            try:
                images.append(_decode(data, resolution))
            except Exception:  # PIL raises many types for bad files
                corrupt.append(name)
                bar.update(1)
                continue
            labels.append(label)
            kept += 1
            bar.update(1)
    bar.close()
    seen = len(images) + len(corrupt)
    if corrupt and len(corrupt) > max_corrupt_fraction * seen:
        raise DataError(
            f"{len(corrupt)} of {seen} image files in {s} could not be decoded "
            f"(more than max_corrupt_fraction={max_corrupt_fraction}); first: {corrupt[:5]}"
        )
    if not images:
        raise DataError(f"no decodable images in {s}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"images in {s} have different sizes {sorted(shapes)[:4]}; set a resolution to resize them")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), names, skipped, corrupt)


def _load_npz(url: str, resolution: int | None, classes: Sequence[str] | None, max_per_class: int | None) -> ImageSet:
    with storage.open_read(url) as f:
        buf = io.BytesIO(f.read())
    with np.load(buf, allow_pickle=False) as z:
        keys = set(z.files)
        ik = next((k for k in ("images", "x", "arr_0") if k in keys), None)
        if ik is None:
            raise DataError(f"{url}: npz needs an 'images' array, found {sorted(keys)}")
        images = np.asarray(z[ik])
        labels = np.asarray(z["labels"]) if "labels" in keys else np.zeros(len(images), np.int64)
        names = [str(n) for n in z["class_names"]] if "class_names" in keys else [str(i) for i in range(int(labels.max()) + 1)]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{url}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if classes:
        missing = sorted(set(classes) - set(names))
        if missing:
            raise DataError(f"classes {missing} not in {url}; found {names}")
        keep_ids = [names.index(c) for c in sorted(classes)]
        mask = np.isin(labels, keep_ids)
        images, labels = images[mask], labels[mask]
        remap = {old: new for new, old in enumerate(keep_ids)}
        labels = np.asarray([remap[int(l)] for l in labels], np.int64)
        names = sorted(classes)
    if max_per_class is not None:
        idx = np.concatenate([np.nonzero(labels == c)[0][:max_per_class] for c in range(len(names))])
        idx.sort()
        images, labels = images[idx], labels[idx]
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        images = np.stack([_decode(_png(im), resolution) for im in images])
    return ImageSet(images, labels.astype(np.int64), names)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Optional download for users with a network (not the default; nothing here can reach it).

CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def parse_cifar10_binary(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary batches: records of 1 label byte + 3072 pixel bytes (CHW). No pickles."""
    rec = 1 + 3 * 32 * 32
    if len(blob) % rec:
        raise DataError(f"CIFAR-10 binary batch has {len(blob)} bytes, not a multiple of {rec}")
    raw = np.frombuffer(blob, np.uint8).reshape(-1, rec)
    return raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), raw[:, 0].astype(np.int64)


def download_cifar10(dest: str | Path) -> dict[str, Path]:
    """Download CIFAR-10 (binary version) and write train.npz / test.npz under ``dest``."""
    dest = Path(dest)
    with urllib.request.urlopen(CIFAR10_BINARY_URL, timeout=60) as r:
        blob = r.read()
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for m in tar:
            name = _safe_member_name(m.name)
            if not m.isfile() or not name.endswith(".bin") or "batches.meta" in name:
                continue
            split = "test" if "test_batch" in name else "train"
            parts[split].append(parse_cifar10_binary(tar.extractfile(m).read()))
    out = {}
    for split, chunks in parts.items():
        buf = io.BytesIO()
        np.savez(buf, images=np.concatenate([c[0] for c in chunks]), labels=np.concatenate([c[1] for c in chunks]),
                 class_names=np.asarray(CIFAR10_CLASSES))
        out[split] = dest / f"{split}.npz"
        storage.atomic_write_bytes(out[split], buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------
# The prepared dataset (stage prepare_data): uint8 arrays per split + a manifest with hashes.

def prepare(p, out: Path, train_source: str | None = None, test_source: str | None = None,
            progress: bool = True) -> dict:
    """Read the sources of ``p.prepare`` (``train_source`` / ``test_source`` override them) into
    ``out``/{split}_images.npy, {split}_labels.npy and manifest.json (counts per class, skipped and
    corrupt files, a sha256 per split and of everything); ``out`` appears whole or not at all.
    ``p``: the validated params (fewstep.config.Params). Returns the manifest."""
    pp = p.prepare
    sources = {"train": train_source or pp.train_source, "test": test_source or pp.test_source}
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
                raise DataError(f"{split} classes {ds.class_names} differ from train classes {class_names}")
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
