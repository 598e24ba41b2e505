"""Where a remote store lives: URL parsing, storage options (and their redaction), one fsspec
file system per process, concurrent fetches and uploads, and one-line errors.

Any URL with a scheme (``s3://``, ``gs://``, ``az://``, ``file://``, ...) goes through fsspec;
``s3://`` needs s3fs (``pip install streamseg[cloud]``).  Credentials come from where the file
system's own library looks for them (for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws/credentials``, instance roles; ``AWS_ENDPOINT_URL`` for an S3-compatible
server) or from ``storage_options``.  Values of storage options that are not known to be
harmless (``endpoint_url``, ``region_name``, ``anon``, ...) never appear in a message or repr.

The file system is created per process (``skip_instance_cache=True``, checked against the pid):
fsspec's asynchronous file systems refuse to run in a process forked from the one that made
them, and a worker forked from a parent that already read the store must make its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import OptionError, RemoteStoreError, StoreNotFoundError, StreamsegError, truncate

__all__ = ["RemoteLocation", "RemoteStoreError", "is_url", "parse_storage_options", "redact_options", "scrub",
           "MAX_CONNECTIONS"]

#: Requests in flight at once per process (botocore's pool is raised to match).
MAX_CONNECTIONS = 32
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+://)[^/@\s]+@")
#: Storage options (at any depth) whose values are shown; every other value is a possible secret.
HARMLESS = frozenset({
    "endpoint_url", "region_name", "region", "anon", "use_ssl", "verify", "requester_pays", "version_aware",
    "default_block_size", "default_fill_cache", "default_cache_type", "cache_regions", "max_concurrency",
    "fixed_upload_size", "client_kwargs", "config_kwargs", "max_pool_connections", "connect_timeout",
    "read_timeout", "retries", "max_attempts", "mode", "signature_version", "s3", "addressing_style",
    "auto_mkdir", "profile", "project", "account_name", "use_listings_cache", "listings_expiry_time",
    "skip_instance_cache", "proxies", "user_agent", "use_fips_endpoint", "use_dualstack_endpoint",
})
#: Environment variables holding secrets, scrubbed from messages as well.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
               "AZURE_CLIENT_SECRET")
_ACCESS_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                  "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                  "ClientAuthenticationError", "DefaultCredentialsError", "RefreshError"}


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL with a scheme (``s3://...``); a ``pathlib.Path`` never is."""
    return isinstance(path, str) and _URL.match(path) is not None


def _secret_values(options: Any) -> list[str]:
    found: list[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or str(k) not in HARMLESS)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v, secret)
        elif secret and value is not None and not isinstance(value, bool):
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if len(text) >= 4:
                found.append(text)

    walk(options or {}, False)
    found += [os.environ[name] for name in _SECRET_ENV if len(os.environ.get(name, "")) >= 4]
    return sorted(set(found), key=len, reverse=True)


