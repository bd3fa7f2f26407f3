"""Download MovieLens from GroupLens, verify its checksum, extract it atomically.

The URLs are GroupLens' own (https://files.grouplens.org/datasets/movielens/); the MD5 sums
are the ones GroupLens publishes beside each archive (``<name>.zip.md5``). Nothing is left
behind on failure: the archive is written to a temporary file, verified, extracted into a
temporary folder, and only then renamed into place. MovieLens is for research use with
acknowledgement (see each archive's README); it is downloaded, never bundled.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, Optional

__all__ = ["DATASETS", "DownloadError", "download_dataset"]

_BASE = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class RemoteDataset:
    name: str          # what the user types: movielens-1m
    folder: str        # the folder inside the archive: ml-1m
    url: str
    md5: str
    rating_file: str   # the file the loader reads, checked after extraction
    size_mb: int


DATASETS: Dict[str, RemoteDataset] = {
    d.name: d
    for d in (
        RemoteDataset("movielens-100k", "ml-100k", _BASE + "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "u.data", 5),
        RemoteDataset("movielens-1m", "ml-1m", _BASE + "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ratings.dat", 6),
        RemoteDataset("movielens-20m", "ml-20m", _BASE + "ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "ratings.csv", 190),
        RemoteDataset("movielens-25m", "ml-25m", _BASE + "ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "ratings.csv", 250),
    )
}


class DownloadError(RuntimeError):
    """The data could not be fetched or did not verify; the message says what to do."""


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress_printer(total: Optional[int]) -> Callable[[int], None]:
    def show(done: int) -> None:
        if not sys.stderr.isatty():
            return
        if total:
            sys.stderr.write(f"\r  {done / 1e6:7.1f} / {total / 1e6:.1f} MB")
        else:
            sys.stderr.write(f"\r  {done / 1e6:7.1f} MB")
        sys.stderr.flush()

    return show


def download_dataset(name: str, dest_dir: str, force: bool = False, timeout_s: float = 30.0,
             opener: Callable[..., object] = urllib.request.urlopen) -> str:
    """Fetch dataset ``name`` (a key of :data:`DATASETS`) into ``dest_dir``; return its folder.

    An existing, complete folder is reused unless ``force``. Raises :class:`DownloadError` when
    the machine is offline, the server fails, or the checksum does not match (the archive is
    then discarded). ``opener`` is the URL opener (tests pass a fake one).
    """
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    ds = DATASETS[name]
    dest_dir = os.path.abspath(dest_dir)
    target = os.path.join(dest_dir, ds.folder)
    if os.path.isfile(os.path.join(target, ds.rating_file)) and not force:
        return target
    os.makedirs(dest_dir, exist_ok=True)
    fd, archive = tempfile.mkstemp(prefix=f".{ds.folder}.", suffix=".zip.part", dir=dest_dir)
    tmp_extract = None
    try:
        try:
            response = opener(ds.url, timeout=timeout_s)
        except (urllib.error.URLError, socket.timeout, OSError) as exc:
            raise DownloadError(
                f"could not reach {ds.url} ({getattr(exc, 'reason', exc)}). This machine seems to be offline: "
                f"download {ds.url} on a machine with internet access (MD5 {ds.md5}), unzip it, and pass the "
                f"{ds.folder}/ folder with --data-path (or put it under $GAUSS_DATA)") from None
        total = None
        try:
            total = int(response.headers.get("Content-Length"))  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError):
            pass
        show = _progress_printer(total)
        done = 0
        with os.fdopen(fd, "wb") as out:
            fd = -1
            try:
                while True:
                    chunk = response.read(1 << 20)  # type: ignore[attr-defined]
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    show(done)
            except (urllib.error.URLError, socket.timeout, OSError) as exc:
                raise DownloadError(f"download of {ds.url} broke off after {done} bytes ({exc}); run the command again") from None
            finally:
                close = getattr(response, "close", None)
                if close:
                    close()
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        digest = _md5(archive)
        if digest != ds.md5:
            raise DownloadError(f"{ds.url}: checksum mismatch (MD5 {digest}, expected {ds.md5}); the download is "
                                "corrupt or the file changed upstream. Nothing was kept; run the command again")
        tmp_extract = tempfile.mkdtemp(prefix=f".{ds.folder}.", dir=dest_dir)
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    # Refuse absolute paths and ../ escapes: extraction stays inside the folder.
                    resolved = os.path.realpath(os.path.join(tmp_extract, member))
                    if not resolved.startswith(os.path.realpath(tmp_extract) + os.sep):
                        raise DownloadError(f"{ds.url}: archive member {member!r} escapes the target folder")
                zf.extractall(tmp_extract)
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{ds.url}: not a valid zip archive ({exc})") from None
        extracted = os.path.join(tmp_extract, ds.folder)
        if not os.path.isfile(os.path.join(extracted, ds.rating_file)):
            raise DownloadError(f"{ds.url}: the archive has no {ds.folder}/{ds.rating_file}")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(extracted, target)
        return target
    finally:
        if fd != -1:
            os.close(fd)
        if os.path.exists(archive):
            os.unlink(archive)
        if tmp_extract is not None and os.path.exists(tmp_extract):
            shutil.rmtree(tmp_extract, ignore_errors=True)

