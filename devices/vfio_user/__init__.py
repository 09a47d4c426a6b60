"""A vfio-user protocol library: sans-I/O codec and state machine, socket transport, server and client."""