def redact_options(options: Any) -> Any:
    """``options`` with every value that is not known to be harmless replaced by ``'***'``."""
    if isinstance(options, dict):
        return {k: (redact_options(v) if str(k) in HARMLESS else "***") for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(redact_options(v) for v in options)
    return options


def scrub(text: str, options: Any = None) -> str:
    """``text`` without the secrets of ``options`` (nor the user part of URLs), on one line."""
    for secret in _secret_values(options):
        text = text.replace(secret, "***")
    text = _USERINFO.sub(r"\1***@", text)
    return " ".join(text.split())


def _parse_value(key: str, raw: str) -> Any:
    if key.split(".")[-1] not in HARMLESS:
        return raw  # a secret stays the string it was given
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``["endpoint_url=http://...", "config_kwargs.max_pool_connections=64"]`` as a dict.

    Values are JSON where they parse as JSON (``anon=true``, ``retries=3``,
    ``config_kwargs={"connect_timeout": 5}``), otherwise strings; a dotted key nests.  Values of
    options not known to be harmless (keys, secrets, tokens) are always kept as strings.
    """
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            if sep:
                shown = f"={'***' if raw else ''}"
            else:  # no '=': the whole text may be a secret
                shown = pair if pair.strip().split(".")[-1] in HARMLESS else f"{len(pair)} characters, hidden"
            raise OptionError(f"--storage-option takes KEY=VALUE (e.g. endpoint_url=http://localhost:9000). "
                              f"Received: {truncate(shown)}")
        key = key.strip()
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise OptionError(f"--storage-option {key} nests under an option that is not a mapping. "
                                  f"Received: {truncate(key)}")
        node[leaf] = _parse_value(key, raw)
    return out


class _ProcState:
    """What one process holds: its file system and, for synchronous ones, a thread pool."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()


class RemoteLocation:
    """A store's URL with its storage options; hands out this process's fsspec file system.

    Parameters
    ----------
    url : str
        ``scheme://bucket/path``.
    storage_options : dict, optional
        Keyword arguments of the fsspec file system (for S3: ``endpoint_url``, ``key``,
        ``secret``, ``anon``, ``client_kwargs``, ``config_kwargs``, ...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not is_url(url):
            raise OptionError(f"Expected a URL such as s3://bucket/data.zarr. Received: {truncate(scrub(str(url)))}")
        if storage_options is not None and (not isinstance(storage_options, dict)
                                            or not all(isinstance(k, str) for k in storage_options)):
            raise OptionError("storage_options must be a dict of option names to values. "
                              f"Received: {truncate(redact_options(storage_options))}")
        import fsspec

        self.url = url.rstrip("/")
        self.protocol = _URL.match(url).group(1).lower()  # type: ignore[union-attr]
        self.options = dict(storage_options or {})
        self.display = scrub(self.url, self.options)
        try:
            self._cls = fsspec.get_filesystem_class(self.protocol)
        except ImportError as exc:
            raise OptionError(f"Cannot open {self.display}: {exc} (streamseg reaches object storage through "
                              "fsspec; `pip install streamseg[cloud]` brings s3fs). "
                              f"Received: {self.protocol}://") from None
        except ValueError:
            raise OptionError(f"Cannot open {self.display}: fsspec knows no protocol {self.protocol!r}; use "
                              f"s3://, gs://, az:// or file://. Received: {self.protocol}://") from None
        self.root = str(self._cls._strip_protocol(self.url)).rstrip("/")
        if not self.root or (self.protocol not in ("file", "local") and "/" not in self.root.strip("/")):
            raise OptionError(f"A store URL names a bucket and a path inside it, e.g. {self.protocol}://bucket/"
                              f"data.zarr. Received: {self.display}")
        self._procs: dict[int, _ProcState] = {}
        self._inherited: list[_ProcState] = []  # a parent's file systems, never finalized in a child

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["options"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"RemoteLocation({self.display!r}, storage_options={redact_options(self.options)!r})"

    @property
    def name(self) -> str:
        """Last part of the path (``data.zarr``)."""
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def shown_options(self) -> str:
        """``", storage_options={...}"`` with secrets redacted, or nothing, for ``Received:`` tails."""
        return f", storage_options={redact_options(self.options)}" if self.options else ""

    def _kwargs(self) -> dict[str, Any]:
        kw = dict(self.options)
        if self.protocol in ("s3", "s3a"):
            ck = dict(kw.get("config_kwargs") or {})
            ck.setdefault("max_pool_connections", 2 * MAX_CONNECTIONS)
            ck.setdefault("connect_timeout", 10)
            ck.setdefault("read_timeout", 60)
            kw["config_kwargs"] = ck
            kw.setdefault("max_concurrency", 16)
        if self.protocol in ("file", "local"):
            kw.setdefault("auto_mkdir", True)
        kw["skip_instance_cache"] = True
        return kw

    def _state(self) -> _ProcState:
        pid = os.getpid()
        state = self._procs.get(pid)
        if state is None:
            for other in [p for p in self._procs if p != pid]:
                self._inherited.append(self._procs.pop(other))
            try:
                fs = self._cls(**self._kwargs())
            except (TypeError, ValueError) as exc:
                raise OptionError(f"Storage options rejected by {self._cls.__name__} for {self.display}: "
                                  f"{scrub(str(exc), self.options)}. Received: {redact_options(self.options)}") from None
            state = self._procs.setdefault(pid, _ProcState(fs))
        return state

    @property
    def fs(self) -> Any:
        """This process's file system (made on first use in each process)."""
        return self._state().fs

    def path(self, rel: str) -> str:
        """The file system path of ``rel`` inside the store."""
        return f"{self.root}/{rel}"

    def url_of(self, rel: str) -> str:
        """The URL of ``rel`` inside the store, for messages."""
        return f"{self.display}/{rel}"

    # ------------------------------------------------------------------ transfers
    def _run(self, calls: list[tuple[str, tuple]]) -> list[Any]:
        """Run ``fs.<method>(*args)`` for each call concurrently; results or exceptions, in order."""
        if not calls:
            return []
        state = self._state()
        fs = state.fs
        if getattr(fs, "async_impl", False):
            from fsspec.asyn import sync

            async def gather() -> list[Any]:
                gate = asyncio.Semaphore(MAX_CONNECTIONS)

                async def one(method: str, args: tuple) -> Any:
                    async with gate:
                        return await getattr(fs, "_" + method)(*args)

                return await asyncio.gather(*(one(m, a) for m, a in calls), return_exceptions=True)

            return sync(fs.loop, gather)
        with state.lock:
            if state.pool is None:
                state.pool = ThreadPoolExecutor(max_workers=min(16, MAX_CONNECTIONS), thread_name_prefix="streamseg-io")
        pool = state.pool

        def one_sync(call: tuple[str, tuple]) -> Any:
            try:
                return getattr(fs, call[0])(*call[1])
            except Exception as exc:  # noqa: BLE001 - returned like asyncio.gather does
                return exc

        return list(pool.map(one_sync, calls))

    def cat_many(self, rels: list[str]) -> dict[str, Any]:
        """The bytes of each file ``rels`` (relative to the store), fetched concurrently; a file
        that failed maps to its exception."""
        got = self._run([("cat_file", (self.path(r),)) for r in rels])
        return dict(zip(rels, got))

    def put_many(self, pairs: list[tuple[Path, str]]) -> list[tuple[str, BaseException]]:
        """Upload each local file to its relative path concurrently; the failures."""
        got = self._run([("put_file", (str(local), self.path(rel))) for local, rel in pairs])
        return [(rel, res) for (_, rel), res in zip(pairs, got) if isinstance(res, BaseException)]

    def pipe(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` (raises the file system's own error)."""
        self.fs.pipe_file(self.path(rel), data)

    def sizes(self) -> dict[str, int]:
        """``{relative path: size}`` of every file under the store (empty when nothing is there)."""
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        out = {}
        for path, info in found.items():
            path = str(path)
            if info.get("type", "file") == "file" and path.startswith(prefix):
                out[path[len(prefix):]] = int(info.get("size") or 0)
        return out

    def remove(self, rels: list[str]) -> None:
        """Delete files (missing ones are fine)."""
        if rels:
            try:
                self.fs.rm([self.path(r) for r in rels])
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ errors
    def error(self, exc: BaseException, doing: str) -> StreamsegError:
        """A one-line StreamsegError for ``exc``, raised while ``doing`` (``"read"``, ...)."""
        if isinstance(exc, StreamsegError):
            return exc
        name = type(exc).__name__
        detail = scrub(f"{name}: {exc}" if str(exc) else name, self.options)[:300]
        tail = f" Received: {self.display}{self.shown_options()}"
        response = getattr(exc, "response", None)
        code = str((response.get("Error") or {}).get("Code", "")) if isinstance(response, dict) else ""
        if isinstance(exc, TypeError) and "keyword" in str(exc):  # an option the client does not take
            return OptionError(f"Storage options rejected for {self.display}: {detail}. Received: "
                               f"{redact_options(self.options)}")
        if isinstance(exc, PermissionError) or name in _ACCESS_ERRORS or code in _ACCESS_ERRORS:
            return RemoteStoreError(
                f"Access to {self.display} was refused while trying to {doing} it ({detail}): check the "
                "credentials (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials; anon=true for a public bucket)." + tail)
        if isinstance(exc, FileNotFoundError) and doing.startswith("upload"):
            return RemoteStoreError(
                f"Cannot upload to {self.display}: the bucket does not exist ({detail}). Create the bucket "
                "first, or check the URL." + tail)
        if isinstance(exc, FileNotFoundError):
            return StoreNotFoundError(
                f"No store at {self.display}: the bucket or the path does not exist ({detail}). Check the "
                f"URL, or create one with `streamseg convert SRC {self.display}`." + tail)
        endpoint = self.options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        where = f" (endpoint {endpoint})" if endpoint and self.protocol in ("s3", "s3a") else ""
        return RemoteStoreError(
            f"Could not {doing} {self.display}{where}: {detail}. Check the URL, the endpoint "
            "(endpoint_url), the network and the credentials." + tail)
