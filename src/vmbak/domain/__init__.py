"""A libvirt domain beyond its disks: the files its definition names (UEFI NVRAM, swtpm
state, direct-boot kernel, initrd and device tree, firmware), what vmbak can and cannot
read of its disks, and the definition rewritten for a restored copy that shares no file
with the original. See docs/hypervisor.md, "Complete VM state"."""
