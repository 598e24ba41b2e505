"""`convert(layout="volumes")` and :class:`~streamseg.store.volume_reader.VolumeStore`.

Oracles: nibabel (``as_closest_canonical`` data, affine and zooms of the files as written),
numpy slicing and padding of those arrays, zarr-python reading the case arrays, and the
chunk grid (which chunks a box intersects).  Both backends run through one parametrized
module fixture; the stores are small (40 x 36 x 20 voxels, chunks of 8^3).
"""

from __future__ import annotations

import json
import pickle
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import save_nifti
from streamseg import convert, open_store
from streamseg.cli import main
from streamseg.errors import CorruptChunkError, CorruptStoreError, IncompleteStoreError, OptionError, \
    StoreExistsError
from streamseg.io.synth_volumes import write_synth_volumes
from streamseg.store.volume_layout import FOREGROUND_PER_CLASS, case_dir, chunk_file, chunk_grid, foreground_sample
from streamseg.store.volume_reader import VolumeStore

SHAPE = (40, 36, 20)  # synthetic cases (stored LPS on disk)
BIG = (30, 28, 24)  # the extra RAS case: label 1 has more voxels than FOREGROUND_PER_CLASS, no label 3
CHUNK = (8, 8, 8)
NAMES = ["case_000", "case_001", "case_002", "zz_big"]


