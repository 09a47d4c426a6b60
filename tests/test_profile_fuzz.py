"""Whatever a profile holds, reading it ends in a Plan or a ProfileError with well-formed lines, never a crash."""

import string

import toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jailer import profile as profile_module
from jailer.errors import ProfileError
from jailer.plan import Plan

SECTIONS = {
    "program": profile_module.PROGRAM_KEYS, "namespaces": profile_module.NAMESPACE_KEYS,
    "identity": profile_module.IDENTITY_KEYS, "filesystem": profile_module.FILESYSTEM_KEYS,
    "landlock": ("enabled",), "seccomp": profile_module.SECCOMP_KEYS, "limits": profile_module.LIMIT_KEYS,
    "network": profile_module.NETWORK_KEYS, "environment": profile_module.ENVIRONMENT_KEYS,
    "enforcement": profile_module.ENFORCEMENT_KEYS,
}
NESTED = {"bind": profile_module.BIND_KEYS, "tmpfs": profile_module.TMPFS_KEYS,
          "symlink": profile_module.SYMLINK_KEYS, "rule": profile_module.RULE_KEYS,
          "args": profile_module.ARG_KEYS, "cgroup": profile_module.CGROUP_KEYS, "cpu": profile_module.CPU_KEYS,
          "set": ("TERM", "LANG"), "nofile": profile_module.RLIMIT_KEYS}
WORDS = ["/bin/true", "true", "native", "python", "@default", "@python", "read", "execve", "64M", "1G", "50%",
         "unlimited", "EPERM", "eq", "masked_eq", "errno", "kill", "allow", "reaper", "veth", "loopback",
         "10.0.0.1/30", "/tmp", "/dev/null", "{fd:x}", "x", "memfd", "file", "unix-listener", "cgroup", "755", ""]

scalars = st.one_of(st.booleans(), st.integers(min_value=-2**64, max_value=2**64), st.sampled_from(WORDS),
                    st.text(string.printable, max_size=8), st.floats(allow_nan=False, allow_infinity=False))


def table(keys):
    """A table using mostly known keys (so validation goes deep) and sometimes unknown ones."""
    key = st.one_of(st.sampled_from(list(keys)), st.sampled_from(list(NESTED)), st.text(string.ascii_lowercase,
                                                                                         min_size=1, max_size=6))
    return st.dictionaries(key, st.deferred(lambda: value(keys)), max_size=5)


def value(keys):
    nested = st.sampled_from(list(NESTED)).flatmap(lambda name: table(NESTED[name]))
    return st.one_of(scalars, st.lists(scalars, max_size=4), st.lists(nested, max_size=3), nested)


profiles = st.fixed_dictionaries({}, optional={
    **{name: table(keys) for name, keys in SECTIONS.items()},
    "fds": st.lists(table(profile_module.FD_KEYS), max_size=3),
    "name": scalars, "die_with_parent": scalars,
})


def outcome(path):
    try:
        return profile_module.build_plan(str(path), euid=0, environ={"TERM": "xterm"})
    except ProfileError as exc:
        assert exc.problems and all(line.startswith(f"{path}") for line in exc.problems)
        return exc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=profiles)
def test_any_profile_structure_gives_a_plan_or_problem_lines(tmp_path, data):
    path = tmp_path / "fuzz.toml"
    try:
        text = toml.dumps(data)
    except Exception:
        return  # not representable in TOML: nothing a user could write
    path.write_text(text)
    result = outcome(path)
    assert isinstance(result, (Plan, ProfileError))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(string.printable, max_size=120))
def test_any_text_gives_a_plan_or_problem_lines(tmp_path, text):
    path = tmp_path / "text.toml"
    path.write_text("[program]\nargv = [\"/bin/true\"]\n" + text)
    assert isinstance(outcome(path), (Plan, ProfileError))
