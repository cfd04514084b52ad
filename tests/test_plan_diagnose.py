"""kvpool diagnose: findings name the problem and cite the figures."""
import json

import pytest

from kvpool.errors import InvalidArgumentError
from kvpool.plan import plan_memory
from kvpool.plan.diagnose import diagnose, diagnose_file, parse_snapshots

GIB = 1 << 30


def _rank(rank, used_gib, alloc_gib=None, reserved_gib=None, peak_gib=None, total_gib=80.0):
    d = {"rank": rank, "total": int(total_gib * GIB), "free": int((total_gib - used_gib) * GIB)}
    for key, v in (("allocated", alloc_gib), ("reserved", reserved_gib), ("peak", peak_gib)):
        if v is not None:
            d[key] = int(v * GIB)
    return d


def test_heavy_rank_zero():
    snaps = parse_snapshots(json.dumps([_rank(0, 74.0), _rank(1, 70.5), _rank(2, 70.5), _rank(3, 70.5)]))
    f = diagnose(snaps)
    heavy = [x for x in f if "heavier" in x.title]
    assert heavy and "rank 0 uses 74.00 GiB, the median rank 70.50 GiB" in heavy[0].evidence
    assert "set_device" in heavy[0].fix


def test_fragmentation_and_non_torch_and_peak():
    snaps = parse_snapshots(json.dumps([_rank(0, 70.0, alloc_gib=50.0, reserved_gib=60.0, peak_gib=58.0)]))
    titles = {x.title for x in diagnose(snaps)}
    assert "rank 0: reserved far above allocated (fragmentation)" in titles
    assert "rank 0: memory outside torch's allocator is high" in titles  # 10 GiB non-torch
    assert "rank 0: transient peak well above steady allocation" in titles


def test_above_plan_and_nearly_full():
    plan = plan_memory("llama-3.1-8b", gpu="a100-80gb", mem_fraction=0.8)
    snaps = parse_snapshots(json.dumps([_rank(0, 79.8)]))
    titles = {x.title for x in diagnose(snaps, plan)}
    assert {"rank 0: memory above plan", "rank 0: almost no free memory"} <= titles


def test_healthy():
    f = diagnose(parse_snapshots(json.dumps([_rank(r, 66.0, 64.0, 64.5, 64.2) for r in range(4)])))
    assert [x.severity for x in f] == ["ok"]


def test_nvidia_smi_csv(tmp_path):
    csv = "index, memory.used [MiB], memory.total [MiB]\n0, 78000 MiB, 81920 MiB\n1, 72000 MiB, 81920 MiB\n" \
          "2, 72010 MiB, 81920 MiB\n3, 71990 MiB, 81920 MiB\n"
    path = tmp_path / "smi.csv"
    path.write_text(csv)
    snaps, findings = diagnose_file(path)
    assert [s.used for s in snaps] == [78000 << 20, 72000 << 20, 72010 << 20, 71990 << 20]
    assert any("rank 0 is much heavier" in x.title for x in findings)


@pytest.mark.parametrize("text,match", [("", "empty"), ("[1, 2]", "must be an object"), ("[{\"total\": 5}]", "free"),
                                        ("{oops", "not valid JSON"), ("gpu,mem\n1,2", "CSV header"),
                                        ("[{\"total\": -1, \"free\": 0}]", "non-negative")])
def test_bad_snapshot_input(text, match):
    with pytest.raises(InvalidArgumentError, match=match):
        parse_snapshots(text)