# --------------------------------------------------------------------------- #
# fixtures and helpers
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CT-like cases stored LPS (imagesTr/ + labelsTr/, labels 0..3) and one RAS case of
    another shape and spacing whose label 1 covers 13440 voxels (> FOREGROUND_PER_CLASS)."""
    root = tmp_path_factory.mktemp("vsrc")
    write_synth_volumes(root, 3, shape=SHAPE, classes=4, orientation="LPS", seed=5)
    rng = np.random.default_rng(11)
    image = rng.integers(-1024, 1500, BIG).astype(np.int16)
    labels = np.zeros(BIG, np.uint8)
    labels[:20] = 1
    labels[24:27, 5:8, 5:8] = 2
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    affine[:3, 3] = (-12.0, -11.0, -18.0)
    save_nifti(root / "imagesTr" / "zz_big.nii.gz", image, affine)
    save_nifti(root / "labelsTr" / "zz_big.nii.gz", labels, affine)
    return root


def _canonical(path: Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


@pytest.fixture(scope="module")
def oracle(src: Path) -> list[dict]:
    """Per case: RAS-canonical image (X, Y, Z, 1) and labels from nibabel, affine, zooms, axis codes."""
    out = []
    for name in NAMES:
        img = _canonical(src / "imagesTr" / f"{name}.nii.gz")
        lab = _canonical(src / "labelsTr" / f"{name}.nii.gz")
        out.append({"name": name, "image": np.asarray(img.dataobj)[..., np.newaxis],
                    "labels": np.asarray(lab.dataobj), "affine": img.affine,
                    "zooms": tuple(float(z) for z in img.header.get_zooms()[:3]),
                    "codes": "".join(nib.aff2axcodes(nib.load(src / "imagesTr" / f"{name}.nii.gz").affine))})
    return out


@pytest.fixture(scope="module")
def build(src: Path, tmp_path_factory: pytest.TempPathFactory):
    """``build(backend)``: the store of ``src`` on that backend (chunks 8^3), converted once per module."""
    made: dict[str, VolumeStore] = {}

    def get(backend: str) -> VolumeStore:
        if backend not in made:
            dst = tmp_path_factory.mktemp(f"store_{backend}") / "s"
            made[backend] = convert(src, dst, layout="volumes", format=backend, chunk_shape=CHUNK, progress=False)
        return made[backend]

    return get


@pytest.fixture(scope="module", params=["zarr", "memmap"])
def vstore(request: pytest.FixtureRequest, build) -> VolumeStore:
    return build(request.param)


@pytest.fixture(scope="module")
def zstore(build) -> VolumeStore:
    return build("zarr")


@pytest.fixture(scope="module")
def mstore(build) -> VolumeStore:
    return build("memmap")


def _copy(store: VolumeStore, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(store.path, dst)
    return dst


def _convert_like(store: VolumeStore, src: Path, dst: Path, **kwargs):
    return convert(src, dst, layout="volumes", format=store.backend, chunk_shape=CHUNK, progress=False, **kwargs)


def _same_store(a: Path, b: Path) -> None:
    """Same arrays, same checksum tables and foreground samples, case by case."""
    sa, sb = open_store(a), open_store(b)
    assert len(sa) == len(sb) and sa.names == sb.names
    for k in range(len(sa)):
        for x, y in zip(sa.read_case(k), sb.read_case(k)):
            np.testing.assert_array_equal(x, y)
        for name in ("checksums.npy", "foreground.npy"):
            assert (case_dir(a, k) / name).read_bytes() == (case_dir(b, k) / name).read_bytes(), (k, name)


def _error(capsys: pytest.CaptureFixture, *args: object, command: str = "convert") -> str:
    """Run the CLI expecting a one-line error and exit 2; return the line."""
    rc = main([str(a) for a in args] + (["--quiet"] if command == "convert" else []))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"streamseg {command}: error: "), lines
    return lines[0]


def _no_store(dst: Path) -> None:
    assert not (dst / "manifest.json").exists() and not (dst / "_plan.json").exists()
    assert not (dst / "cases").exists()
    with pytest.raises(Exception):
        open_store(dst)


def _intervals(lo, hi, chunks=CHUNK) -> int:
    """Chunks of the grid that the box lo..hi (exclusive) intersects."""
    return int(np.prod([(b - 1) // c - a // c + 1 for a, b, c in zip(lo, hi, chunks)]))


# --------------------------------------------------------------------------- #
# the store holds every case exactly, in RAS order
# --------------------------------------------------------------------------- #
def test_open_store_returns_a_volume_store_with_every_case(vstore: VolumeStore, oracle: list[dict]) -> None:
    store = open_store(vstore.path)
    assert isinstance(store, VolumeStore) and store.layout == "volumes" and store.backend == vstore.backend
    assert len(store) == 4 and store.names == NAMES
    assert store.channels == 1 and store.image_dtype == np.int16 and store.mask_dtype == np.uint8
    assert store.chunk_shape == CHUNK and store.label_values == [0, 1, 2, 3]
    for k, want in enumerate(oracle):
        image, labels = store.read_case(k)
        assert image.dtype == np.int16 and labels.dtype == np.uint8
        np.testing.assert_array_equal(image, want["image"])
        np.testing.assert_array_equal(labels, want["labels"])
        assert store.shape(k) == want["labels"].shape
        assert store.spacing(k) == pytest.approx(want["zooms"])
        np.testing.assert_allclose(store.affine(k), want["affine"], atol=1e-5)
        rec = store.case(k)
        assert rec["name"] == want["name"] and rec["orientation"] == want["codes"]
        assert rec["labels"] == {str(v): int((want["labels"] == v).sum()) for v in np.unique(want["labels"])}
    assert image.min() < 0  # negative HU kept (zz_big: uniform in -1024..1499)
    assert oracle[0]["image"].min() == -1024 and oracle[0]["codes"] == "LPS" and oracle[3]["codes"] == "RAS"
    assert store.case(-1)["name"] == "zz_big"
    assert open_store(vstore.path, verify_reads=False).verify_reads is False


def test_multichannel_4d_cases_with_a_non_ras_affine(tmp_path: Path, backend: str) -> None:
    """4D (X, Y, Z, C) NIfTI stored LSA: every channel reoriented like nibabel's canonical image."""
    affine = np.array([[-1.5, 0, 0, 30.0], [0, 0, 0.8, -10.0], [0, 2.0, 0, 5.0], [0, 0, 0, 1.0]])  # L, S, A
    rng = np.random.default_rng(2)
    for c in ("a", "b"):
        labels = np.zeros((12, 10, 14), np.uint8)
        labels[2:6, 3:7, 4:9], labels[7:10, 1:3, 1:5] = 1, 2
        save_nifti(tmp_path / "src" / "images" / f"{c}.nii.gz",
                   rng.integers(-1024, 2000, (12, 10, 14, 2)).astype(np.int16), affine)
        save_nifti(tmp_path / "src" / "masks" / f"{c}.nii.gz", labels, affine)
    store = convert(tmp_path / "src", tmp_path / "s", layout="volumes", format=backend, chunk_shape=(4, 4, 4),
                    progress=False)
    assert store.channels == 2 and store.names == ["a", "b"]
    for k, c in enumerate("ab"):
        img = _canonical(tmp_path / "src" / "images" / f"{c}.nii.gz")
        lab = np.asarray(_canonical(tmp_path / "src" / "masks" / f"{c}.nii.gz").dataobj)
        image, labels = store.read_case(k)
        assert image.shape == (12, 14, 10, 2) and image.dtype == np.int16
        np.testing.assert_array_equal(image, np.asarray(img.dataobj))
        np.testing.assert_array_equal(labels, lab)
        np.testing.assert_allclose(store.affine(k), img.affine, atol=1e-5)
        assert store.spacing(k) == pytest.approx((1.5, 0.8, 2.0)) and store.case(k)["orientation"] == "LSA"
        box_i, box_m = store.read_box(k, (3, 5, 1), (11, 13, 9))
        np.testing.assert_array_equal(box_i, np.asarray(img.dataobj)[3:11, 5:13, 1:9])
        np.testing.assert_array_equal(box_m, lab[3:11, 5:13, 1:9])


@st.composite
def _boxes(draw: st.DrawFn) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    k = draw(st.integers(0, 3))
    shape = SHAPE if k < 3 else BIG
    lo, hi = [], []
    for n in shape:
        a = draw(st.integers(0, n - 1))
        lo.append(a)
        hi.append(draw(st.integers(a + 1, n)))
    return k, tuple(lo), tuple(hi)


@settings(max_examples=40, deadline=None)
@given(box=_boxes())
def test_read_box_equals_numpy_slicing(vstore: VolumeStore, oracle: list[dict], box) -> None:
    k, lo, hi = box
    image, mask = vstore.read_box(k, lo, hi)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    np.testing.assert_array_equal(image, oracle[k]["image"][sl])
    np.testing.assert_array_equal(mask, oracle[k]["labels"][sl])
    assert image.dtype == np.int16 and mask.dtype == np.uint8


