import json

from jailer.plan import (ArgCondition, Bind, CgroupPlan, IdentityPlan, IdMap, LimitsPlan, Plan,
                         ProgramPlan, SeccompPlan, SeccompRule)


def test_plan_round_trips_through_json():
    plan = Plan(
        source="p.toml", name="p", invocation="root",
        program=ProgramPlan(argv=("true",), executable="/bin/true"),
        identity=IdentityPlan(uid=1000, gid=1000, uid_map=(IdMap(1000, 1000),), gid_map=(IdMap(1000, 1000),)),
        limits=LimitsPlan(cgroup=CgroupPlan(memory_max=64 << 20)),
        seccomp=SeccompPlan(rules=(SeccompRule("ioctl", args=(ArgCondition(1, "masked_eq", 0x5412, 0xffffffff),)),)),
        best_effort=frozenset({"cgroup"}),
        environment=(("PATH", "/usr/bin"),),
    )
    plan = Plan(**{**plan.__dict__, "filesystem": plan.filesystem.__class__(binds=(Bind("/usr", "/usr"),))})
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
