"""Resilient change tracking: ``vmbak track``, a tracking NBD front for a raw disk file.

* ``vmbak.tracker.client``: TrackerClient / Checkpoint, the API the backup engine calls.
* ``vmbak.tracker.daemon``: start and stop the server (nbdkit + ``plugin.py``).
* ``vmbak.tracker.core``: the engine inside the server: bitmaps, .rct/.mrt, checkpoints.
* ``vmbak.tracker.formats``: byte layouts of the .rct and .mrt files.

See docs/tracker.md.
"""