def _padded(arr: np.ndarray, corner, size, fill) -> np.ndarray:
    """Oracle of read_patch: the array padded with ``fill`` far enough, then sliced."""
    pad = max(abs(int(v)) for v in (*corner, *size)) + max(arr.shape)
    widths = [(pad, pad)] * 3 + [(0, 0)] * (arr.ndim - 3)
    big = np.pad(arr, widths, constant_values=fill)
    return big[tuple(slice(c + pad, c + pad + s) for c, s in zip(corner, size))]


@pytest.mark.parametrize("corner,size", [
    ((-3, -2, -5), (10, 10, 10)),  # below the low corner on every axis
    ((35, 30, 15), (10, 9, 8)),  # past the high corner
    ((-2, 10, 18), (44, 5, 6)),  # wider than the volume along X
    ((5, 6, 7), (9, 9, 9)),  # inside
    ((40, 0, 0), (4, 4, 4)),  # entirely outside (just past X)
    ((-20, -20, -20), (5, 5, 5)),  # entirely outside, below
])
def test_read_patch_pads_outside_voxels(vstore: VolumeStore, oracle: list[dict], corner, size) -> None:
    for fill in (0, -1024):
        image, mask = vstore.read_patch(1, corner, size, image_fill=fill)
        assert image.shape == (*size, 1) and mask.shape == size
        assert image.dtype == np.int16 and mask.dtype == np.uint8
        np.testing.assert_array_equal(image, _padded(oracle[1]["image"], corner, size, fill))
        np.testing.assert_array_equal(mask, _padded(oracle[1]["labels"], corner, size, 0))


def test_read_patch_entirely_outside_decodes_nothing(zstore: VolumeStore) -> None:
    store = open_store(zstore.path)
    image, mask = store.read_patch(0, (-9, 50, 0), (8, 8, 8), image_fill=-1000)
    assert (image == -1000).all() and (mask == 0).all()
    assert store.read_stats["chunks"] == 0 and store.read_stats["voxels_decoded"] == 0


@pytest.mark.parametrize("lo,hi", [
    ((-1, 0, 0), (4, 4, 4)),  # starts below
    ((0, 0, 0), (41, 4, 4)),  # ends past X
    ((0, 0, 0), (4, 37, 4)),
    ((0, 0, 0), (4, 4, 21)),
    ((3, 3, 3), (3, 5, 5)),  # empty
    ((5, 3, 3), (4, 5, 5)),  # reversed
    ((0, 0), (4, 4)),  # not 3D
])
def test_read_box_outside_the_volume_raises(vstore: VolumeStore, lo, hi) -> None:
    with pytest.raises(IndexError, match="read_patch"):
        vstore.read_box(0, lo, hi)


@pytest.mark.parametrize("k", [4, -5, 1.0, "0", True])
def test_bad_case_index_raises(vstore: VolumeStore, k) -> None:
    with pytest.raises(IndexError):
        vstore.read_box(k, (0, 0, 0), (1, 1, 1))
    with pytest.raises(IndexError):
        vstore.foreground(k)


# --------------------------------------------------------------------------- #
# reads decode only the chunks they touch
# --------------------------------------------------------------------------- #
_STAT_BOXES = [((0, 0, 0), (1, 1, 1)), ((8, 8, 8), (16, 16, 16)), ((7, 7, 7), (9, 9, 9)),
               ((0, 0, 0), SHAPE), ((3, 17, 2), (29, 18, 20)), ((39, 35, 19), SHAPE)]


def test_reads_decode_only_the_chunks_they_touch(vstore: VolumeStore, oracle: list[dict]) -> None:
    rng = np.random.default_rng(7)
    boxes = list(_STAT_BOXES)
    for _ in range(10):
        lo = [int(rng.integers(0, n)) for n in SHAPE]
        boxes.append((tuple(lo), tuple(int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, SHAPE))))
    store = open_store(vstore.path)
    for lo, hi in boxes:
        before = dict(store.read_stats)
        store.read_box(2, lo, hi)
        got = {key: store.read_stats[key] - before[key] for key in before}
        voxels = int(np.prod([b - a for a, b in zip(lo, hi)]))
        if store.backend == "zarr":
            n = _intervals(lo, hi)
            assert got["chunks"] == 2 * n, (lo, hi)  # image and mask chunks
            assert got["voxels_decoded"] == 2 * n * int(np.prod(CHUNK)) and got["bytes_read"] > 0
            assert voxels <= got["voxels_decoded"] // 2 <= voxels * 8**3 and got["boxes"] == 1
        else:  # the memmap backend copies the box itself
            assert got["chunks"] == 0 and got["voxels_decoded"] == voxels and got["boxes"] == 1
    # a patch partly outside decodes the chunks of its inside part only
    before = dict(store.read_stats)
    store.read_patch(2, (-4, 30, 10), (12, 12, 12))
    if store.backend == "zarr":
        assert store.read_stats["chunks"] - before["chunks"] == 2 * _intervals((0, 30, 10), (8, 36, 20))


def test_default_chunk_shape_and_cases_smaller_than_a_chunk(src: Path, tmp_path: Path, oracle: list[dict]) -> None:
    store = convert(src, tmp_path / "d", layout="volumes", progress=False)  # 32^3: edge chunks padded
    assert store.chunk_shape == (32, 32, 32) and store.meta["chunk_shape"] == [32, 32, 32]
    for k, want in enumerate(oracle):
        np.testing.assert_array_equal(store.read_case(k)[0], want["image"])
        np.testing.assert_array_equal(store.read_box(k, (20, 20, 10), (30, 28, 20))[1],
                                      want["labels"][20:30, 20:28, 10:20])


