"""The cloud packages installed work together: the pinned s3fs family (not the ancient 0.4.x an
unpinned install once resolved to), requirements that hold, and round trips through a local
moto server with s3fs, and with zarr 3 over s3fs."""

from __future__ import annotations

import importlib.metadata as md

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from _s3 import s3  # noqa: F401 - fixture

PINNED = {"s3fs": "2026.9.0", "fsspec": "2026.9.0", "aiobotocore": "3.10.0", "botocore": "1.43.117"}


def _met(package: str, dependency: str) -> None:
    """Every requirement of ``package`` on ``dependency`` (without extras/markers) holds."""
    reqs = [Requirement(r) for r in md.requires(package) or []]
    found = [r for r in reqs if r.name.lower() == dependency and not r.marker]
    assert found, f"{package} declares no requirement on {dependency}"
    have = md.version(dependency)
    for r in found:
        assert r.specifier.contains(have, prereleases=True), f"{package} needs {r}; {have} is installed"


def test_the_pinned_versions_are_installed():
    import aiobotocore
    import botocore
    import fsspec
    import moto
    import s3fs
    import zarr

    for package, version in PINNED.items():
        assert md.version(package) == version, package
    assert Version(s3fs.__version__).major >= 2024  # not 0.4.x, which breaks with zarr 3
    assert s3fs.__version__ == fsspec.__version__  # s3fs pins its own fsspec release
    assert botocore.__version__ == PINNED["botocore"] and aiobotocore.__version__ == PINNED["aiobotocore"]
    assert Version(zarr.__version__).major == 3
    assert Version(moto.__version__) >= Version("5")


@pytest.mark.parametrize(("package", "dependency"), [("s3fs", "fsspec"), ("s3fs", "aiobotocore"),
                                                     ("aiobotocore", "botocore"), ("boto3", "botocore")])
def test_requirements_hold(package, dependency):
    _met(package, dependency)


def test_s3fs_round_trip_through_moto(s3):
    import s3fs

    bucket = s3.bucket("versions")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)
    data = {f"{bucket}/a/{i}": bytes([i]) * (1000 + i) for i in range(5)}
    fs.pipe(data)
    assert fs.cat(sorted(data)) == data
    assert {p: info["size"] for p, info in fs.find(bucket, detail=True).items()} == \
        {p: len(v) for p, v in data.items()}


def test_zarr3_over_s3fs_round_trip(s3):
    import s3fs
    import zarr
    from zarr.storage import FsspecStore

    bucket = s3.bucket("zarr")
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True, asynchronous=True)
    store = FsspecStore(fs, path=f"{bucket}/arr.zarr")
    data = np.arange(6 * 4 * 4, dtype=np.uint16).reshape(6, 4, 4)
    arr = zarr.create_array(store, shape=data.shape, chunks=(2, 4, 4), dtype=data.dtype)
    arr[:] = data
    back = zarr.open_array(FsspecStore(fs, path=f"{bucket}/arr.zarr", read_only=True), mode="r")
    np.testing.assert_array_equal(back[:], data)
    np.testing.assert_array_equal(back[3:5, 1], data[3:5, 1])
