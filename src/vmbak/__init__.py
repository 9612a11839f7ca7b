"""vmbak: block-level backup for virtual-machine disks.

Embedding example::

    import vmbak
    repo = vmbak.Repository.init("/backups/repo", password="secret")   # or Repository.open(...)
    snap = vmbak.backup(repo, "/var/lib/images/web.raw", name="web")  # full, then incremental
    vmbak.restore(repo, "web:latest", "/tmp/web-restored.raw")
    assert vmbak.check(repo, read_data=True).ok
"""

from vmbak.api import backup, check, open_disk, restore
from vmbak.errors import VmbakError
from vmbak.repo.manifest import Manifest
from vmbak.repo.repository import Repository

__version__ = "0.1.0"
__all__ = ["Repository", "Manifest", "VmbakError", "backup", "restore", "check", "open_disk", "__version__"]
