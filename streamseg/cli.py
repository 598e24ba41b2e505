"""The ``streamseg`` command line: synth, convert, info, verify, demo, bench.

``convert``, ``info``, ``verify`` and ``synth`` never import TensorFlow.  Errors raised on
purpose (:class:`streamseg.errors.StreamsegError`) print one line and exit with status 2;
Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``streamseg`` command."""
    parser = argparse.ArgumentParser(prog="streamseg", description="Stream image/mask pairs larger than "
                                     "memory into Keras segmentation training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic medical-looking scan set")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, choices=[8, 16], default=8)
    p.add_argument("--to", choices=["files", "zarr", "memmap"], default="files",
                   help="image/mask files (default) or straight into a store")
    p.add_argument("--ext", default=".png", help="image file type for --to files (default .png)")
    p.add_argument("--mask-suffix", default="")
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

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("verify", help="re-read every chunk and check its checksum")
    p.add_argument("store")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("demo", help="synthesise, convert, train a small U-Net, save a preview")
    p.add_argument("--out", default="streamseg-demo", help="working folder (default ./streamseg-demo)")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--size", type=int, default=128, help="image side (default 128)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="stop after convert and info")

    p = sub.add_parser("bench", help="measure the input pipeline feeding model.fit")
    from .bench.cli import add_bench_arguments

    add_bench_arguments(p)
    return parser


def _cmd_synth(args: argparse.Namespace) -> None:
    progress = False if args.quiet else "auto"
    dtype = "uint16" if args.bits == 16 else "uint8"
    if args.to == "files":
        from .io.synth import write_synth_folder

        write_synth_folder(args.dst, args.count, size=tuple(args.size), classes=args.classes,
                           channels=args.channels, seed=args.seed, dtype=dtype, ext=args.ext,
                           mask_suffix=args.mask_suffix, progress=None if progress else False)
        print(f"wrote {args.count} image/mask pairs to {args.dst}/images and {args.dst}/masks")
        return
    from .store.converter import convert_source
    from .io.sources import SynthSource

    source = SynthSource(args.count, size=tuple(args.size), classes=args.classes, channels=args.channels,
                         seed=args.seed, dtype=dtype)
    store = convert_source(source, args.dst, format=args.to, chunk_samples=args.chunk_samples,
                           compressor=args.compressor, workers=args.workers, overwrite=args.overwrite,
                           resume=args.resume, progress=progress)
    print(f"wrote {len(store)} synthetic pairs to the {args.to} store {args.dst}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .store.converter import convert

    store = convert(args.src, args.dst, images=args.images, masks=args.masks, images_key=args.images_key,
                    masks_key=args.masks_key, images_dir=args.images_dir, masks_dir=args.masks_dir,
                    mask_suffix=args.mask_suffix, format=args.format,
                    size=tuple(args.size) if args.size else None, channels=args.channels,
                    image_dtype=args.image_dtype, chunk_samples=args.chunk_samples,
                    compressor=args.compressor, workers=args.workers, overwrite=args.overwrite,
                    resume=args.resume, progress=False if args.quiet else "auto")
    if not args.quiet:
        print(f"converted {len(store)} pairs into {args.dst} ({store.backend})")


def _cmd_info(args: argparse.Namespace) -> None:
    from .store.inspect import format_info, store_info

    info = store_info(args.store)
    print(json.dumps(info, indent=1) if args.json else format_info(info))


def _cmd_verify(args: argparse.Namespace) -> int:
    from .store.inspect import verify_store

    damaged = verify_store(args.store, progress=False if args.quiet else "auto")
    if not damaged:
        print(f"{args.store}: all chunks intact")
        return 0
    for d in damaged:
        print(f"{args.store}: {d['array']} chunk {d['chunk']} (samples {d['samples'][0]}-{d['samples'][1]}, "
              f"{', '.join(d['names'])}...): {d['problem']}")
    print(f"{len(damaged)} damaged chunk(s); re-convert the store (or the listed samples).", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``streamseg`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, for demo/bench
    try:
        if args.command == "synth":
            _cmd_synth(args)
        elif args.command == "convert":
            _cmd_convert(args)
        elif args.command == "info":
            _cmd_info(args)
        elif args.command == "verify":
            return _cmd_verify(args)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args)
        elif args.command == "bench":
            from .bench.cli import run_bench_command

            return run_bench_command(args)
    except StreamsegError as exc:
        print(f"streamseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (rerun with --resume to continue)" if args.command in ("convert", "synth") else ""
        print(f"streamseg {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
