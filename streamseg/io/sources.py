"""Where conversion reads from: image/mask folders, NumPy arrays, or the synthetic set.

Each source is a small picklable object with ``__len__``, ``name(i)`` and
``load(i) -> (image, mask)`` returning raw arrays; :func:`prepare_pair` then checks
them and brings them to the stored layout (channels, size, dtype).  Sources pickle as
paths and options, so conversion workers reopen files themselves.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..native_stderr import CodecNotes, NativeStderr
from ..errors import InputError, LabelError, OptionError, SourceMismatchError, UnreadableFileError, truncate

__all__ = ["IMAGE_EXTENSIONS", "FolderSource", "ArraySource", "SynthSource", "prepare_pair",
           "open_array"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def _list_images(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return {p.stem: p for p in files}


def _first(items: list[str], k: int = 5) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" (and {len(items) - k} more)" if len(items) > k else "")


class FolderSource:
    """Image/mask files paired by file stem.

    Parameters
    ----------
    src : path
        Folder holding ``images/`` and ``masks/`` (or give both folders explicitly).
    images_dir, masks_dir : path, optional
        Override the two folders.
    mask_suffix : str
        Suffix of mask stems, e.g. ``"_mask"`` for ``case1_mask.png``.
    """

    def __init__(self, src: str | os.PathLike | None, *, images_dir: str | os.PathLike | None = None,
                 masks_dir: str | os.PathLike | None = None, mask_suffix: str = "") -> None:
        base = Path(src) if src is not None else None
        if base is not None and not base.exists():
            raise UnreadableFileError(f"Source folder {base} does not exist; check the path.")
        self.images_dir = Path(images_dir) if images_dir else (base / "images" if base else None)
        self.masks_dir = Path(masks_dir) if masks_dir else (base / "masks" if base else None)
        for label, d in (("images", self.images_dir), ("masks", self.masks_dir)):
            if d is None or not d.is_dir():
                raise UnreadableFileError(
                    f"No {label} folder at {d}: SRC must contain images/ and masks/ "
                    f"(or pass --{label}-dir)."
                )
        images = _list_images(self.images_dir)  # type: ignore[arg-type]
        masks = _list_images(self.masks_dir)  # type: ignore[arg-type]
        if mask_suffix:
            masks = {(s[: -len(mask_suffix)] if s.endswith(mask_suffix) else s + "\0"): p
                     for s, p in masks.items()}
        if not images and not masks:
            raise InputError(
                f"No image files in {self.images_dir} or {self.masks_dir} "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})."
            )
        lonely_images = sorted(set(images) - set(masks))
        lonely_masks = sorted(s.rstrip("\0") for s in set(masks) - set(images))
        if lonely_images:
            hint = " (masks named like 'case_mask.png'? pass --mask-suffix _mask)" if not mask_suffix else ""
            raise SourceMismatchError(
                f"{len(lonely_images)} image(s) in {self.images_dir} have no mask in "
                f"{self.masks_dir}: {_first([images[s].name for s in lonely_images])}{hint}."
            )
        if lonely_masks:
            raise SourceMismatchError(
                f"{len(lonely_masks)} mask(s) in {self.masks_dir} have no image in "
                f"{self.images_dir}: {_first(lonely_masks)}."
            )
        self.stems = sorted(images)
        self.image_files = [str(images[s]) for s in self.stems]
        self.mask_files = [str(masks[s]) for s in self.stems]
        self._notes = CodecNotes()  # per process: each worker notes a decoder warning once

    def __len__(self) -> int:
        return len(self.stems)

    def name(self, i: int) -> str:
        return self.stems[i]

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "images_dir": str(self.images_dir), "masks_dir": str(self.masks_dir),
                "count": len(self)}

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        import cv2

        out = []
        for path in (self.image_files[i], self.mask_files[i]):
            try:
                with NativeStderr() as captured:  # libpng & co. print to fd 2 directly
                    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            except cv2.error as exc:  # pragma: no cover - depends on the codec
                arr = None
                reason = str(exc).strip().splitlines()[-1]
            else:
                reason = "not a readable image (corrupt, truncated or unsupported format)"
            if captured.text:
                if arr is None:  # the decoder's own words say best what is wrong
                    reason = f"{reason}; the decoder said: {' '.join(captured.text.split())[:200]}"
                else:
                    self._notes.report(captured.text, path)
            if arr is None:
                raise UnreadableFileError(f"Cannot read {path}: {reason}. Fix or remove the pair.")
            if arr.ndim == 3 and arr.shape[2] >= 3:  # OpenCV decodes colour as BGR(A)
                arr = arr[..., 2::-1] if arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]]
            out.append(arr)
        return out[0], out[1], self.image_files[i], self.mask_files[i]


def open_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Open a ``.npy`` file (or an uncompressed ``.npz`` member) through memory mapping."""
    p = Path(path)
    if not p.exists():
        raise UnreadableFileError(f"Array file {p} does not exist; check the path.")
    if p.suffix == ".npz":
        with zipfile.ZipFile(p) as zf:
            members = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if key is None:
                raise OptionError(f"{p} is an .npz archive: name the array with --images-key/--masks-key "
                                  f"(it holds: {', '.join(members)}). Received: key=None")
            if key not in members:
                raise OptionError(f"{p} has no array '{key}'. It holds: {', '.join(members)}. "
                                  f"Received: {truncate(key)}")
            info = zf.getinfo(key + ".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise InputError(f"Array '{key}' in {p} is compressed (np.savez_compressed) and cannot be "
                                 "memory-mapped; re-save it with np.savez or np.save.")
            with open(p, "rb") as fh:  # data starts after the local file header
                fh.seek(info.header_offset)
                header = fh.read(30)
                name_len = int.from_bytes(header[26:28], "little")
                extra_len = int.from_bytes(header[28:30], "little")
                start = info.header_offset + 30 + name_len + extra_len
                fh.seek(start)
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
                offset = fh.tell()
            return np.memmap(p, mode="r", dtype=dtype, shape=shape, offset=offset,
                             order="F" if fortran else "C")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise UnreadableFileError(f"Cannot read {p} as a NumPy array ({exc}).") from None


