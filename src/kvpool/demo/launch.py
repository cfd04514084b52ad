"""Run the demo on one process or on a tensor-parallel group of processes.

``tp == 1``: the engine runs in this process. ``tp > 1``: ``tp`` processes are spawned, joined into one
torch.distributed group (gloo on CPU, NCCL on CUDA) over loopback, and each runs one
:class:`~kvpool.demo.engine.Engine` rank; rank 0 shows the progress bar, prints the summary and serves
the metrics. Every rank hands back a :class:`RankReport` so callers (and the tests) can check that the
ranks agreed.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import traceback
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError
from .requests import Request, make_workload

# --model NAME -> the seeded workload's shape (make_workload's length ranges): the hybrid model's
# prompts and generations run several of its 32-token windows long
WORKLOADS = {
    "llama": {},
    "hybrid": {"prefix_len": (32, 80), "suffix_len": (8, 48), "new_tokens": (32, 96)},
}
# --model NAME -> the KV pool each rank gets by default, MiB: small on purpose, so the pool fills and
# requests get preempted (llama: 12 blocks of 32 KiB; hybrid: 64 blocks of 16 KiB, two page slots a block)
DEFAULT_KV_MIB = {"llama": 0.375, "hybrid": 1.0}


@dataclass
class DemoOptions:
    """Everything a run depends on (all ranks get the same copy)."""

    num_requests: int = 24
    seed: int = 0
    tp: int = 1
    block_size: int = 16
    kv_mib: float | None = None  # None: DEFAULT_KV_MIB of the model
    model: str = "llama"  # a name of kvpool.demo.model.DEMO_MODELS
    window_freeing: bool = True  # False: every KV-cache group keeps every block (the layers still read their window)
    max_batch_tokens: int = 256
    max_running: int = 16
    prefix_caching: bool = True
    device: str = "cpu"
    metrics_port: int | None = None
    progress: bool = True
    bad_requests: bool = False
    mean_gap: float = 1.5
    tenants: int = 0  # > 0: requests alternate between tenants, each with its own cache salt
    host_kv_mib: float = 0.0  # > 0: the host tier of the prefix cache, MiB of host memory per rank
    backend: str | None = None  # torch.distributed backend for --tp > 1; None: see process_group_backend
    threads: int = 1  # torch CPU threads per rank: the tiny model's matmuls only lose from more
    elastic: bool = False  # an ElasticKVPool: starts at a quarter of the pool, grows under load, shrinks idle
    requests: list[Request] | None = None  # explicit requests instead of the seeded workload
    extra_requests: list[Request] = field(default_factory=list)  # appended to the seeded workload


@dataclass
class RankReport:
    """What one rank saw: the summary (tokens, errors, counters) and its pool state at the end."""

    tp_rank: int
    summary: object
    num_free_blocks: int
    num_blocks: int
    kv_head_ids: list[int]
    metrics_text: str = ""
    metrics_port: int | None = None


def build_requests(opts: DemoOptions, vocab_size: int) -> list[Request]:
    """The seeded workload (or ``opts.requests``), plus the bad requests of ``--bad-requests``."""
    if opts.requests is not None:
        requests = list(opts.requests)
    else:
        requests = make_workload(opts.num_requests, vocab_size, seed=opts.seed, mean_gap=opts.mean_gap,
                                 tenants=opts.tenants, **WORKLOADS[opts.model])
    requests += list(opts.extra_requests)
    if opts.bad_requests:
        n = max([r.req_id for r in requests], default=-1) + 1
        requests += [
            Request(n, [], 4, 1),                                  # empty prompt
            Request(n + 1, [1, 2, vocab_size + 7], 4, 2),          # token id outside the vocabulary
            Request(n + 2, list(range(64)) * 24, 8, 3),            # 1544 tokens: more than the whole pool
        ]
    return requests


def run_rank(tp_rank: int, opts: DemoOptions, group=None) -> RankReport:
    """Build this rank's engine and serve the workload (collective when ``opts.tp > 1``)."""
    import torch

    from ..metrics import PoolMetrics
    from .engine import Engine
    from .model import demo_config, random_llama_weights

    config = demo_config(opts.model)
    weights = random_llama_weights(config, seed=opts.seed)
    metrics = PoolMetrics() if tp_rank == 0 else None
    server = None
    if metrics is not None and opts.metrics_port is not None:
        server, _ = metrics.serve(opts.metrics_port)
    try:
        engine = Engine(config, weights, pool_bytes=int(pool_mib(opts) * 2**20), block_size=opts.block_size,
                        tp_rank=tp_rank, tp_size=opts.tp, group=group, device=opts.device,
                        max_batch_tokens=opts.max_batch_tokens, max_running=opts.max_running,
                        enable_prefix_caching=opts.prefix_caching, metrics=metrics,
                        window_freeing=opts.window_freeing, host_kv_bytes=int(opts.host_kv_mib * 2**20),
                        elastic=opts.elastic)
        summary = engine.run(build_requests(opts, config["vocab_size"]), progress=opts.progress and tp_rank == 0)
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
        return RankReport(tp_rank, summary, engine.allocator.num_free_blocks, engine.allocator.num_blocks,
                          list(engine.cache.kv_head_ids),
                          metrics.exposition().decode() if metrics is not None else "",
                          server.server_port if server is not None else None)
    finally:
        if server is not None:
            server.shutdown()


