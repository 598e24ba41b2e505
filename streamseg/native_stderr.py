"""Capture what native libraries (libpng, libtiff, TensorFlow's C++ runtime) write to fd 2.

C libraries print straight to the process's standard-error file descriptor, past Python's
``sys.stderr``: libpng says ``libpng warning: iCCP: known incorrect sRGB profile`` for many
harmless PNGs, and a newcomer reads that as a failure.  :class:`NativeStderr` points fd 2 at a
temporary file for the length of a ``with`` block, then hands back what was written.

The redirection is process-wide, so use it around short calls in a thread that owns the
moment (a decode in a conversion worker, an import at start-up), never around long work that
other threads print during.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from types import TracebackType

__all__ = ["NativeStderr", "LIBRARY_WARNING_PREFIXES", "CodecNotes", "load_tensorflow_quietly"]

#: Lines that decoders print for files they read correctly anyway.
LIBRARY_WARNING_PREFIXES: tuple[str, ...] = ("libpng warning:", "TIFFReadDirectory: Warning",
                                              "TIFFFetchNormalTag: Warning", "Warning, ")


class NativeStderr:
    """Context manager that collects everything written to file descriptor 2 meanwhile.

    After the block, :attr:`text` holds the captured output (decoded as UTF-8, errors
    replaced).  Nesting is allowed; an inner capture sees only its own block's output.
    """

    def __init__(self) -> None:
        self.text = ""
        self._saved: int | None = None
        self._file: tempfile._TemporaryFileWrapper | None = None  # type: ignore[type-arg]

    def __enter__(self) -> "NativeStderr":
        try:
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed or broken stderr: nothing to keep in order
            pass
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._saved is None or self._file is None:  # __exit__ without __enter__
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        self._saved = self._file = None


class CodecNotes:
    """Turns decoder chatter into one short note per distinct message, in this process.

    ``libpng warning: iCCP: known incorrect sRGB profile`` for 10,000 files becomes one line
    ``streamseg: note: FILE: libpng warning: iCCP: ... (harmless: the file was read; ...)``.
    Any other captured text is written back to stderr unchanged.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def report(self, text: str, path: str) -> None:
        """Print what a decode of ``path`` wrote to fd 2, deduplicating known warnings."""
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith(LIBRARY_WARNING_PREFIXES):
                if line in self._seen:
                    continue
                self._seen.add(line)
                print(f"streamseg: note: {path}: {line} (harmless: the file was read; "
                      "identical notes are not repeated)", file=sys.stderr)
            else:
                print(line, file=sys.stderr)


#: TensorFlow's C++ start-up lines: absl's pre-init notice and glog-style ``I0000``/``W0000``/
#: ``E0000 ... failed call to cuInit`` lines, printed before TF_CPP_MIN_LOG_LEVEL applies.
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                       r"|[IWE]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]"
                       r"|To enable the following instructions:)")


def load_tensorflow_quietly() -> str:
    """Import TensorFlow and Keras without their C++ start-up noise; describe the device.

    Sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it, then imports TensorFlow and Keras
    and asks for the GPUs with fd 2 captured, and writes back every captured line that is
    not start-up noise (absl's "before InitializeLog" notice, ``I0000``/``W0000``/``E0000``
    lines such as the oneDNN notice or ``failed call to cuInit`` on a machine without a
    GPU).  With ``TF_CPP_MIN_LOG_LEVEL=0`` set by the user nothing is hidden.  Does nothing
    but describe the device if TensorFlow is already imported.

    Returns
    -------
    str
        One line naming the training device: ``"training on CPU: no GPU found"`` or
        ``"training on GPU: <name>"`` (several GPUs are counted).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    hide = os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"
    capture = NativeStderr()
    if "tensorflow" in sys.modules or not hide:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    else:
        try:
            with capture:
                import keras  # noqa: F401  (its import reads the backend's devices too)
                import tensorflow as tf

                gpus = tf.config.list_physical_devices("GPU")
        finally:
            for line in capture.text.splitlines():
                if line.strip() and not _TF_NOISE.match(line):
                    print(line, file=sys.stderr)
    if not gpus:
        return "training on CPU: no GPU found"
    try:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    except (ValueError, RuntimeError):  # pragma: no cover - depends on the driver
        name = gpus[0].name
    more = f" (and {len(gpus) - 1} more)" if len(gpus) > 1 else ""
    return f"training on GPU: {name}{more}"