class ArraySource:
    """Image and mask arrays in ``.npy``/``.npz`` files, read through memory mapping."""

    def __init__(self, images: str | os.PathLike, masks: str | os.PathLike, *,
                 images_key: str | None = None, masks_key: str | None = None) -> None:
        self.spec = (str(images), images_key, str(masks), masks_key)
        img, msk = self._open()
        if img.ndim not in (3, 4) or msk.ndim not in (3, 4):
            raise InputError(f"Expected images (N, H, W[, C]) and masks (N, H, W[, 1]). "
                             f"Received: images {img.shape} from {images}, masks {msk.shape} from {masks}")
        if img.shape[0] != msk.shape[0]:
            raise SourceMismatchError(f"{images} holds {img.shape[0]} images but {masks} holds "
                                      f"{msk.shape[0]} masks; they must pair one to one.")
        if img.shape[0] == 0:
            raise InputError(f"{images} holds no samples.")
        self.count = int(img.shape[0])
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        ip, ik, mp, mk = self.spec
        return open_array(ip, ik), open_array(mp, mk)

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "count": self.count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec, self.count, self._arrays = state["spec"], state["count"], None

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return str(i)

    def describe(self) -> dict[str, Any]:
        return {"kind": "arrays", "images": self.spec[0], "images_key": self.spec[1],
                "masks": self.spec[2], "masks_key": self.spec[3], "count": self.count}

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        if self._arrays is None:
            self._arrays = self._open()
        img, msk = self._arrays
        return np.asarray(img[i]), np.asarray(msk[i]), f"{self.spec[0]}[{i}]", f"{self.spec[2]}[{i}]"


class SynthSource:
    """The synthetic scan set of :mod:`streamseg.io.synth`, generated sample by sample."""

    def __init__(self, count: int, *, size: tuple[int, int] = (256, 256), classes: int = 3,
                 channels: int = 3, seed: int = 0, dtype: str = "uint8") -> None:
        self.count, self.options = int(count), dict(size=tuple(size), classes=classes, channels=channels,
                                                    seed=seed, dtype=dtype)

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return f"case_{i:06d}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "synth", "count": self.count, **{k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in self.options.items()}}

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        from .synth import synth_sample

        image, mask = synth_sample(i, **self.options)
        return image, mask, f"synth[{i}]", f"synth[{i}]"


_STORED_IMAGE_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)
_INT16 = np.iinfo(np.int16)


def _image_dtype(image: np.ndarray, where: str) -> np.ndarray:
    """Bring an image to a stored dtype: uint8, uint16, int16 (signed, e.g. CT in HU) or float32.

    Those four are kept as they are.  Other integers become uint8/uint16 when they are
    non-negative and fit (as before), int16 when they hold negatives within int16; other
    floats become float32.
    """
    if image.dtype in _STORED_IMAGE_DTYPES:
        return image
    if image.dtype.kind in "iu" and image.size:
        lo, hi = int(image.min()), int(image.max())
        if 0 <= lo and hi <= 65535:
            return image.astype(np.uint16 if hi > 255 else np.uint8)
        if _INT16.min <= lo and hi <= _INT16.max:
            return image.astype(np.int16)
        raise InputError(f"Image {where} has {image.dtype} values {lo}..{hi}, outside both uint16 and "
                         "int16; store it as float32 (or rescale it) first.")
    if image.dtype.kind == "f":
        return image.astype(np.float32)
    raise InputError(f"Image {where} has dtype {image.dtype}; expected uint8, uint16, int16 or float.")


