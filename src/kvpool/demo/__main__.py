"""``python -m kvpool.demo``: a small paged-KV serving loop on kvpool, end to end.

Examples
--------
python -m kvpool.demo                      # 24 requests, one process, CPU
python -m kvpool.demo --tp 2               # two processes (gloo), half the KV heads each
python -m kvpool.demo --kv-mib 0.125       # an even smaller pool: more preemptions (recomputed later)
python -m kvpool.demo --bad-requests       # plus three bad requests, refused one by one
python -m kvpool.demo --check-hf           # compare every request with transformers' greedy generate
python -m kvpool.demo --metrics-port 9400  # Prometheus metrics on 127.0.0.1:9400/metrics during the run
python -m kvpool.demo --model hybrid       # a Qwen2 with sliding-window layers: blocks held per KV-cache group
python -m kvpool.demo --host-kv-mib 2      # a host tier: prefixes evicted from the GPU pool come back from host memory
python -m kvpool.demo --elastic            # the pool starts small, grows under load and shrinks when idle
"""
from __future__ import annotations

import argparse
import sys

from .._optional_deps import require
from ..errors import KVPoolError
from .launch import DEFAULT_KV_MIB, DemoOptions, run_demo
from .configs import DEMO_MODELS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvpool.demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=24, help="number of seeded requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the workload")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (processes); 1 or 2 for the tiny model")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--model", choices=sorted(DEMO_MODELS), default="llama",
                   help="llama: 4 full-attention layers; hybrid: Qwen2 whose layers 0 and 2 slide over a 32-token "
                        "window (two KV-cache groups; prints the blocks each holds against full attention)")
    p.add_argument("--no-window-freeing", action="store_true",
                   help="keep every block of a windowed KV-cache group (one table of every token, as full attention), "
                        "to compare pool use and preemptions with window freeing")
    p.add_argument("--kv-mib", type=float, default=None,
                   help="memory each rank gives its KV pool, MiB (size_kv_pool's device_memory_bytes); default "
                        + ", ".join(f"{v} for {k}" for k, v in DEFAULT_KV_MIB.items()))
    p.add_argument("--max-batch-tokens", type=int, default=256, help="token budget of one step")
    p.add_argument("--max-running", type=int, default=16, help="most sequences in flight")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix sharing")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (Triton kernels, NCCL for --tp > 1)")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                   help="torch.distributed backend for --tp > 1 (default: nccl with one GPU per rank, else gloo; "
                        "gloo lets two ranks share one GPU)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on 127.0.0.1:PORT while the demo runs (0 = any free port)")
    p.add_argument("--mean-gap", type=float, default=1.5, help="mean steps between arrivals")
    p.add_argument("--tenants", type=int, default=0,
                   help="split requests between N tenants, each with its own prefix-cache salt (0: no salt); "
                        "the same prompts then share cached blocks only within a tenant")
    p.add_argument("--host-kv-mib", type=float, default=0.0,
                   help="host memory of the prefix cache's host tier per rank, MiB (0: none): blocks evicted from "
                        "the GPU pool are kept there and copied back on a hit")
    p.add_argument("--bad-requests", action="store_true",
                   help="add an empty prompt, an out-of-vocabulary token and a too-long request")
    p.add_argument("--check-hf", action="store_true",
                   help="after the run, compare every request's tokens with transformers (LlamaForCausalLM, "
                        "Qwen2ForCausalLM)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--elastic", action="store_true",
                   help="an elastic pool (kvpool.ElasticKVPool): reserved for the whole pool, a quarter of it mapped "
                        "at the start; grows under load and shrinks when idle, held blocks moved down")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def format_summary(report, opts: DemoOptions) -> str:
    """The final summary of rank 0's run, as printed by the CLI."""
    s = report.summary
    lines = [
        f"kvpool demo: model={opts.model} tp={opts.tp} device={opts.device} pool={s.num_blocks} blocks x "
        f"{s.block_size} tokens per rank (KV heads {report.kv_head_ids} on rank 0)",
        f"  requests      {s.finished} finished, {s.rejected} refused, in {s.steps} steps, {s.wall_s:.2f} s",
        f"  tokens        {s.generated_tokens} generated ({s.tokens_per_s:.0f} tok/s), {s.prompt_tokens} prompt tokens, "
        f"{s.computed_prompt_tokens} computed (recompute after preemption included)",
        f"  pool peak     {s.peak_used_blocks}/{s.num_blocks} blocks in use "
        f"({100 * s.peak_used_blocks / max(1, s.num_blocks):.0f}%); after the run {report.num_free_blocks}/"
        f"{report.num_blocks} free",
        f"  prefix cache  {100 * s.prefix_hit_rate:.1f}% of prompt tokens hit",
        f"  preemptions   {s.preemptions}",
    ]
    if s.host_tier is not None:
        t = s.host_tier
        lines.append(f"  host tier     {t['blocks']} blocks: {t['host_hit_blocks']} blocks hit on the host and reloaded "
                     f"({t['host_hit_blocks'] * s.block_size} prompt tokens not recomputed), {t['offloaded_blocks']} "
                     f"offloaded, {t['skipped_blocks']} already there, {t['host_evictions']} evicted")
    if len(s.group_usage) > 1:  # a hybrid model: what window freeing saved, group by group
        lines += [f"  KV group {g}    {usage.describe()}" for g, usage in enumerate(s.group_usage)]
    if getattr(s, "elastic", None) is not None:
        lines.append(f"  elastic pool  {s.elastic.describe()}")
    if opts.tenants > 0:
        hits = [sum(r.num_cached_prompt_tokens for rid, r in s.results.items() if rid % opts.tenants == t)
                for t in range(opts.tenants)]
        lines.append(f"  tenants       {opts.tenants}, each with its own cache salt; prompt tokens hit per tenant: "
                     f"{hits} (a tenant never reads another's cached KV)")
    for rid, r in sorted(s.results.items()):
        if r.error is not None:
            lines.append(f"  refused #{rid}: {r.error}")
    return "\n".join(lines)


