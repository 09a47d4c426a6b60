"""The vfio-user server: one device, one client at a time, a single-threaded epoll loop.

API used by device programs (see also devices.vfio_user.backend):

    server = Server(device, sock)      # sock: a listening AF_UNIX socket (clients are
                                       # accepted one after another) or an already
                                       # connected one (served until it disconnects)
    server.add_reader(fd, callback)    # callback() runs in the loop when fd is readable
    server.remove_reader(fd)           # (e.g. a device's control socket and its clients)
    handle = server.call_later(delay, callback)   # one-shot timer; handle.cancel()
    server.serve_forever()             # returns after stop(), or when a connected-socket
                                       # client goes away
    server.stop()                      # from a callback or a signal handler

The device sees the server only through DeviceHost (device.attach(host) while a client is
connected, device.attach(None) between clients): set_intx(level), signal_irq(index,
vector), dma_read(iova, length), dma_write(iova, data). Device state survives client
reconnections; DMA mappings and interrupt eventfds do not.
"""