def _to_channels(image: np.ndarray, channels: int | None, where: str, *,
                 keep_channels: bool = False) -> np.ndarray:
    import cv2

    if keep_channels:  # channels are planes (volume modalities, context slices), never alpha
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise InputError(f"Image {where} has shape {image.shape}; expected (H, W) or (H, W, C).")
        have = image.shape[2]
        if channels is None or channels == have:
            return image
        if have == 1:
            return np.repeat(image, channels, axis=2)
        raise InputError(f"Image {where} has {have} channels (modalities or context slices), which "
                         f"--channels {channels} cannot convert; leave --channels unset.")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] == 4:  # drop alpha
        image = image[..., :3]
    if image.ndim == 3 and image.shape[2] == 2:  # grey + alpha
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise InputError(f"Image {where} has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4).")
    have = 1 if image.ndim == 2 else 3
    if channels is None or channels == have:
        return image[..., None] if have == 1 else image
    if channels == 3:
        return np.repeat(image[..., None], 3, axis=2)
    if image.dtype == np.int16:  # cvtColor has no 16-bit signed path: weights in float, rounded back
        grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(grey), _INT16.min, _INT16.max).astype(np.int16)[..., None]
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)[..., None]


def _to_mask(mask: np.ndarray, where: str, mask_dtype: str = "uint8") -> np.ndarray:
    if mask.ndim == 3 and mask.shape[2] in (3, 4):
        colour = mask[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise LabelError(f"Mask {where} is a colour image with different channels (colour-coded "
                             "labels?); save masks as single-channel label images (0, 1, 2, ...).")
        mask = colour[..., 0]
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise InputError(f"Mask {where} has shape {mask.shape}; expected (H, W) or (H, W, 1).")
    if mask.dtype.kind == "f":
        raise LabelError(f"Mask {where} holds floating-point values ({mask.dtype}); masks must hold "
                         "integer labels: round or threshold them first.")
    if mask.dtype.kind == "b":
        mask = mask.astype(np.uint8)
    target = np.dtype(mask_dtype)
    if mask.dtype != target:
        top = int(np.iinfo(target).max)
        if mask.size and (mask.min() < 0 or mask.max() > top):
            raise LabelError(f"Mask {where} has label values outside 0..{top} (min {int(mask.min())}, "
                             f"max {int(mask.max())}); streamseg stores at most {top + 1} labels as "
                             f"{target} (volume sources: --remap-labels maps them to 0..K-1).")
        mask = mask.astype(target)
    return mask


def prepare_pair(image: np.ndarray, mask: np.ndarray, image_where: str, mask_where: str, *,
                 size: tuple[int, int] | None, channels: int | None,
                 image_dtype: str | None = None, keep_channels: bool = False,
                 mask_dtype: str = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """Check one raw pair and bring it to the stored layout.

    Images: stored as uint8, uint16, int16 (signed, e.g. CT in Hounsfield units) or float32
    (see :func:`_image_dtype`); channel conversion; resize with area interpolation when
    shrinking and linear when enlarging (OpenCV resizes int16 and float32 natively, int16
    rounded); optional 16-to-8-bit conversion of uint16.  Masks: integer labels in the range of
    ``mask_dtype`` (``"uint8"``: 0..255, ``"uint16"``: 0..65535), resized with nearest
    neighbour only, so no new label values appear.

    ``keep_channels=True`` (volume sources, whose channels are modalities or 2.5D context
    slices) keeps any number of channels as they are: no alpha or grey+alpha dropping, and
    ``channels`` may only repeat a single channel.
    """
    import cv2

    image = _image_dtype(image, image_where)
    if image_dtype == "uint8" and image.dtype in (np.int16,):
        raise InputError(f"Image {image_where} is int16 (signed, e.g. Hounsfield units); --image-dtype "
                         "uint8 converts uint16 images only. Window/rescale signed images first or keep int16.")
    image = _to_channels(image, channels, image_where, keep_channels=keep_channels)
    mask = _to_mask(mask, mask_where, mask_dtype)
    if size is None and image.shape[:2] != mask.shape[:2]:
        raise SourceMismatchError(
            f"Image {image_where} is {image.shape[1]}x{image.shape[0]} but its mask {mask_where} is "
            f"{mask.shape[1]}x{mask.shape[0]}; fix the pair or pass --size H W to resize both."
        )
    if size is not None:
        h, w = size
        if image.shape[:2] != (h, w):
            shrink = h <= image.shape[0] and w <= image.shape[1]
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            # OpenCV's area resize takes at most 4 channels (2.5D context slices have more)
            parts = [cv2.resize(np.ascontiguousarray(image[..., a:a + 4]), (w, h), interpolation=interp)
                     .reshape(h, w, -1) for a in range(0, image.shape[2], 4)]
            image = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
        if mask.shape != (h, w):
            mask = cv2.resize(np.ascontiguousarray(mask), (w, h), interpolation=cv2.INTER_NEAREST)
    if image_dtype == "uint8" and image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return np.ascontiguousarray(image), mask[..., None]
