"""Run a Plan given as JSON, the way `jailer run` runs a profile's plan (tests build Plans directly).

usage: python tests/run_plan.py PLAN.json [jailer run options] [-- ARG...]
"""

import json
import sys

from jailer.errors import JailerError
from jailer.plan import Plan
from jailer.run_cli import parse, run_plan


def main(argv):
    try:
        args = parse(argv)
        with open(args.profile) as f:
            plan = Plan.from_dict(json.load(f))
        return run_plan(plan, args)
    except JailerError as exc:
        for line in str(exc).splitlines():
            print(f"jailer: {line}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