def check_against_hf(report, requests, seed: int, model_name: str = "llama") -> tuple[int, list[int]]:
    """Greedy-generate every served request with transformers; return (matches, mismatching ids)."""
    from .hf_reference import build_hf_model, hf_greedy
    from .model import demo_config, random_llama_weights

    config = demo_config(model_name)
    model = build_hf_model(config, random_llama_weights(config, seed=seed))
    served = [r for r in requests if report.summary.results[r.req_id].error is None]
    bad = [r.req_id for r in served
           if hf_greedy(model, r.prompt, r.max_new_tokens) != report.summary.results[r.req_id].output]
    return len(served) - len(bad), bad


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = DemoOptions(num_requests=args.requests, seed=args.seed, tp=args.tp, block_size=args.block_size,
                       kv_mib=args.kv_mib, model=args.model, window_freeing=not args.no_window_freeing,
                       max_batch_tokens=args.max_batch_tokens,
                       max_running=args.max_running,
                       prefix_caching=not args.no_prefix_caching, device=args.device,
                       metrics_port=args.metrics_port, progress=not args.no_progress,
                       bad_requests=args.bad_requests, mean_gap=args.mean_gap, threads=args.threads,
                       tenants=args.tenants, backend=args.backend, host_kv_mib=args.host_kv_mib,
                       elastic=args.elastic)
    if args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: need at least 1")
    if args.host_kv_mib < 0:
        raise SystemExit(f"--host-kv-mib {args.host_kv_mib}: need 0 (no host tier) or more")
    if args.tenants < 0:
        raise SystemExit(f"--tenants {args.tenants}: need 0 (no cache salt) or more")
    try:
        require("torch", "python -m kvpool.demo", extra="demo")
        if args.check_hf:  # refuse before serving, not after
            require("transformers", "python -m kvpool.demo --check-hf", extra="demo")
        reports = run_demo(opts)
    except KVPoolError as err:  # a bad setting (--tp 3, --device cuda without CUDA), a missing extra: one line
        print(f"kvpool demo: {err}", file=sys.stderr)
        return 2
    report = reports[0]
    print(format_summary(report, opts))
    if report.metrics_port is not None:
        print(f"  metrics       were served on http://127.0.0.1:{report.metrics_port}/metrics")
    if args.check_hf:
        from .launch import build_requests
        from .model import demo_config

        config = demo_config(opts.model)
        requests = build_requests(opts, config["vocab_size"])
        matched, bad = check_against_hf(report, requests, opts.seed, opts.model)
        print(f"  transformers  {matched}/{matched + len(bad)} requests match {config['architectures'][0]} greedy "
              f"tokens exactly"
              + (f"; MISMATCH in {bad}" if bad else ""))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