def test_labels_above_255_and_a_case_without_foreground(tmp_path: Path, backend: str) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = (np.arange(5 * 6 * 7, dtype=np.int16) - 100).reshape(5, 6, 7)
    labels = np.zeros((5, 6, 7), np.uint16)
    labels[1:3], labels[3:] = 1000, 7
    for name, lab in (("a", np.zeros_like(labels)), ("b", labels)):
        save_nifti(tmp_path / "src" / "images" / f"{name}.nii.gz", image, affine)
        save_nifti(tmp_path / "src" / "masks" / f"{name}.nii.gz", lab, affine)
    wide = convert(tmp_path / "src", tmp_path / "u16", layout="volumes", format=backend, mask_dtype="uint16",
                   progress=False)
    assert wide.mask_dtype == np.uint16 and wide.label_values == [0, 7, 1000]
    np.testing.assert_array_equal(wide.read_case(1)[1], labels)
    assert wide.foreground(0) == {} and wide.case(0)["foreground_samples"] == {}
    assert sorted(wide.foreground(1)) == [7, 1000] and wide.foreground(1)[1000].shape == (84, 3)
    remapped = convert(tmp_path / "src", tmp_path / "r", layout="volumes", format=backend, remap_labels=True,
                       progress=False)
    assert remapped.mask_dtype == np.uint8 and remapped.label_values == [0, 1, 2]
    np.testing.assert_array_equal(remapped.read_case(1)[1], np.searchsorted([0, 7, 1000], labels))
    assert sorted(remapped.foreground(1)) == [1, 2]  # stored values
    assert remapped.meta["params"]["source"]["label_table"] == [0, 7, 1000]


# --------------------------------------------------------------------------- #
# any zarr-python reads the arrays
# --------------------------------------------------------------------------- #
def test_zarr_python_reads_the_case_arrays(zstore: VolumeStore, oracle: list[dict]) -> None:
    import zarr

    for k in range(len(zstore)):
        image = zarr.open_array(zstore.path / "cases" / f"{k:05d}" / "image", mode="r")
        mask = zarr.open_array(zstore.path / "cases" / f"{k:05d}" / "mask", mode="r")
        assert image.chunks == (*CHUNK, 1) and mask.chunks == CHUNK
        np.testing.assert_array_equal(image[...], zstore.read_case(k)[0])
        np.testing.assert_array_equal(mask[...], oracle[k]["labels"])
        np.testing.assert_array_equal(image[3:20, 5:9, 0:17], oracle[k]["image"][3:20, 5:9, 0:17])
    files = sorted(p for p in (zstore.path / "cases" / "00000" / "image" / "c").rglob("*") if p.is_file())
    assert len(files) == int(np.prod(chunk_grid(SHAPE, CHUNK)))


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_other_compressors_read_back_and_through_zarr(src: Path, tmp_path: Path, oracle: list[dict],
                                                      compressor: str) -> None:
    import zarr

    store = convert(src, tmp_path / "c", layout="volumes", compressor=compressor, chunk_shape=(16, 16, 8),
                    progress=False)
    assert store.meta["compressor"] == compressor
    np.testing.assert_array_equal(store.read_case(3)[0], oracle[3]["image"])
    np.testing.assert_array_equal(zarr.open_array(store.path / "cases" / "00003" / "image", mode="r")[...],
                                  oracle[3]["image"])


# --------------------------------------------------------------------------- #
# foreground samples
# --------------------------------------------------------------------------- #
def test_foreground_samples(vstore: VolumeStore, oracle: list[dict]) -> None:
    for k, want in enumerate(oracle):
        fg = vstore.foreground(k)
        present = sorted(int(v) for v in np.unique(want["labels"]) if v > 0)
        assert sorted(fg) == present, k  # labels absent from a case are absent here
        for label, coords in fg.items():
            count = int((want["labels"] == label).sum())
            assert coords.dtype == np.int32 and coords.ndim == 2 and coords.shape[1] == 3
            assert coords.shape[0] == min(count, FOREGROUND_PER_CLASS), (k, label)
            assert (want["labels"][tuple(coords.T)] == label).all()
            assert len({tuple(r) for r in coords.tolist()}) == coords.shape[0]  # distinct voxels
            if count <= FOREGROUND_PER_CLASS:  # every voxel, in C order
                np.testing.assert_array_equal(coords, np.argwhere(want["labels"] == label))
        assert vstore.case(k)["foreground_samples"] == {str(v): int(c.shape[0]) for v, c in fg.items()}
    assert 3 not in vstore.foreground(3) and vstore.foreground(3)[1].shape[0] == FOREGROUND_PER_CLASS


