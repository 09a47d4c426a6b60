"""Which calls of a staged syscall reach the launcher: only those a steady rule could change,
when that can be proven, with the kernel doing exactly what the plain rules say for the rest."""

import json
import os
import subprocess
import sys
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_sandbox import plan_for
from jailer.layers import seccomp
from jailer.plan import ArgCondition, SeccompPlan, SeccompRule

PROT_EXEC = 4
EXEC_MAPPING = SeccompRule("mmap", "kill", args=(ArgCondition(2, "masked_eq", PROT_EXEC, PROT_EXEC),))


def matches(rule, args):
    return all(seccomp._condition_holds(rule.syscall, c, args[c.index]) for c in rule.args)


def kernel_side(plan, name, args):
    """'notify', or the action the kernel takes itself, as compile_bpf arranges the rules."""
    if not any(rule.syscall == name for rule in plan.steady):
        return seccomp.decide(plan, name, args)[0]
    carved = seccomp._carve_staged(name, plan)
    if carved is None:
        return "notify"
    notified, kept = carved
    if any(matches(rule, args) for rule in notified):
        return "notify"
    rule = seccomp._most_severe(kept, name, args)
    return plan.default_action if rule is None else rule.action


def test_a_plain_allow_is_split_around_a_one_bit_steady_rule():
    plan = SeccompPlan(default_action="kill", rules=(SeccompRule("mmap"),), steady=(EXEC_MAPPING,))
    notified, kept = seccomp._carve_staged("mmap", plan)
    assert notified == [EXEC_MAPPING]
    assert kept == [SeccompRule("mmap", args=(ArgCondition(2, "masked_eq", 0, PROT_EXEC),))]


def test_plain_rules_inside_or_apart_from_steady_ones():
    tcgets, fionbio = (SeccompRule("ioctl", args=(ArgCondition(1, "eq", request),)) for request in (0x5401, 0x5421))
    plan = SeccompPlan(rules=(tcgets, fionbio), steady=(replace(tcgets, action="kill"),))
    notified, kept = seccomp._carve_staged("ioctl", plan)
    assert [rule.args[0].value for rule in notified] == [0x5401]
    assert [(rule.args[0].value, rule.args[0].mask) for rule in kept] == [(0x5421, 0xFFFFFFFF)]


def test_what_cannot_be_proven_apart_routes_every_call():
    anything = SeccompRule("openat", "kill")
    assert seccomp._carve_staged("openat", SeccompPlan(rules=(SeccompRule("openat"),), steady=(anything,))) is None
    below = SeccompRule("ioctl", args=(ArgCondition(1, "lt", 0x5400),))
    assert seccomp._carve_staged("ioctl", SeccompPlan(rules=(below,), steady=(
        SeccompRule("ioctl", "kill", args=(ArgCondition(1, "eq", 0x5401),)),))) is None
    two_bits = SeccompRule("mmap", "kill", args=(ArgCondition(2, "masked_eq", 6, 6),))
    assert seccomp._carve_staged("mmap", SeccompPlan(rules=(SeccompRule("mmap"),), steady=(two_bits,))) is None


conditions = st.builds(
    lambda index, op, value, mask: ArgCondition(index, op, value, mask if op == "masked_eq" else None),
    st.sampled_from((1, 2)), st.sampled_from(("eq", "masked_eq")), st.integers(0, 7), st.integers(0, 7))
plain_rules = st.builds(lambda syscall, action, args: SeccompRule(syscall, action, args=tuple(args)),
                        st.sampled_from(("ioctl", "mmap")), st.sampled_from(("allow", "errno", "kill")),
                        st.lists(conditions, max_size=2, unique_by=lambda c: c.index))
steady_rules = st.builds(lambda syscall, args: SeccompRule(syscall, "kill", args=tuple(args)),
                         st.sampled_from(("ioctl", "mmap")), st.lists(conditions, min_size=1, max_size=1))
argument = st.one_of(st.integers(0, 7), st.integers(0, 7).map(lambda v: v | 1 << 32))


@settings(max_examples=400, deadline=None)
@given(st.lists(plain_rules, max_size=4), st.lists(steady_rules, min_size=1, max_size=2),
       st.sampled_from(("allow", "kill")), st.sampled_from(("ioctl", "mmap")), st.tuples(argument, argument))
def test_carving_notifies_every_call_a_steady_rule_matches_and_changes_nothing_else(plain, steady, default,
                                                                                 name, values):
    plan = SeccompPlan(default_action=default, rules=tuple(plain), steady=tuple(steady))
    args = (0, *values, 0, 0, 0)
    outcome = kernel_side(plan, name, args)
    if any(rule.syscall == name and matches(rule, args) for rule in steady):
        assert outcome == "notify"
    if outcome != "notify":
        assert outcome == seccomp.decide(plan, name, args)[0]


RECORDING_LAUNCH = """
import json, sys
from jailer.launch import launcher
from jailer.plan import Plan

class Recording:
    def __init__(self):
        self.seen = []
    def decide(self, name, nr, args, stage):
        self.seen.append((name, args[2]))
        return ("continue", None)

plan = Plan.from_dict(json.load(open(sys.argv[1])))
policy = Recording()
code = launcher.run(plan, launcher.Options(notification_policy=policy))
print(json.dumps({"code": code, "seen": policy.seen}))
"""


def test_only_executable_mappings_reach_the_launcher_in_a_real_sandbox(tmp_path):
    # ld.so maps the library cache read-only and the libraries executable at every exec
    plan = replace(plan_for("root", "true"), seccomp=SeccompPlan(default_action="allow", steady=(EXEC_MAPPING,)))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.to_dict()))
    result = subprocess.run([sys.executable, "-c", RECORDING_LAUNCH, str(plan_file)], capture_output=True,
                            text=True, timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)))
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 0, result.stderr
    mappings = [prot for name, prot in outcome["seen"] if name == "mmap"]
    assert mappings and all(prot & PROT_EXEC for prot in mappings)
