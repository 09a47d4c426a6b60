"""A plan with the host uid/gid of this run in place (jailer.host.host_ids allocates it).

Apart from host_ids, so that the sandbox's process, which only wraps its plan (the zero-exec
preloader imports it on the start-up chain), need not import the allocation and its records.
"""

from __future__ import annotations


class IdMap:
    __slots__ = ("inside", "outside", "count")

    def __init__(self, inside: int, outside: int, count: int = 1):
        self.inside, self.outside, self.count = inside, outside, count


class Identity:
    """A plan's identity with the host id of this run in place (jailer.plan.IdentityPlan's fields)."""

    __slots__ = ("uid", "gid", "uid_map", "gid_map", "host_ids", "host_id_range")

    def __init__(self, planned, host_id: int):
        self.host_ids, self.host_id_range = planned.host_ids, planned.host_id_range
        if planned.uid_map:        # the ids inside stay; what they map onto is this run's own
            self.uid, self.gid = planned.uid, planned.gid
            self.uid_map, self.gid_map = (IdMap(planned.uid, host_id),), (IdMap(planned.gid, host_id),)
        else:
            self.uid = self.gid = host_id
            self.uid_map = self.gid_map = ()


class PlanWithIdentity:
    """The plan, but for its identity: the one this run got."""

    def __init__(self, plan, identity: Identity):
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "identity", identity)

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def __setattr__(self, name, value):
        raise AttributeError("a plan is read-only")