def test_foreground_samples_are_seeded(src: Path, tmp_path: Path, mstore: VolumeStore) -> None:
    again = convert(src, tmp_path / "again", layout="volumes", format="memmap", chunk_shape=CHUNK, progress=False)
    other = convert(src, tmp_path / "other", layout="volumes", format="memmap", chunk_shape=CHUNK, seed=1,
                    progress=False)
    for k in range(4):
        assert (case_dir(again.path, k) / "foreground.npy").read_bytes() == \
            (case_dir(mstore.path, k) / "foreground.npy").read_bytes()
    a, b = mstore.foreground(3)[1], other.foreground(3)[1]
    assert a.shape == b.shape == (FOREGROUND_PER_CLASS, 3) and not np.array_equal(a, b)  # another draw
    np.testing.assert_array_equal(mstore.foreground(3)[2], other.foreground(3)[2])  # all 27 voxels either way


def test_foreground_sample_does_not_depend_on_the_block_size() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 1, 2, 5], np.uint8), size=(30, 20, 10), p=[0.4, 0.4, 0.15, 0.05])
    whole = foreground_sample(labels, 4, 2, per_class=500)
    for block in (1, 7, 1000, 5999):
        np.testing.assert_array_equal(foreground_sample(labels, 4, 2, per_class=500, block=block), whole)
    assert whole.dtype == np.int32 and whole.shape[1] == 4
    for v in (1, 2, 5):
        rows = whole[whole[:, 3] == v, :3]
        assert rows.shape[0] == min(500, int((labels == v).sum()))
        assert (labels[tuple(rows.T)] == v).all()
    assert foreground_sample(np.zeros((4, 4, 4), np.uint8), 0, 0).shape == (0, 4)


# --------------------------------------------------------------------------- #
# what goes to workers
# --------------------------------------------------------------------------- #
def test_pickle_round_trip(vstore: VolumeStore, oracle: list[dict]) -> None:
    store = open_store(vstore.path)
    store.read_box(1, (0, 0, 0), (9, 9, 9))  # caches and stats filled before pickling
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, VolumeStore) and copy.names == NAMES and copy.backend == store.backend
    assert copy.read_stats["boxes"] == 0 and copy.verify_reads
    for k in range(4):
        for got, want in zip(copy.read_box(k, (2, 3, 4), (17, 19, 13)), (oracle[k]["image"], oracle[k]["labels"])):
            np.testing.assert_array_equal(got, want[2:17, 3:19, 4:13])
    np.testing.assert_array_equal(copy.foreground(3)[2], store.foreground(3)[2])
    assert pickle.loads(pickle.dumps(open_store(vstore.path, verify_reads=False))).verify_reads is False
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a fresh process, no fork state
        image, mask = pool.submit(store.read_box, 0, (5, 6, 7), (30, 31, 19)).result(timeout=120)
    np.testing.assert_array_equal(image, oracle[0]["image"][5:30, 6:31, 7:19])
    np.testing.assert_array_equal(mask, oracle[0]["labels"][5:30, 6:31, 7:19])


# --------------------------------------------------------------------------- #
# crash safety: interrupted conversions, resume, overwrite, workers
# --------------------------------------------------------------------------- #
def _interrupt_after_one_case(monkeypatch: pytest.MonkeyPatch, exc: type[BaseException] = RuntimeError) -> None:
    """The second case is half written (one chunk / slab of garbage), then the conversion dies."""
    import streamseg.store.volume_writer as vw

    real = vw.write_case
    calls = []

    def dying(dst, plan, k, image, labels):  # type: ignore[no-untyped-def]
        calls.append(k)
        if len(calls) == 1:
            return real(dst, plan, k, image, labels)
        if plan["backend"] == "zarr":
            path = Path(chunk_file(dst, k, "image", (0, 0, 0)))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"garbage")
        else:
            mm = np.load(case_dir(dst, k) / "image.npy", mmap_mode="r+")
            mm[:8] = 7
            mm.flush()
            del mm
        raise exc("killed mid-case")

    monkeypatch.setattr(vw, "write_case", dying)