def pool_mib(opts: DemoOptions) -> float:
    """The KV pool of each rank in MiB: ``opts.kv_mib``, else the model's default."""
    return DEFAULT_KV_MIB[opts.model] if opts.kv_mib is None else opts.kv_mib


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(opts: DemoOptions, num_gpus: int) -> str:
    """The backend of a ``--tp > 1`` run: ``opts.backend``, else NCCL when every rank has a GPU of its own,
    else gloo (on CPU, or with every rank's CUDA tensors on the GPUs there are: NCCL refuses two ranks
    on one device, gloo carries the tensors through host memory)."""
    cuda = opts.device.startswith("cuda")
    backend = opts.backend or ("nccl" if cuda and num_gpus >= opts.tp else "gloo")
    if backend not in ("nccl", "gloo"):
        raise InvalidArgumentError(f"backend={backend!r}: use 'nccl' (one GPU per rank) or 'gloo'")
    if backend == "nccl" and (not cuda or num_gpus < opts.tp):
        raise InvalidArgumentError(
            f"backend 'nccl' needs one CUDA device per rank: --tp {opts.tp} on device {opts.device!r} with "
            f"{num_gpus} GPU(s); use --backend gloo (ranks may then share a GPU) or fewer ranks")
    return backend


def _worker(tp_rank: int, opts: DemoOptions, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if opts.device.startswith("cuda"):
        gpu = tp_rank % torch.cuda.device_count()  # gloo may put several ranks on one GPU
        torch.cuda.set_device(gpu)
        opts.device = f"cuda:{gpu}"
    else:
        torch.set_num_threads(opts.threads)
    try:
        dist.init_process_group(opts.backend, rank=tp_rank, world_size=opts.tp)
        report = run_rank(tp_rank, opts)
        queue.put((tp_rank, report, None))
    except BaseException as err:  # hand the error to the parent instead of dying silently
        queue.put((tp_rank, None, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_demo(opts: DemoOptions, timeout_s: float = 300.0) -> list[RankReport]:
    """Run the demo with ``opts.tp`` ranks; return one :class:`RankReport` per rank (rank order)."""
    import torch

    from .._device_check import checked_device
    from .model import check_tp_fits, demo_config

    # refuse an unknown model, a bad --tp or an absent device before starting any process
    check_tp_fits(demo_config(opts.model), opts.tp)
    checked_device(opts.device)
    if opts.tp == 1:
        if opts.device == "cpu":
            torch.set_num_threads(opts.threads)
        return [run_rank(0, opts)]
    import torch.multiprocessing as mp

    num_gpus = torch.cuda.device_count() if opts.device.startswith("cuda") else 0
    opts = dataclasses.replace(opts, backend=process_group_backend(opts, num_gpus))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, opts, port, queue), daemon=True) for r in range(opts.tp)]
    for p in procs:
        p.start()
    reports, errors = {}, []
    try:
        for _ in procs:
            # once one rank failed the others are stuck in a collective: do not wait long for them
            try:
                rank, report, error = queue.get(timeout=10 if errors else timeout_s)
            except Exception:  # queue.Empty: a rank hung or died without reporting
                errors.append("a rank did not report (hung in a collective or crashed)")
                break
            if error is not None:
                errors.append(f"rank {rank}: {error}")
            else:
                reports[rank] = report
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("tensor-parallel demo failed:\n" + "\n".join(errors))
    return [reports[r] for r in range(opts.tp)]
