"""The ``streamseg`` command line: synth, convert, info, verify, demo, bench.

``convert``, ``info``, ``verify`` and ``synth`` never import TensorFlow.  Errors raised on
purpose (:class:`streamseg.errors.StreamsegError`) print one line and exit with status 2;
Ctrl-C exits with 130; a closed stdout pipe (``streamseg info X | head``) ends quietly with 141.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import StreamsegError

__all__ = ["main", "build_parser"]


def _add_convert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["zarr", "memmap"], default="zarr", help="store backend (default zarr)")
    p.add_argument("--chunk-samples", type=int, default=None, help="samples per chunk (default ~2 MiB)")
    p.add_argument("--compressor", choices=["lz4", "zstd", "none"], default="lz4",
                   help="Blosc codec (default lz4: fastest to decode; zstd: smaller)")
    p.add_argument("--workers", type=int, default=1, help="processes that decode and write (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--resume", action="store_true", help="finish an interrupted conversion")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_volume_options(p: argparse.ArgumentParser) -> None:
    """Options of ``convert`` for medical volume sources (None: not given, so the default)."""
    g = p.add_argument_group("medical volumes (imagesTr/ + labelsTr/, or images/ + masks/ of "
                             ".nii.gz/.nrrd/.mha files or DICOM series folders)")
    g.add_argument("--layout", choices=["slices", "volumes"], default=None,
                   help="slices (default): every slice one 2D sample; volumes: one 3D-chunked entry per "
                   "case, for PatchDataset")
    g.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default=None,
                   help="slicing axis of the RAS volume (default axial)")
    g.add_argument("--context", type=int, default=None, metavar="K",
                   help="stack K neighbouring slices on each side as channels (2.5D; default 0)")
    g.add_argument("--skip-empty", action="store_true", default=None, help="drop slices without foreground")
    g.add_argument("--keep-empty", type=float, default=None, metavar="F",
                   help="with --skip-empty: keep this share of the empty slices (seeded; default 0)")
    g.add_argument("--remap-labels", action="store_true", default=None,
                   help="store labels as 0..K-1 (table in the manifest); needed for labels above 255")
    g.add_argument("--mask-dtype", choices=["uint8", "uint16"], default=None,
                   help="mask store dtype (default uint8; training needs labels below 256)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of --keep-empty's draw and the foreground samples (default 0)")
    g.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="resample to this spacing in mm (RAS; 0 keeps an axis): linear images, nearest masks")
    g.add_argument("--chunk-shape", type=int, nargs=3, default=None, metavar=("CX", "CY", "CZ"),
                   help="--layout volumes: chunk in voxels (default 32 32 32)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``streamseg`` command."""
    parser = argparse.ArgumentParser(prog="streamseg", description="Stream image/mask pairs larger than "
                                     "memory into Keras segmentation training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic medical-looking scan set")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=None, help="pairs (default 300) or volumes (default 8)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default 256 256")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--volumes", action="store_true",
                   help="write CT-like NIfTI volumes (imagesTr/ + labelsTr/ + dataset.json)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="with --volumes: voxels per volume (default 96 96 48)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="with --volumes: voxel size in mm (default 1 1 2.5)")
    p.add_argument("--orientation", default=None,
                   help="with --volumes: axis codes on disk, e.g. LPS (default RAS)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="default 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, choices=[8, 16], default=None, help="default 8")
    p.add_argument("--to", choices=["files", "zarr", "memmap"], default=None,
                   help="image/mask files (default) or straight into a store")
    p.add_argument("--ext", default=None, help="image file type for --to files (default .png)")
    p.add_argument("--mask-suffix", default=None)
    _add_convert_options(p)

    p = sub.add_parser("convert", help="convert image/mask pairs into a store")
    p.add_argument("src", nargs="?", help="folder with images/ and masks/")
    p.add_argument("dst")
    p.add_argument("--images", help=".npy/.npz array of images instead of SRC")
    p.add_argument("--masks", help=".npy/.npz array of masks instead of SRC")
    p.add_argument("--images-key")
    p.add_argument("--masks-key")
    p.add_argument("--images-dir")
    p.add_argument("--masks-dir")
    p.add_argument("--mask-suffix", default="", help="e.g. _mask for case1_mask.png")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize every pair")
    p.add_argument("--channels", type=int, choices=[1, 3], help="convert images to 1 or 3 channels")
    p.add_argument("--image-dtype", choices=["uint8"], help="store 16-bit images as 8-bit")
    _add_convert_options(p)
    p.add_argument("--dask", metavar="SCHEDULER", default=None,
                   help="write the chunks on a Dask cluster, one task per chunk: tcp://HOST:PORT (a running "
                   "scheduler; DST must be a path every worker sees, e.g. a shared file system) or local:N "
                   "(N worker processes here); same store as without, --resume works; not with --workers "
                   "or --layout volumes")
    _add_volume_options(p)
    g = p.add_argument_group("object storage (DST a URL: s3://bucket/data.zarr; gs://, az://, file:// through fsspec)")
    g.add_argument("--storage-option", action="append", default=None, metavar="KEY=VALUE",
                   help="fsspec file system option, repeatable, e.g. endpoint_url=http://localhost:9000 (JSON values "
                   "parsed); credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws")
    g.add_argument("--staging", default=None, metavar="DIR",
                   help="local folder the store is converted in before the upload (needs the store's size of "
                   "free disk; default the system temp folder); removed once uploaded")

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--storage-option", action="append", default=None, metavar="KEY=VALUE",
                   help="for a store URL (s3://...): fsspec file system option, repeatable")

    p = sub.add_parser("verify", help="re-read every chunk and check its checksum")
    p.add_argument("store")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--storage-option", action="append", default=None, metavar="KEY=VALUE",
                   help="for a store URL (s3://...; downloaded into a temporary folder to check): fsspec file "
                   "system option, repeatable")

    p = sub.add_parser("demo", help="synthesise, convert, train a small U-Net, save a preview")
    p.add_argument("--out", default="streamseg-demo", help="working folder (default ./streamseg-demo)")
    p.add_argument("--count", type=int, default=None, help="scans (default 300) or volumes (default 8)")
    p.add_argument("--size", type=int, default=None, help="image side (default 128; volumes: 96)")
    p.add_argument("--volumes", action="store_true",
                   help="CT-like NIfTI volumes: axial slices (2.5D, context 1) for a 2D U-Net, then the "
                   "volumes whole (--layout volumes) for a few steps of a 3D U-Net on patches and a "
                   "sliding-window prediction of a held-out case (NIfTI)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default 2; both models with --volumes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="stop after convert and info (both stores with --volumes)")

    p = sub.add_parser("bench", help="measure the input pipeline feeding model.fit (2D samples, or 3D "
                       "patches of a volume store)")
    from .bench.cli import add_bench_arguments

    add_bench_arguments(p)
    return parser


_SYNTH_2D_ONLY = {"size": "--size", "to": "--to", "ext": "--ext", "mask_suffix": "--mask-suffix",
                  "channels": "--channels", "bits": "--bits"}
_SYNTH_VOLUME_ONLY = {"shape": "--shape", "spacing": "--spacing", "orientation": "--orientation"}


def _refuse_flags(args: argparse.Namespace, flags: dict[str, str], why: str) -> None:
    """Refuse the first of ``flags`` (dest -> flag; default None) that was given."""
    from .errors import OptionError

    for dest, flag in flags.items():
        value = getattr(args, dest)
        if value is not None:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise OptionError(f"{flag} {why}. Received: {flag} {shown}")


def _cmd_synth_volumes(args: argparse.Namespace) -> None:
    from .io.synth_volumes import write_synth_volumes

    _refuse_flags(args, _SYNTH_2D_ONLY, "applies to 2D scans, not to --volumes (which writes NIfTI "
                  "files; set their size with --shape X Y Z)")
    count = 8 if args.count is None else args.count
    shape = tuple(args.shape) if args.shape else (96, 96, 48)
    spacing = tuple(args.spacing) if args.spacing else (1.0, 1.0, 2.5)
    pairs = write_synth_volumes(args.dst, count, shape=shape, spacing=spacing, classes=args.classes,
                                seed=args.seed, orientation=args.orientation or "RAS",
                                progress=None if not args.quiet else False)
    print(f"wrote {len(pairs)} CT-like volumes ({'x'.join(map(str, shape))} voxels of "
          f"{'x'.join(f'{v:g}' for v in spacing)} mm) to {args.dst}/imagesTr and {args.dst}/labelsTr")


def _cmd_synth(args: argparse.Namespace) -> None:
    from .store.converter import check_size

    if args.volumes:
        _cmd_synth_volumes(args)
        return
    _refuse_flags(args, _SYNTH_VOLUME_ONLY, "applies to --volumes only")
    size = tuple(args.size) if args.size else (256, 256)
    count = 300 if args.count is None else args.count
    channels = 3 if args.channels is None else args.channels
    to = args.to or "files"
    check_size(size, channels=channels, workers=args.workers)  # before making one
    progress = False if args.quiet else "auto"
    dtype = "uint16" if args.bits == 16 else "uint8"
    if to == "files":
        from .io.synth import write_synth_folder

        write_synth_folder(args.dst, count, size=size, classes=args.classes,
                           channels=channels, seed=args.seed, dtype=dtype, ext=args.ext or ".png",
                           mask_suffix=args.mask_suffix or "", progress=None if progress else False)
        print(f"wrote {count} image/mask pairs to {args.dst}/images and {args.dst}/masks")
        return
    from .store.converter import convert_source
    from .io.sources import SynthSource

    source = SynthSource(count, size=size, classes=args.classes, channels=channels,
                         seed=args.seed, dtype=dtype)
    store = convert_source(source, args.dst, format=to, chunk_samples=args.chunk_samples,
                           compressor=args.compressor, workers=args.workers, overwrite=args.overwrite,
                           resume=args.resume, progress=progress)
    print(f"wrote {len(store)} synthetic pairs to the {to} store {args.dst}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .store.converter import convert
    from .store.remote_fs import parse_storage_options

    store = convert(args.src, args.dst, images=args.images, masks=args.masks, images_key=args.images_key,
                    masks_key=args.masks_key, images_dir=args.images_dir, masks_dir=args.masks_dir,
                    mask_suffix=args.mask_suffix, format=args.format,
                    size=tuple(args.size) if args.size else None, channels=args.channels,
                    image_dtype=args.image_dtype, chunk_samples=args.chunk_samples,
                    compressor=args.compressor, workers=args.workers, overwrite=args.overwrite,
                    resume=args.resume, progress=False if args.quiet else "auto", layout=args.layout,
                    axis=args.axis, context=args.context, skip_empty=args.skip_empty,
                    keep_empty=args.keep_empty, remap_labels=args.remap_labels, seed=args.seed,
                    mask_dtype=args.mask_dtype, spacing=tuple(args.spacing) if args.spacing else None,
                    chunk_shape=tuple(args.chunk_shape) if args.chunk_shape else None, dask=args.dask,
                    storage_options=parse_storage_options(args.storage_option), staging=args.staging)
    if not args.quiet:
        from .store.volume_info import volume_summary

        vols = volume_summary(store.meta)
        if getattr(store, "layout", None) == "volumes":
            what = f"{len(store)} cases (3D, chunks {' x '.join(map(str, store.chunk_shape))})"
        else:
            what = f"{len(store)} slices of {vols['cases']} cases" if vols else f"{len(store)} pairs"
        print(f"converted {what} into {args.dst} ({store.backend})")


def _cmd_info(args: argparse.Namespace) -> None:
    from .store.inspect import format_info, store_info
    from .store.layout import load_manifest
    from .store.volume_info import volume_lines, volume_summary
    from .store.remote_fs import is_url, parse_storage_options

    if is_url(args.store) or args.storage_option:
        from .store.remote_upload import remote_store_info

        info, vols = remote_store_info(args.store, parse_storage_options(args.storage_option)), None
    else:
        info = store_info(args.store)
        vols = volume_summary(load_manifest(Path(args.store)))
    if args.json:
        if vols is not None:
            info["volumes"] = vols
        print(json.dumps(info, indent=1))
        return
    print(format_info(info))
    if vols is not None:
        print("\n".join(volume_lines(vols)))


def _cmd_verify(args: argparse.Namespace) -> int:
    from .store.inspect import describe_problem, verify_store

    from .store.remote_fs import is_url, parse_storage_options

    if is_url(args.store) or args.storage_option:
        from .store.remote_upload import verify_remote_store

        damaged = verify_remote_store(args.store, parse_storage_options(args.storage_option),
                                      progress=False if args.quiet else "auto")
    else:
        damaged = verify_store(args.store, progress=False if args.quiet else "auto")
    if not damaged:
        print(f"{args.store}: all files and chunks intact")
        return 0
    for d in damaged:
        print(f"{args.store}: {describe_problem(d)}")
    print(f"{len(damaged)} problem(s); re-convert the store (or leave the listed samples out).", file=sys.stderr)
    return 1


def _stdout_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (so a BrokenPipeError was about stdout)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is not a file
        return True


def _stdout_closed() -> int:
    """The reader of stdout went away (``streamseg info X | head``): stop quietly.

    Further output (and Python's final flush) goes to ``/dev/null``, and the status is 141
    (128 + SIGPIPE), what a shell reports for any command cut short by a closed pipe.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (tests' capture): nothing to redirect
        pass
    return 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``streamseg`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, for demo/bench
    rc = 0
    try:
        if args.command == "synth":
            _cmd_synth(args)
        elif args.command == "convert":
            _cmd_convert(args)
        elif args.command == "info":
            _cmd_info(args)
        elif args.command == "verify":
            rc = _cmd_verify(args)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args)
        elif args.command == "bench":
            from .bench.cli import run_bench_command

            rc = run_bench_command(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
    except BrokenPipeError:
        if not _stdout_broken():
            raise
        return _stdout_closed()
    except StreamsegError as exc:
        print(f"streamseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (rerun with --resume to continue)" if args.command in ("convert", "synth") else ""
        print(f"streamseg {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
