"""The `jailer` command.

`jailer run` is dispatched before anything heavy is imported: it is the start-up hot
path (see benchmarks/), so it parses its own arguments in jailer.run_cli. Every other
subcommand is a click command imported only when it is named.
"""

import sys

# subcommand -> "module:attribute" of a click.Command, imported on demand.
SUBCOMMANDS = {
    "show": ("jailer.inspect:show_command", "Print the sandbox plan a profile resolves to."),
    "check": ("jailer.hostcheck:check_command", "Validate a profile and report what this host can enforce."),
    "probe": ("jailer.commands.probe:probe_command", "Print what a vfio-user device offers."),
    "learn": ("jailer.learn:learn_command",
              "Record the syscalls a device makes under an exerciser and write the minimal allowlist."),
    "selftest": ("jailer.selftest:selftest_command", "Run the escape probes inside a profile's sandbox and print a verdict."),
    "systemd": ("jailer.systemd:systemd_command",
                "Write systemd units (service, socket or drop-in) that run a profile under jailer run."),
    "descriptors": ("jailer.descriptors:descriptors_command", "List the vfio-user backend descriptors in effect."),
    "init": ("jailer.commands.init:init_command", "Write a starting profile for a device program."),
    "clean": ("jailer.commands.clean:clean_command", "Remove what launchers killed with SIGKILL left behind."),
}


class _SitePackagesOnDemand:
    """Started with -S (see setup.sh), the venv's site-packages are not on sys.path: the
    run hot path needs only the standard library. The first top-level import that nothing
    else can find adds them (site.main()) and is retried."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is not None:
            return None
        sys.meta_path.remove(cls)
        import importlib.util
        import site

        site.main()
        return importlib.util.find_spec(name)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.flags.no_site and _SitePackagesOnDemand not in sys.meta_path:
        sys.meta_path.append(_SitePackagesOnDemand)
    from jailer.errors import JailerError

    try:
        if argv and argv[0] == "run":
            from jailer.run_cli import main as run_main

            return sys.exit(run_main(argv[1:]))
        return _click_main(argv)
    except JailerError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"jailer: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def _click_main(argv):
    import importlib

    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx):
            return ["run", *sorted(SUBCOMMANDS)]

        def format_commands(self, ctx, formatter):
            rows = [("run", "Run a program inside the sandbox a profile describes.")]
            rows += [(name, SUBCOMMANDS[name][1]) for name in sorted(SUBCOMMANDS)]
            with formatter.section("Commands"):
                formatter.write_dl(rows)

        def get_command(self, ctx, name):
            if name == "run":
                return click.Command("run", help="Run a program inside the sandbox a profile describes "
                                     "(see `jailer run --help`).")
            if name not in SUBCOMMANDS:
                return None
            module, attr = SUBCOMMANDS[name][0].split(":")
            return getattr(importlib.import_module(module), attr)

    group = LazyGroup(name="jailer", help="Run vfio-user device emulators inside a Linux sandbox.")
    group = click.version_option(package_name="jailer")(group)
    return group.main(args=argv, prog_name="jailer", standalone_mode=True)


if __name__ == "__main__":
    main()
