"""Run ``size_kv_pool`` scenarios on every rank of a real gloo group (spawned processes, bounded waits).

Each rank runs the same scenarios in the same order on one group and writes what each returned or
raised to ``rank<r>.json``. A rank that hangs past ``JOIN_TIMEOUT_S`` is killed and fails the run; a
collective stuck on a dead peer gives up after ``COLLECTIVE_TIMEOUT_S`` (gloo's own timeout).
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import time
import traceback
from typing import Callable, Iterator

import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 120  # generous: four ranks importing torch on a loaded 2-core machine
COLLECTIVE_TIMEOUT_S = 45

Scenarios = Callable[[int, int], Iterator[tuple[str, dict]]]


def _record(size) -> dict:
    # hash_key is kept out of to_dict() (it is a secret of the prefix cache), so it is recorded beside it
    return {"ok": size.to_dict(), "hash_key": getattr(size, "hash_key", None)}


def _run_scenarios(rank: int, world: int, scenarios: Scenarios) -> tuple[dict, bool]:
    """Every scenario's outcome; the flag is False when the group may be left mid-collective."""
    import kvpool
    from kvpool.runtime import size_kv_pool

    results: dict = {}
    for name, kwargs in scenarios(rank, world):
        spec = kwargs.pop("spec")
        try:
            results[name] = _record(size_kv_pool(spec, **kwargs))
        except kvpool.KVPoolError as exc:
            results[name] = {"error": type(exc).__name__, "message": str(exc)}
        except KeyboardInterrupt as exc:
            results[name] = {"error": "KeyboardInterrupt", "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - not a kvpool error: the group is in an unknown state, stop
            results[name] = {"error": f"raw {type(exc).__name__}", "message": str(exc)[:2000]}
            return results, False
    return results, True


def _worker(rank: int, world: int, init_file: str, out_dir: str,
            body: Callable[[int, int], tuple[dict, bool]]) -> None:
    """Join the gloo group, run ``body(rank, world) -> (results, in_step)``, write ``rank<r>.json``.

    ``in_step`` False: the group may be left mid-collective, so no final barrier.
    """
    import torch.distributed as dist

    results: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        results, in_step = body(rank, world)
        if in_step:
            dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        results["crash"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _scenarios_body(scenarios: Scenarios, rank: int, world: int) -> tuple[dict, bool]:
    return _run_scenarios(rank, world, scenarios)


def _plain_body(body: Callable[[int, int], dict], rank: int, world: int) -> tuple[dict, bool]:
    return body(rank, world), True


def run_group(world: int, tmp_path, scenarios: Scenarios) -> list[dict]:
    """Spawn ``world`` ranks running ``scenarios`` (a module-level function) and return each rank's results.

    Fails (never blocks) when a rank is still running after ``JOIN_TIMEOUT_S``, wrote nothing, or crashed.
    """
    return _spawn_and_collect(world, tmp_path, _worker, functools.partial(_scenarios_body, scenarios))


def _spawn_and_collect(world: int, tmp_path, target, payload) -> list[dict]:
    ctx = mp.get_context("spawn")
    init_file = str(tmp_path / "init")
    procs = [ctx.Process(target=target, args=(r, world, init_file, str(tmp_path), payload)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    assert not hung, f"ranks {hung} of {world} did not finish within {JOIN_TIMEOUT_S} s (a hang)"
    out = []
    for r, p in enumerate(procs):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} exited with code {p.exitcode} and wrote no result"
        res = json.loads(path.read_text())
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
        out.append(res)
    return out


def run_ranks(world: int, tmp_path, body: Callable[[int, int], dict]) -> list[dict]:
    """Spawn ``world`` gloo ranks each running ``body(rank, world)`` (a module-level function returning a
    JSON-able dict) and return each rank's dict; fails (never blocks) as `run_group` does."""
    return _spawn_and_collect(world, tmp_path, _worker, functools.partial(_plain_body, body))
