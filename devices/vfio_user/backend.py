"""The vfio-user backend program conventions, shared by every bundled device program.

    run_backend(make_device, argv=None, *, description, device_type,
                extra_options=None, setup=None, features=()) -> never returns (sys.exit)

Command line it implements:
    --socket-path=PATH        create, bind and listen on PATH (stale socket replaced,
                              removed again on exit)
    --fd=N                    use inherited fd N: a listening socket, or one connected
                              socket (served until the client disconnects)
    --print-capabilities      print {"type": device_type, "features": [...]} and exit 0
    -v/--verbose              debug logging (logs go to stderr; never daemonizes)
Neither --socket-path nor --fd: socket activation (LISTEN_PID == getpid(), LISTEN_FDS >= 1,
first fd 3). SIGTERM/SIGINT end the loop (it wakes through signal.set_wakeup_fd) and the
program exits 0. Usage errors exit 2, runtime errors exit 1, each with one line on stderr.

Hooks for a device program:
    extra_options(parser)            add device options to the argparse parser,
                                     e.g. parser.add_argument("--control-socket")
    make_device(options) -> Device   build the model from the parsed argparse.Namespace
    setup(server, device, options)   after the Server exists, before serving: register
                                     readers/timers (server.add_reader, call_later); may
                                     return a callable run once after the loop ends
    features                         extra strings for --print-capabilities
"""
