"""A quiet start: native libraries' stderr chatter is captured, summarised or hidden."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import streamseg as ss
from streamseg.native_stderr import CodecNotes, NativeStderr

ROOT = Path(__file__).resolve().parent.parent
TF_NOISE = re.compile(r"^([IWE]\d{4} |WARNING: All log messages before absl)")


def _png_with_bad_iccp(path: Path, shape: tuple[int, ...]) -> None:
    """A PNG whose iCCP chunk is too short: libpng warns on fd 2, the pixels decode fine."""
    ok, buf = cv2.imencode(".png", np.full(shape, 7, np.uint8))
    data = buf.tobytes()
    body = b"iCCP" + b"bad\x00\x00" + zlib.compress(b"\x00" * 132)
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    path.write_bytes(data[:33] + chunk + data[33:])  # right after the signature and IHDR


def test_native_stderr_captures_fd2_and_restores_it(capfd):
    with NativeStderr() as cap:
        os.write(2, b"from C\n")
    os.write(2, b"after\n")
    assert cap.text == "from C\n"
    assert capfd.readouterr().err == "after\n"


def test_codec_notes_say_a_known_warning_once_and_pass_other_text(capsys):
    notes = CodecNotes()
    notes.report("libpng warning: iCCP: known incorrect sRGB profile\n", "a.png")
    notes.report("libpng warning: iCCP: known incorrect sRGB profile\nsomething else\n", "b.png")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("streamseg: note: a.png: libpng warning: iCCP") and "harmless" in err[0]
    assert err[1] == "something else"


def test_convert_turns_libpng_warnings_into_one_note(tmp_path, capfd):
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "masks").mkdir()
    for name in ("a", "b", "c"):
        _png_with_bad_iccp(tmp_path / "src" / "images" / f"{name}.png", (8, 8, 3))
        cv2.imwrite(str(tmp_path / "src" / "masks" / f"{name}.png"), np.zeros((8, 8), np.uint8))
    assert cv2.imread(str(tmp_path / "src" / "images" / "a.png")) is not None
    capfd.readouterr()
    ss.convert(tmp_path / "src", tmp_path / "out.zarr", workers=1, progress=False)
    err = capfd.readouterr().err
    assert not any(line.startswith("libpng warning") for line in err.splitlines()), err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "a.png: libpng warning: iCCP: too short" in notes[0], err
    store = ss.open_store(tmp_path / "out.zarr")
    assert len(store) == 3 and int(store.read([2])[0].max()) == 7  # read correctly all the same


@pytest.mark.slow
def test_demo_start_is_quiet_and_names_the_device(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "streamseg.cli", "demo", "--out", str(tmp_path / "d"),
                           "--count", "24", "--size", "64", "--epochs", "1", "--batch-size", "8",
                           "--workers", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if TF_NOISE.match(line)]
    assert not noise, noise
    assert re.search(r"^training on (CPU: no GPU found|GPU: .+)$", proc.stdout, re.M), proc.stdout
    assert (tmp_path / "d" / "preview.png").stat().st_size > 0
