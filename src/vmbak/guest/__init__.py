"""What talks to a running guest: qemu-guest-agent (freeze, thaw) and the hook scripts
that run around a backup's point in time. See docs/hypervisor.md, "Guest consistency"."""
