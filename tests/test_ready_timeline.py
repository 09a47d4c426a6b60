"""benchmarks/ready_timeline.py's reading of a kernel trace (lines as tracefs writes them), and
device_ready.py's paired ratios."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from device_ready import paired_ratio  # noqa: E402
from ready_timeline import timeline  # noqa: E402

JAILER_TRACE = """\
# tracer: nop
         python3-100     [001] ...1.  1000.000000: tracing_mark_write: spawn
          jailer-200     [000] .....  1000.001000: sched_process_exec: filename=/r/.venv/bin/jailer pid=200 old_pid=200
          jailer-200     [001] .....  1000.026000: sched_process_fork: comm=jailer pid=200 child_comm=jailer child_pid=201
          python-201     [000] .....  1000.039000: sched_process_exec: filename=/r/.venv/bin/python pid=201 old_pid=201
  jailer-monitor-200     [001] .....  1000.040500: sched_process_exec: filename=/r/jailer/jailer-monitor pid=200 old_pid=200
         python3-100     [001] .....  1000.050000: sys_accept4(fd: 3, upeer_sockaddr: 0x1, upeer_addrlen: 0x2, flags: 0x80000)
          python-201     [000] .....  1000.130000: sys_accept4(fd: 3, upeer_sockaddr: 0x1, upeer_addrlen: 0x2, flags: 0x80000)
"""

BARE_TRACE = """\
         python3-100     [001] ...1.  2000.000000: tracing_mark_write: spawn
         python3-300     [000] .....  2000.001000: sched_process_exec: filename=/usr/bin/python3 pid=300 old_pid=300
         python3-300     [000] .....  2000.090000: sys_accept4(fd: 3, upeer_sockaddr: 0x1, upeer_addrlen: 0x2, flags: 0x80000)
"""


def test_jailer_phases():
    phases = timeline(JAILER_TRACE, 200)
    assert phases == pytest.approx({"launch": 26.0, "preload": None, "set-up": 13.0, "device": 91.0, "stall": 1.5})


ZERO_TRACE = """\
         python3-100     [001] ...1.  3000.000000: tracing_mark_write: spawn
          jailer-400     [000] .....  3000.001000: sched_process_exec: filename=/r/.venv/bin/jailer pid=400 old_pid=400
          jailer-400     [001] .....  3000.017000: sched_process_fork: comm=jailer pid=400 child_comm=jailer child_pid=401
          jailer-400     [001] .....  3000.035000: sched_process_fork: comm=jailer pid=400 child_comm=jailer child_pid=499
          jailer-499     [000] .....  3000.036000: sys_unshare(unshare_flags: 0x20000)
          jailer-401     [000] .....  3000.070000: sys_unshare(unshare_flags: 0x6c020000)
          jailer-401     [000] .....  3000.071000: sys_unshare(unshare_flags: 0x20000)
          jailer-401     [000] .....  3000.078000: task_rename: pid=401 oldcomm=jailer newcomm=python oom_score_adj=0
  jailer-monitor-400     [001] .....  3000.081000: sched_process_exec: filename=/r/jailer/jailer-monitor pid=400 old_pid=400
          python-401     [000] .....  3000.108000: sys_accept4(fd: 3, upeer_sockaddr: 0x1, upeer_addrlen: 0x2, flags: 0x80000)
"""


def test_zero_exec_phases_split_the_preloader_from_the_set_up():
    """The launcher's first fork is the preloader (401), which becomes the device; its first
    unshare starts the set-up. Another fork of the launcher's own (499) is not the sandbox's."""
    phases = timeline(ZERO_TRACE, 400, preloads=True)
    assert phases == pytest.approx({"launch": 17.0, "preload": 53.0, "set-up": 8.0, "device": 30.0, "stall": 3.0})


def test_bare_device_is_its_own_launcher():
    phases = timeline(BARE_TRACE, 300)
    assert phases["launch"] == pytest.approx(1.0) and phases["set-up"] == 0
    assert phases["device"] == pytest.approx(89.0) and phases["stall"] is None


def test_paired_ratios_cancel_the_drift_between_rounds():
    """The machine slows down threefold over the rounds, both variants with it: the ratio of
    the medians still reads 1.25, and the per-round ratios all do, so the interval is tight."""
    bwrap = [80.0 * (1 + i / 10) for i in range(21)]
    zero = [1.25 * b for b in bwrap]
    assert paired_ratio(zero, bwrap) == pytest.approx((1.25, 1.25, 1.25))
    noisy = [z * (1.1 if i % 2 else 0.95) for i, z in enumerate(zero)]
    middle, low, high = paired_ratio(noisy, bwrap)
    assert low <= middle <= high and low >= 1.25 * 0.95 - 1e-9 and high <= 1.25 * 1.1 + 1e-9
    assert paired_ratio(noisy, bwrap) == (middle, low, high)    # the same samples, the same interval
