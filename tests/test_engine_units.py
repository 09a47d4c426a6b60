"""The engine's pure parts: argument parsing, the plan cache, the status encoder, fd helpers."""

import json
import os
import stat
import sys

import pytest

from jailer import run_cli
from jailer.errors import UsageError
from jailer.layers.fds import expand_argv, listen_environment
from jailer.status import encode_json


def test_parse_accepts_every_option_form():
    read_end, write_end = os.pipe()
    try:
        args = run_cli.parse(["--fd", f"ctl={read_end}", f"--fd={write_end}", "--socket-path", "rel.sock",
                              f"--status-fd={write_end}", "--no-cache", "p.toml", "--", "-v", "x"])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert args.profile == "p.toml"
    assert args.given_fds == {"ctl": read_end, None: write_end}
    assert args.socket_path == os.path.abspath("rel.sock")
    assert args.status_fd == write_end and not args.use_cache
    assert args.extra_args == ["-v", "x"]


@pytest.mark.parametrize("argv, message", [
    ([], "missing PROFILE"),
    (["--fd"], "--fd needs a value"),
    (["--fd", "ctl=x", "p"], "'x' is not a file descriptor number"),
    (["--fd", "ctl=987", "p"], "fd 987 is not open"),
    (["--bogus", "p"], "unknown option '--bogus'"),
    (["p", "q"], "program arguments go after '--'"),
])
def test_parse_refuses_bad_command_lines(argv, message):
    with pytest.raises(UsageError, match=message):
        run_cli.parse(argv)


def test_help_prints_usage(capsys):
    assert run_cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: jailer run")


def test_cache_entry_is_used_only_for_its_key_and_only_when_private(tmp_path):
    directory = str(tmp_path / "cache")
    profile = tmp_path / "p.toml"
    profile.write_text("name = 'p'\n")
    key = run_cli._cache_key(str(profile))
    file = run_cli._cache_file(directory, str(profile))
    run_cli._write_cache(directory, file, {"key": key, "plan": {"x": 1}, "bpf": b"\0" * 8, "names": None})
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert run_cli._read_cache(file, key)["bpf"] == b"\0" * 8
    profile.write_text("name = 'changed'\n")
    assert run_cli._read_cache(file, run_cli._cache_key(str(profile))) is None
    os.chmod(file, 0o644)
    assert run_cli._read_cache(file, key) is None
    with open(file, "wb") as f:
        f.write(b"garbage")
    os.chmod(file, 0o600)
    assert run_cli._read_cache(file, key) is None

    gone = tmp_path / "gone.toml"   # an entry whose profile was deleted is pruned on the next write
    gone.write_text("name = 'gone'\n")
    gone_file = run_cli._cache_file(directory, str(gone))
    run_cli._write_cache(directory, gone_file, {"key": run_cli._cache_key(str(gone)), "plan": {}, "bpf": None,
                                                "names": None})
    for modules in (gone_file, os.path.join(directory, "0000abcd-orphan.toml.plan")):   # (a module cache beside
        run_cli.write_cache_file(directory, modules[:-len(".plan")] + ".modules", b"x")  # it, or alone, goes too)
    gone.unlink()
    run_cli._write_cache(directory, file, {"key": key, "plan": {"x": 1}, "bpf": None, "names": None})
    assert sorted(os.listdir(directory)) == [os.path.basename(file)]


def test_status_encoder_writes_json():
    value = {"event": "x", "text": 'quote " back \\ nl \n tab \t \x01 é', "n": -3, "ok": True, "none": None,
             "list": [1, "a", {"b": False}]}
    assert json.loads(encode_json(value)) == value


def test_listen_variables_only_for_fds_from_three_up():
    assert listen_environment({"b": 4, "a": 3}) == {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert listen_environment({"a": 5}) == {}
    assert listen_environment({}) == {}


def test_fd_placeholders_expand_and_unknown_ones_are_refused():
    assert expand_argv(["prog", "--fd={fd:vfio}", "{fd:irq}"], {"vfio": 3, "irq": 4}) == ["prog", "--fd=3", "4"]
    with pytest.raises(UsageError, match="names an fd that was not provided"):
        expand_argv(["{fd:missing}"], {})


def test_run_imports_stay_off_the_hot_path():
    import subprocess

    code = ("import sys, jailer.run_cli, jailer.launch.launcher; "
            "print(sorted(m for m in ('click', 'toml', 'pyseccomp', 'pyroute2', 'json') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
