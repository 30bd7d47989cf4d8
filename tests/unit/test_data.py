import io
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

from fewstep import storage
from fewstep.data import DataError, UnsafeArchiveError, load_images, parse_cifar10_binary


def _png(color, size=8):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, per_class=3, corrupt=1, size=8):
    for ci, cls in enumerate(["cat", "dog"]):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"{i:03d}.png").write_bytes(_png(40 * ci + i, size))
    for i in range(corrupt):
        (root / "dog" / f"bad{i}.jpg").write_bytes(b"not a jpeg at all")
    (root / "README.txt").write_text("not an image")
    return root


def test_image_folder_skips_and_counts_bad_files(tmp_path):
    src = make_folder(tmp_path / "imgs", per_class=50, corrupt=1)
    ds = load_images(str(src), resolution=4, max_corrupt_fraction=0.05, progress=False)
    assert ds.class_names == ["cat", "dog"]
    assert ds.images.shape == (100, 4, 4, 3) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [50, 50]
    assert ds.corrupt == ["dog/bad0.jpg"] and ds.skipped_non_image == 1
    # the box filter of a flat image is the same flat image
    assert (ds.images[0] == 0).all() and (ds.images[50] == 40).all()


def test_too_many_corrupt_files_is_a_clear_error(tmp_path):
    src = make_folder(tmp_path / "imgs", per_class=3, corrupt=2)
    with pytest.raises(DataError, match="could not be decoded"):
        load_images(str(src), max_corrupt_fraction=0.01, progress=False)


def test_class_subset_and_cap(tmp_path):
    src = make_folder(tmp_path / "imgs", per_class=5, corrupt=0)
    ds = load_images(str(src), classes=["dog"], max_per_class=2, progress=False)
    assert ds.class_names == ["dog"] and len(ds) == 2
    with pytest.raises(DataError, match="not found"):
        load_images(str(src), classes=["horse"], progress=False)


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tarball_reads_like_the_folder(tmp_path):
    tgz = _tar(tmp_path / "d.tar.gz", [(f"train/{c}/{i}.png", _png(10 * i)) for c in ("a", "b") for i in range(3)])
    ds = load_images(str(tgz), progress=False)
    assert ds.class_names == ["a", "b"] and len(ds) == 6


@pytest.mark.parametrize("bad", ["../evil/x.png", "/etc/x.png", "train/../../x.png"])
def test_tar_members_escaping_the_root_are_refused(tmp_path, bad):
    tgz = _tar(tmp_path / "d.tar.gz", [("train/a/0.png", _png(1)), (bad, _png(2))])
    with pytest.raises(UnsafeArchiveError, match="escapes"):
        load_images(str(tgz), progress=False)


def test_tar_links_are_refused(tmp_path):
    path = tmp_path / "l.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("train/a/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="link"):
        load_images(str(path), progress=False)


def test_npz_source_and_remote_url(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.array([0, 1, 0, 1, 0, 1]), class_names=np.array(["x", "y"]))
    (tmp_path / "d.npz").write_bytes(buf.getvalue())
    ds = load_images(str(tmp_path / "d.npz"), progress=False)
    assert np.array_equal(ds.images, images) and ds.class_names == ["x", "y"]
    # an fsspec URL goes through the same code path as s3:// (real fsspec in-memory filesystem)
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/d.npz", buf.getvalue())
    for c in ("a", "b"):
        fs.pipe(f"/bucket/folder/{c}/0.png", _png(5))
    assert np.array_equal(load_images("memory://bucket/d.npz", progress=False).images, images)
    assert len(load_images("memory://bucket/folder", progress=False)) == 2


def test_cifar_binary_parser_needs_no_pickle():
    rec = np.zeros((2, 3073), np.uint8)
    rec[:, 0] = [3, 7]
    rec[1, 1:1025] = 255  # red plane of image 1
    imgs, labels = parse_cifar10_binary(rec.tobytes())
    assert labels.tolist() == [3, 7] and imgs.shape == (2, 32, 32, 3)
    assert (imgs[1, :, :, 0] == 255).all() and (imgs[1, :, :, 1] == 0).all()


def _prepare(params_path, out, capsys) -> tuple[int, str]:
    """stages.prepare_data in-process (no MLflow run): its exit code and stderr."""
    from stages import prepare_data

    capsys.readouterr()
    try:
        prepare_data.main(["--params", str(params_path), "--out", str(out), "--no-progress"])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_prepare_stage_writes_arrays_and_manifest(tmp_path, root, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_TRACKING", "off")
    make_folder(tmp_path / "train", per_class=40, corrupt=1)
    make_folder(tmp_path / "test", per_class=4, corrupt=0)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["image_size"] = 8
    params["prepare"].update(train_source=str(tmp_path / "train"), test_source=str(tmp_path / "test"), classes=None,
                             max_corrupt_fraction=0.05)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = _prepare(tmp_path / "params.yaml", tmp_path / "out", capsys)
    assert code == 0, err
    m = storage.read_json(tmp_path / "out" / "manifest.json")
    assert m["splits"]["train"]["count"] == 80 and m["splits"]["train"]["corrupt"] == 1
    assert m["splits"]["test"]["count"] == 8
    imgs = storage.load_array(tmp_path / "out" / "train_images.npy")
    labels = storage.load_array(tmp_path / "out" / "train_labels.npy")
    assert m["content_hash"] == storage.sha256_arrays(imgs, labels, storage.load_array(tmp_path / "out" / "test_images.npy"),
                                                      storage.load_array(tmp_path / "out" / "test_labels.npy"))
    # a missing source is one clear line and rc 2, and nothing is written
    params["prepare"]["train_source"] = str(tmp_path / "nope")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code, err = _prepare(tmp_path / "params.yaml", tmp_path / "out2", capsys)
    assert code == 2 and "not found" in err and not (tmp_path / "out2").exists()
