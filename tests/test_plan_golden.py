"""`kvpool plan --json` is pinned for every preset x tp {1, 2, 4, 8} x kv dtype {bf16, fp8} (issue 11).

A refactor of the planner must not move a single figure; regenerate the golden file
(`python tests/golden/plan_golden.py`) only for an intended change, with its reason in the commit message.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import plan_golden  # noqa: E402

GOLDEN = json.loads(plan_golden.GOLDEN.read_text())


def test_every_case_is_pinned():
    assert sorted(GOLDEN) == sorted(plan_golden.key(*c) for c in plan_golden.cases())


@pytest.mark.parametrize("case", plan_golden.cases(), ids=lambda c: plan_golden.key(*c))
def test_plan_json_equals_the_golden_file(case):
    assert plan_golden.run(*case) == GOLDEN[plan_golden.key(*case)]
