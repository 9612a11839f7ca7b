"""Raw disks: regular files and block devices."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

from vmbak.errors import DiskError

_BLKGETSIZE64 = 0x80081272


# What a file that is not a disk is, in words (by stat.S_IFMT).
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFLNK: "a symbolic link"}


def check_disk_path(path: str | os.PathLike[str]) -> os.stat_result:
    """``stat`` a disk to read (following symbolic links) without opening it; a DiskError
    naming the path and what it is unless it is a regular file or a block device.

    Nothing is opened, so a FIFO or a socket can never make a reader (or ``qemu-img``)
    wait forever for a writer.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DiskError(f"disk not found: {path}") from None
    except OSError as e:
        raise DiskError(f"cannot use disk {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise DiskError(f"{path} is {what}, not a disk image or block device")
    return st


def _device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


class RawDisk:
    """A raw image file or block device, read with ``os.pread`` (thread-safe, releases the GIL)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        check_disk_path(self.path)
        try:
            # O_NONBLOCK: should the path become a FIFO after the check, open does not wait.
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise DiskError(f"disk not found: {self.path}") from None
        except IsADirectoryError:
            raise DiskError(f"disk is a directory, not a disk image: {self.path}") from None
        except OSError as e:
            raise DiskError(f"cannot open disk {self.path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise DiskError(f"{self.path} is {what}, not a disk image or block device")
        os.set_blocking(self.fd, True)
        self.size = _device_size(self.fd)
        self.is_file = stat.S_ISREG(st.st_mode)
        self.description = self.path
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass

    def source_state(self) -> tuple | None:
        """What changes whenever the file is written: its inode, size, modification and
        change times. None for a block device, whose writes leave no trace in its metadata.
        (A reader with this method reads a live disk directly, with no point-in-time view:
        the backup compares the state before and after reading.)"""
        if not self.is_file:
            return None
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise DiskError(f"read error on {self.path} at offset {offset}: {e.strerror}") from None

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Read up to ``len(buf)`` bytes at ``offset`` into ``buf``; return how many (fewer
        only at the end of the disk). The backup reads into a buffer it keeps per thread."""
        done = 0
        try:
            while done < len(buf):
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:
                    break
                done += n
        except OSError as e:
            raise DiskError(f"read error on {self.path} at offset {offset + done}: {e.strerror}") from None
        return done

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Data ranges from SEEK_DATA/SEEK_HOLE (files); the whole range for devices."""
        end = self.size if end is None else min(end, self.size)
        if not self.is_file:
            if end > start:
                yield (start, end - start)
            return
        yield from file_data_extents(self.fd, start, end)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) ranges of a regular file that may hold data, via SEEK_DATA/SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no more data
                return
            yield (pos, end - pos)  # no SEEK_DATA support: all data
            return
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            hole = end
        hole = min(hole, end)
        yield (data, hole - data)
        pos = hole
