"""vfio-user device emulators bundled with jailer."""
