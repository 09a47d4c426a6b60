"""virtio-blk over vfio-user: a disk image served to a guest's own virtio_blk driver."""
