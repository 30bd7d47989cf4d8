"""The one module that touches disk or object storage.

Writes are atomic (temporary file in the same directory, fsync, os.replace), weights are
safetensors, arrays are .npy read with allow_pickle=False: nothing here ever unpickles.
Remote URLs (s3://, gcs://, memory://, ...) go through fsspec. An S3-compatible endpoint (MinIO,
moto) is botocore's own ``AWS_ENDPOINT_URL``, which s3fs and boto3 honour by themselves.
"""

from __future__ import annotations

from fewstep.errors import UserError

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save as st_save

PathLike = str | os.PathLike


class StorageError(UserError, RuntimeError):
    """An object store or file could not be read or written; the message names the URL."""


def is_remote(url: str | os.PathLike) -> bool:
    s = str(url)
    return "://" in s and not s.startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    s = str(url)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


def filesystem(url: str):
    """(fsspec filesystem, path) for a remote URL, with listing caches off (another process may
    have written since: reference mlops.md section 2)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    opts: dict[str, Any] = {"skip_instance_cache": True}
    if protocol == "s3":
        opts["use_listings_cache"] = False
        opts["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3}}
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


@contextlib.contextmanager
def open_read(url: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a local path or fsspec URL for binary reading, with a clear error on failure."""
    if not is_remote(url):
        p = local_path(url)
        if not p.exists():
            raise FileNotFoundError(f"no such file: {p}")
        with open(p, "rb") as f:
            yield f
        return
    try:
        fs, path = filesystem(str(url))
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise
    except Exception as e:  # botocore / aiohttp errors differ by backend
        raise StorageError(f"cannot open {url}: {type(e).__name__}: {e}") from e
    with f:
        yield f


# --------------------------------------------------------------------------------------------
# atomic local writes


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_array(path: PathLike, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_array(path: PathLike, mmap: bool = False) -> np.ndarray:
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def save_tensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically. Tensors are made contiguous and moved to the CPU."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(clean, metadata=metadata))


def load_tensors(path: PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Write a directory's contents into a sibling temp dir, then swap it in with a rename.
    A reader never sees a half-written directory; a crash leaves the old one in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=_json_default).encode())


def sha256_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """A user-supplied state dict: safetensors (recognised by its JSON header), else a PyTorch
    .pth/.pt read with ``torch.load(weights_only=True)``, the restricted unpickler that builds only
    tensors and plain containers (never arbitrary objects). Clear errors for a missing, unreadable
    or non-state-dict file."""
    p = local_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    with p.open("rb") as f:
        head = f.read(9)
    try:
        if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
            sd = load_tensors(p)
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path} is not a readable weight file (safetensors, or a PyTorch state dict that loads "
                         f"with weights_only=True): {type(e).__name__}: {msg}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)
