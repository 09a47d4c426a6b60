"""jailer: run out-of-process vfio-user device emulators inside a provable Linux sandbox."""

__version__ = "0.1.0"
