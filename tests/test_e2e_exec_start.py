"""Every end-to-end test of the jailed device again, with the shipped profile's program
exec'd (program.start = "exec") instead of started zero-exec (jailer.zero_exec), as it ships."""

import pytest

import test_e2e_jailed_device as e2e
from test_e2e_jailed_device import *  # noqa: F401,F403  (the tests and their fixtures)


@pytest.fixture(autouse=True)
def exec_start():
    e2e.START["mode"] = "exec"
    yield
    e2e.START["mode"] = None
