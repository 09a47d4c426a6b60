"""Virtio 1.x over PCI for vfio-user device models: split virtqueues and the modern transport."""
