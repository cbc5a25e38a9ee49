"""Listing and reading the files of a source container: a folder, a .zip, or an uncompressed .tar.

A listing is a sorted list of (name, location): `name` is the file's POSIX path inside the container
and `location` how to find its bytes again ((offset, size) in a tar, nothing otherwise). Readers open
their file lazily in each process, so a `Container` can be handed to DataLoader worker processes.
A .tar may hold per-class tars (the official ILSVRC2012_img_train.tar layout: n01440764.tar, ...); their
members are listed as `n01440764/<file>` and read in place, without unpacking.
"""

import os
import tarfile
import zipfile
from pathlib import Path


class SourceError(ValueError):
    """The source cannot be used at all (missing, unreadable, unsupported); the message says why."""


class Container:
    kind = "folder"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None
        self._pid = None

    def listing(self) -> list[tuple[str, tuple]]:
        """Every file once: symlinks are followed (a tree of links to the data works), but a folder or
        file reached again through another link (a link loop, a second link to it) is not listed again."""
        files, seen = [], set()
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
            seen.add(os.path.realpath(dirpath))
            dirnames[:] = sorted(
                d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen
            )
            seen.update(os.path.realpath(os.path.join(dirpath, d)) for d in dirnames)
            rel = Path(dirpath).relative_to(self.path)
            for name in sorted(filenames):
                real = os.path.realpath(os.path.join(dirpath, name))
                if real not in seen:
                    seen.add(real)
                    files.append(((rel / name).as_posix(), ()))
        return sorted(files)

    def read(self, name: str, location: tuple = ()) -> bytes:
        with open(self.path / name, "rb") as f:
            return f.read()

    def _open_handle(self):
        raise NotImplementedError

    def _handle_for_this_process(self):
        # A file handle must not be shared across fork: reopen it in every process that reads.
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open_handle(), os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None}


class ZipContainer(Container):
    kind = "zip"

    def listing(self) -> list[tuple[str, tuple]]:
        with zipfile.ZipFile(self.path) as zf:
            return sorted((info.filename, ()) for info in zf.infolist() if not info.is_dir())

    def _open_handle(self):
        return zipfile.ZipFile(self.path)

    def read(self, name: str, location: tuple = ()) -> bytes:
        return self._handle_for_this_process().read(name)


class TarContainer(Container):
    kind = "tar"

    def listing(self) -> list[tuple[str, tuple]]:
        files = []
        with open(self.path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as outer:
            for member in outer:
                if not member.isfile():
                    continue
                if member.name.endswith(".tar"):
                    files.extend(self._inner_listing(outer, member))
                else:
                    files.append((member.name, (member.offset_data, member.size)))
        return sorted(files)

    @staticmethod
    def _inner_listing(outer: tarfile.TarFile, member: tarfile.TarInfo) -> list[tuple[str, tuple]]:
        prefix = member.name[: -len(".tar")]
        with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
            return [
                (f"{prefix}/{m.name}", (member.offset_data + m.offset_data, m.size))
                for m in inner
                if m.isfile()
            ]

    def _open_handle(self):
        return open(self.path, "rb")

    def read(self, name: str, location: tuple = ()) -> bytes:
        offset, size = location
        handle = self._handle_for_this_process()
        handle.seek(offset)
        return handle.read(size)


def open_container(path: str | os.PathLike) -> Container:
    """The container at `path`; SourceError when it is missing or of an unsupported kind."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if path.is_dir():
        return Container(path)
    if zipfile.is_zipfile(path):
        return ZipContainer(path)
    if tarfile.is_tarfile(path):
        try:
            with tarfile.open(path, mode="r:"):
                pass
        except tarfile.ReadError:
            raise SourceError(
                f"{path} is a compressed tar: images cannot be read in place from it; "
                "decompress it to a plain .tar or unpack it to a folder"
            ) from None
        return TarContainer(path)
    raise SourceError(f"source {path} is neither a folder, a .zip nor a .tar")