def test_interrupted_conversion_is_refused_then_resumed(vstore: VolumeStore, src: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "int"
    _interrupt_after_one_case(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        _convert_like(vstore, src, dst)
    monkeypatch.undo()
    with pytest.raises(IncompleteStoreError, match="--resume"):
        open_store(dst)
    with pytest.raises(IncompleteStoreError, match="--resume"):
        VolumeStore(dst)
    with pytest.raises(StoreExistsError, match="--resume"):
        _convert_like(vstore, src, dst)  # neither --resume nor --overwrite
    with pytest.raises(OptionError, match="Cannot resume"):
        convert(src, dst, layout="volumes", format=vstore.backend, chunk_shape=(16, 16, 16), resume=True,
                progress=False)
    resumed = _convert_like(vstore, src, dst, resume=True)
    assert isinstance(resumed, VolumeStore) and not (dst / "_plan.json").exists()
    assert not (dst / "_progress.jsonl").exists()
    _same_store(dst, vstore.path)
    with pytest.raises(StoreExistsError, match="complete"):
        _convert_like(vstore, src, dst, resume=True)


def test_incomplete_message_counts_cases(zstore: VolumeStore, src: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_after_one_case(monkeypatch)
    with pytest.raises(RuntimeError):
        _convert_like(zstore, src, tmp_path / "int")
    with pytest.raises(IncompleteStoreError, match="1 of 4 cases"):
        open_store(tmp_path / "int")


def test_kill_while_creating_arrays_can_be_overwritten(zstore: VolumeStore, src: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import streamseg.store.volume_writer as vw

    real = vw.create_volume_arrays

    def dying(dst, plan):  # type: ignore[no-untyped-def]
        real(dst, {**plan, "shapes": plan["shapes"][:1]})  # the first case's arrays, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(vw, "create_volume_arrays", dying)
    dst = tmp_path / "int"
    with pytest.raises(KeyboardInterrupt):
        _convert_like(zstore, src, dst)
    monkeypatch.undo()
    _convert_like(zstore, src, dst, overwrite=True)
    _same_store(dst, zstore.path)


def test_cli_interrupt_exits_130_and_resume_finishes(zstore: VolumeStore, src: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "cli"
    args = ["convert", str(src), str(dst), "--layout", "volumes", "--chunk-shape", "8", "8", "8", "--quiet"]
    _interrupt_after_one_case(monkeypatch, KeyboardInterrupt)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    line = _error(capsys, "info", dst, command="info")
    assert "incomplete" in line and "--resume" in line
    assert main(args + ["--resume"]) == 0
    _same_store(dst, zstore.path)


def test_overwrite_replaces_a_volume_store(vstore: VolumeStore, src: Path, tmp_path: Path,
                                           oracle: list[dict]) -> None:
    dst = _copy(vstore, tmp_path)
    with pytest.raises(StoreExistsError, match="--overwrite"):
        _convert_like(vstore, src, dst)
    store = convert(src, dst, layout="volumes", format=vstore.backend, chunk_shape=(16, 16, 16), overwrite=True,
                    progress=False)
    assert store.chunk_shape == (16, 16, 16)
    for k in range(4):
        np.testing.assert_array_equal(store.read_case(k)[0], oracle[k]["image"])
        np.testing.assert_array_equal(store.read_case(k)[1], oracle[k]["labels"])
    if vstore.backend == "zarr":  # nothing left of the 8^3 chunk grid
        files = [p for p in (dst / "cases" / "00000" / "image" / "c").rglob("*") if p.is_file()]
        assert len(files) == int(np.prod(chunk_grid(SHAPE, (16, 16, 16))))
    slices = convert(src, dst, overwrite=True, format=vstore.backend, size=(32, 32), progress=False)  # a slice store
    assert getattr(slices, "layout", "slices") != "volumes" and len(slices) == 3 * SHAPE[2] + BIG[2]
    assert not (dst / "cases").exists()


@pytest.mark.parametrize("where", ["cases/00001/notes.txt", "cases/notes.txt", "notes.txt",
                                   "cases/00000/image/c/0/x.txt"])
def test_overwrite_refuses_a_store_holding_foreign_files(zstore: VolumeStore, src: Path, tmp_path: Path,
                                                         where: str) -> None:
    dst = _copy(zstore, tmp_path)
    (dst / where).write_text("mine")
    with pytest.raises(StoreExistsError, match="does not write"):
        _convert_like(zstore, src, dst, overwrite=True)
    assert (dst / where).read_text() == "mine"
    np.testing.assert_array_equal(open_store(dst).read_case(1)[1], zstore.read_case(1)[1])  # untouched


@pytest.mark.slow
def test_two_workers_write_the_same_chunks(vstore: VolumeStore, src: Path, tmp_path: Path) -> None:
    two = _convert_like(vstore, src, tmp_path / "w2", workers=2)
    _same_store(two.path, vstore.path)
    m1 = json.loads((vstore.path / "manifest.json").read_text())
    m2 = json.loads((two.path / "manifest.json").read_text())
    assert [c["checksums_crc32"] for c in m1["cases"]] == [c["checksums_crc32"] for c in m2["cases"]]


# --------------------------------------------------------------------------- #
# corruption
# --------------------------------------------------------------------------- #
def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def _npy_offset(path: Path, index: tuple[int, ...]) -> int:
    """Byte offset of one element of a C-order .npy file."""
    mm = np.load(path, mmap_mode="r")
    offset = mm.offset + int(np.ravel_multi_index(index, mm.shape)) * mm.dtype.itemsize
    del mm
    return offset


def test_flipped_chunk_byte_is_caught_on_read_and_by_verify(zstore: VolumeStore, tmp_path: Path,
                                                            oracle: list[dict], capsys: pytest.CaptureFixture
                                                            ) -> None:
    dst = _copy(zstore, tmp_path)
    path = Path(chunk_file(dst, 1, "image", (1, 1, 1)))
    _flip(path, len(path.read_bytes()) // 2)
    store = open_store(dst)
    with pytest.raises(CorruptChunkError, match=r"case 1 \('case_001'.*checksum"):
        store.read_box(1, (8, 8, 8), (16, 16, 16))
    with pytest.raises(CorruptChunkError, match="case_001"):
        store.read_patch(1, (12, 12, 12), (30, 30, 30))
    np.testing.assert_array_equal(store.read_box(1, (0, 0, 0), (8, 8, 8))[0], oracle[1]["image"][:8, :8, :8])
    np.testing.assert_array_equal(store.read_case(2)[0], oracle[2]["image"])
    capsys.readouterr()
    assert main(["verify", str(dst), "--quiet"]) == 1
    out = capsys.readouterr()
    assert "case 1 ('case_001')" in out.out and "case_000" not in out.out and "1 problem(s)" in out.err
    assert main(["verify", str(zstore.path), "--quiet"]) == 0
    assert "intact" in capsys.readouterr().out


def test_verify_reads_false_skips_the_chunk_check(zstore: VolumeStore, tmp_path: Path, oracle: list[dict]) -> None:
    """A chunk file swapped for another valid one: only the checksum can tell."""
    dst = _copy(zstore, tmp_path)
    Path(chunk_file(dst, 0, "mask", (1, 1, 1))).write_bytes(Path(chunk_file(dst, 0, "mask", (2, 1, 1))).read_bytes())
    with pytest.raises(CorruptChunkError, match="checksum"):
        open_store(dst).read_box(0, (8, 8, 8), (16, 16, 16))
    _, mask = open_store(dst, verify_reads=False).read_box(0, (8, 8, 8), (16, 16, 16))
    np.testing.assert_array_equal(mask, oracle[0]["labels"][16:24, 8:16, 8:16])
    _, mask = VolumeStore(dst, verify_reads=False).read_box(0, (0, 0, 0), (8, 8, 8))
    np.testing.assert_array_equal(mask, oracle[0]["labels"][:8, :8, :8])


def test_memmap_flipped_byte_is_caught_unless_verify_reads_is_false(mstore: VolumeStore, tmp_path: Path,
                                                                    oracle: list[dict],
                                                                    capsys: pytest.CaptureFixture) -> None:
    dst = _copy(mstore, tmp_path)
    path = case_dir(dst, 2) / "image.npy"
    _flip(path, _npy_offset(path, (9, 3, 4, 0)))  # X slab 1 (x 8..15)
    store = open_store(dst)
    np.testing.assert_array_equal(store.read_box(2, (0, 0, 0), (8, 36, 20))[0], oracle[2]["image"][:8])
    with pytest.raises(CorruptChunkError, match=r"case 2 \('case_002'"):
        store.read_box(2, (9, 3, 4), (10, 4, 5))
    image, _ = open_store(dst, verify_reads=False).read_case(2)
    diff = np.argwhere(image != oracle[2]["image"])
    assert diff.tolist() == [[9, 3, 4, 0]]  # read as it is on disk
    capsys.readouterr()
    assert main(["verify", str(dst), "--quiet"]) == 1
    assert "case 2 ('case_002')" in capsys.readouterr().out
    assert main(["verify", str(mstore.path), "--quiet"]) == 0


def test_altered_array_metadata_is_refused(vstore: VolumeStore, tmp_path: Path, oracle: list[dict]) -> None:
    dst = _copy(vstore, tmp_path)
    if vstore.backend == "zarr":
        path = dst / "cases" / "00002" / "mask" / "zarr.json"
        meta = json.loads(path.read_text())
        meta["attributes"] = {"edited": True}
        path.write_text(json.dumps(meta, indent=2))
    else:
        path = case_dir(dst, 2) / "mask.npy"
        raw = path.read_bytes()
        assert b"'fortran_order': False" in raw
        path.write_bytes(raw.replace(b"'fortran_order': False", b"'fortran_order': True ", 1))
    store = open_store(dst)
    with pytest.raises(CorruptStoreError, match=r"(zarr\.json|mask\.npy).*case 2"):
        store.read_box(2, (0, 0, 0), (4, 4, 4))
    np.testing.assert_array_equal(store.read_case(0)[1], oracle[0]["labels"])  # other cases unaffected


def test_missing_files_are_named(vstore: VolumeStore, tmp_path: Path) -> None:
    dst = _copy(vstore, tmp_path)
    if vstore.backend == "zarr":
        Path(chunk_file(dst, 3, "mask", (2, 0, 1))).unlink()
        store = open_store(dst)
        with pytest.raises(CorruptChunkError, match="missing"):
            store.read_box(3, (16, 0, 8), (17, 1, 9))
        store.read_box(3, (0, 0, 0), (16, 8, 8))  # the chunks around it are there
    else:
        (case_dir(dst, 3) / "image.npy").unlink()
        with pytest.raises(CorruptStoreError, match="missing"):
            open_store(dst).read_box(3, (0, 0, 0), (2, 2, 2))
    assert main(["verify", str(dst), "--quiet"]) == 1


def test_altered_checksum_table_and_foreground_sample(vstore: VolumeStore, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    dst = _copy(vstore, tmp_path)
    fg = case_dir(dst, 1) / "foreground.npy"
    _flip(fg, _npy_offset(fg, (0, 0)))  # the x of the first sampled voxel
    store = open_store(dst)
    with pytest.raises(CorruptChunkError, match="foreground"):
        store.foreground(1)
    assert sorted(open_store(dst, verify_reads=False).foreground(1)) == sorted(vstore.foreground(1))
    table = case_dir(dst, 0) / "checksums.npy"
    _flip(table, len(table.read_bytes()) - 1)
    with pytest.raises(CorruptChunkError, match="checksum table"):
        open_store(dst).read_box(0, (0, 0, 0), (2, 2, 2))
    capsys.readouterr()
    assert main(["verify", str(dst), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "case 0 ('case_000')" in out and "case 1 ('case_001')" in out and "case 2" not in out


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #
def test_cli_convert_spacing_and_info(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "v"
    assert main(["convert", str(src), str(dst), "--layout", "volumes", "--spacing", "2", "2", "2", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    store = open_store(dst)
    assert isinstance(store, VolumeStore) and store.chunk_shape == (32, 32, 32)
    assert store.shape(0) == (20, 18, 25) and store.shape(3) == (12, 11, 18)  # round(n * s / 2)
    assert store.spacing(0) == pytest.approx((2.0, 2.0, 2.0))
    assert store.spacing(3) == pytest.approx((2.0, 0.8 * 28 / 11, 2.0))
    assert store.case(3)["source_shape"][:3] == list(BIG) and store.case(3)["source_spacing"] == pytest.approx(
        [0.8, 0.8, 1.5])
    assert main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "layout volumes" in out and "cases        4" in out and "patch reads" in out
    assert "chunks       32 x 32 x 32" in out and "foreground.npy" in out
    assert main(["info", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "volumes" and info["cases"] == 4 and info["format"] == "zarr"
    assert info["chunk_shape"] == [32, 32, 32] and info["label_values"] == [0, 1, 2, 3]
    assert main(["convert", str(src), str(tmp_path / "m"), "--layout", "volumes", "--format", "memmap",
                 "--chunk-shape", "16", "8", "4"]) == 0
    out = capsys.readouterr().out
    assert "converted 4 cases (3D, chunks 16 x 8 x 4)" in out and "(memmap)" in out
    assert open_store(tmp_path / "m").chunk_shape == (16, 8, 4)


@pytest.mark.parametrize("flags,needle", [
    (["--layout", "volumes", "--context", "1"], "--context"),
    (["--layout", "volumes", "--axis", "sagittal"], "--axis"),
    (["--layout", "volumes", "--skip-empty"], "--skip-empty"),
    (["--layout", "volumes", "--keep-empty", "0.5"], "--keep-empty"),
    (["--layout", "volumes", "--size", "16", "16"], "--size"),
    (["--layout", "volumes", "--chunk-samples", "4"], "--chunk-samples"),
    (["--layout", "volumes", "--channels", "1"], "--channels"),
    (["--chunk-shape", "8", "8", "8"], "--chunk-shape"),
    (["--layout", "slices", "--chunk-shape", "8", "8", "8"], "--chunk-shape"),
    (["--layout", "volumes", "--spacing", "0", "0", "0"], "spacing"),
    (["--layout", "volumes", "--spacing", "-1", "1", "1"], "spacing"),
    (["--layout", "volumes", "--spacing", "nan", "1", "1"], "spacing"),
    (["--spacing", "0", "0", "0"], "spacing"),
    (["--layout", "volumes", "--chunk-shape", "0", "8", "8"], "chunk_shape"),
    (["--layout", "volumes", "--chunk-shape", "8", "8", "2000"], "chunk_shape"),
])
def test_refused_options_are_one_line_and_leave_no_store(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         flags: list[str], needle: str) -> None:
    dst = tmp_path / "refused"
    line = _error(capsys, "convert", src, dst, *flags)
    assert needle in line and "Received:" in line
    _no_store(dst)


def test_bad_spacing_is_refused_before_any_case_is_read(src: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import streamseg.io.volume_source as vs

    def no_reading(case):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"read {case.name} before refusing the options")

    monkeypatch.setattr(vs, "read_pair", no_reading)
    with pytest.raises(OptionError, match="spacing"):
        convert(src, tmp_path / "x", layout="volumes", spacing=(0, 0, 0), progress=False)
    with pytest.raises(OptionError, match="--context"):
        convert(src, tmp_path / "x", layout="volumes", context=1, progress=False)
    _no_store(tmp_path / "x")


def test_bad_chunk_shape_is_refused_before_any_case_is_read(src: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import streamseg.io.volume_source as vs

    def no_reading(case):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"read {case.name} before refusing the options")

    monkeypatch.setattr(vs, "read_pair", no_reading)
    with pytest.raises(OptionError, match="chunk_shape"):
        convert(src, tmp_path / "x", layout="volumes", chunk_shape=(0, 8, 8), progress=False)


def test_slice_store_readers_refuse_a_volume_store(zstore: VolumeStore) -> None:
    from streamseg.store.reader import Store

    with pytest.raises(OptionError, match=r"PatchDataset.*--layout slices"):
        Store(zstore.path)


def test_volume_store_refuses_a_slice_store(src: Path, tmp_path: Path) -> None:
    flat = convert(src, tmp_path / "flat", size=(32, 32), progress=False)
    assert not isinstance(flat, VolumeStore) and len(flat) == 3 * SHAPE[2] + BIG[2]
    with pytest.raises(OptionError, match="2D store"):
        VolumeStore(tmp_path / "flat")


# Last in the file: importing SegmentationDataset loads TensorFlow.
def test_segmentation_dataset_refuses_a_volume_store_path(zstore: VolumeStore) -> None:
    from streamseg import SegmentationDataset

    with pytest.raises(OptionError, match=r"PatchDataset.*--layout slices"):
        SegmentationDataset(zstore.path, batch_size=2)


def test_segmentation_dataset_refuses_a_volume_store_object(zstore: VolumeStore) -> None:
    from streamseg import SegmentationDataset

    with pytest.raises(OptionError, match=r"PatchDataset.*--layout slices"):
        SegmentationDataset(zstore, batch_size=2)
