"""The ``kvpool`` command: plan, scale, comm, diagnose, models, gpus.

Pure Python (no torch import): ``kvpool plan llama-3.1-70b --tp 4 --gpu a100-80gb`` answers in well
under a second on a laptop. vLLM's flag names are accepted as aliases so a vLLM command line can be
pasted. Errors print one line to stderr and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import KVPoolError

# vLLM serve flags that do not change memory: accepted and ignored so a pasted command line works.
_VLLM_IGNORED_WITH_VALUE = ("--port", "--host", "--served-model-name", "--api-key", "--seed", "--swap-space",
                            "--download-dir", "--tokenizer", "--revision", "--load-format", "--uvicorn-log-level")
_VLLM_IGNORED_FLAGS = ("--trust-remote-code", "--enable-prefix-caching", "--no-enable-prefix-caching",
                       "--disable-log-requests", "--disable-log-stats", "--enable-chunked-prefill")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _UsageError(Exception):
    pass


def _add_model_args(p: argparse.ArgumentParser, gpu_default: str = "h100-sxm") -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="preset name (kvpool models) or config.json path/folder")
    p.add_argument("gpu_pos", nargs="?", metavar="GPU", help="GPU preset (kvpool gpus)")
    p.add_argument("--model", dest="model_flag", help="same as MODEL")
    p.add_argument("--gpu", dest="gpu_flag", help=f"same as GPU (default {gpu_default})")
    p.set_defaults(gpu_default=gpu_default)
    p.add_argument("--gpu-mem-gib", type=float, help="override the GPU's memory (GiB)")
    p.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp", type=int, default=None, help="tensor parallel degree")
    p.add_argument("--pp", "--pipeline-parallel-size", "-pp", dest="pp", type=int, default=1, help="pipeline parallel degree")
    p.add_argument("--dtype", default=None, help="auto | fp16 | bf16 | fp32 (default: the checkpoint's; fp32 served as bf16)")
    p.add_argument("--kv-dtype", "--kv-cache-dtype", dest="kv_dtype", default="auto", help="auto | fp16 | bf16 | fp8")
    p.add_argument("--fp8-scales", default="per_token_head", choices=("per_token_head", "per_head", "per_tensor", "none"))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-batched-tokens", "--max-num-batched-tokens", dest="max_batched_tokens", type=int,
                   help="largest prefill step in tokens (default 8192)")
    p.add_argument("--max-seqs", "--max-num-seqs", dest="max_seqs", type=int, help="sequences per step (default 256)")
    p.add_argument("--mem-fraction", "--gpu-memory-utilization", dest="mem_fraction", type=float,
                   help="fraction of GPU memory the server may use (vLLM semantics; default 0.9)")
    p.add_argument("--weights-gib", type=float, help="reserve this for weights instead of the computed value")
    p.add_argument("--activation-gib", type=float, help="reserve this for activations")
    p.add_argument("--comm-gib", type=float, help="reserve this for communication buffers")
    p.add_argument("--overhead-gib", type=float, help="reserve this for CUDA context / workspaces / graphs")
    p.add_argument("--headroom", dest="headroom_gib", type=float, help="GiB kept free")
    p.add_argument("--interconnect", help="nvlink3 | nvlink4 | nvlink5 | pcie4 | pcie5 | ib-hdr | ib-ndr")
    p.add_argument("--pp-interconnect", help="link between pipeline stages (default ib-ndr beyond 8 GPUs)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (vLLM flag)")
    p.add_argument("--cuda-context-mib", type=int, help="measured CUDA context size")
    p.add_argument("--nccl-buffsize", type=int, help="NCCL_BUFFSIZE in bytes (default: env or 4 MiB)")
    p.add_argument("--nccl-channels", type=int, help="NCCL_MAX_NCHANNELS (default: env or 16 on NVLink, 2 on PCIe)")
    p.add_argument("--nccl-proto", help="NCCL_PROTO (e.g. ^LL128)")
    p.add_argument("--nvls", dest="nvls", action="store_true", default=None, help="count NVLS buffers")
    p.add_argument("--no-nvls", dest="nvls", action="store_false", help="do not count NVLS buffers")
    p.add_argument("--staging-layers", type=int, help="all-reduce staging buffers kept (1, or num layers)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw a chart (matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvpool", description="Plan, size and check a paged KV cache under tensor parallelism.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    plan = sub.add_parser("plan", help="per-GPU memory plan and KV capacity")
    _add_model_args(plan)
    plan.add_argument("--batch", type=int, help="target batch (with --seq-len)")
    plan.add_argument("--seq-len", type=int, help="target sequence length (with --batch)")
    scale = sub.add_parser("scale", help="memory, capacity and speed at TP = 1, 2, 4, 8")
    _add_model_args(scale)
    scale.add_argument("--tps", default="1,2,4,8", help="comma-separated TP degrees")
    scale.add_argument("--seq-len", type=int, default=4096)
    scale.add_argument("--batch", type=int, help="run this batch (default: the largest that fits, capped by max-seqs)")
    comm = sub.add_parser("comm", help="NCCL buffers, all-reduce cost, interconnect comparison")
    _add_model_args(comm)
    comm.add_argument("--batch", type=int, default=32, help="decode batch")
    comm.add_argument("--seq-len", type=int, default=4096)
    comm.add_argument("--interconnects", default=None, help="comma-separated links to compare (default: all intra-node)")
    diag = sub.add_parser("diagnose", help="name the problem in per-GPU memory snapshots")
    diag.add_argument("file", help="JSON list of per-rank torch figures, or nvidia-smi CSV")
    diag.add_argument("--model", dest="model_flag", help="also compare with this model's plan")
    diag.add_argument("--gpu", dest="gpu_flag", default="h100-sxm")
    diag.add_argument("--tp", type=int, default=None)
    diag.add_argument("--pp", type=int, default=1)
    diag.add_argument("--mem-fraction", "--gpu-memory-utilization", dest="mem_fraction", type=float)
    diag.add_argument("--json", action="store_true")
    models = sub.add_parser("models", help="built-in model presets")
    models.add_argument("--json", action="store_true")
    gpus = sub.add_parser("gpus", help="GPU and interconnect presets")
    gpus.add_argument("--json", action="store_true")
    return parser


def _strip_vllm_noise(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _VLLM_IGNORED_FLAGS:
            continue
        if name in _VLLM_IGNORED_WITH_VALUE:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _model_and_gpu(args) -> tuple[str, str]:
    model = args.model_flag or args.model_pos
    if args.model_flag and args.model_pos and args.model_flag != args.model_pos:
        if args.gpu_pos is None and not getattr(args, "gpu_flag", None):
            args.gpu_pos = args.model_pos  # `kvpool plan --model X a100-80gb`
        else:
            raise _UsageError(f"kvpool: model given twice ({args.model_pos!r} and --model {args.model_flag!r})")
    if not model:
        raise _UsageError("kvpool: give a model: a preset name (kvpool models) or a config.json path")
    gpu = args.gpu_flag or args.gpu_pos or args.gpu_default
    return model, gpu


def _nccl(args):
    from .plan.comm import NCCLSettings, parse_protocols

    return NCCLSettings.from_env(
        buffsize=args.nccl_buffsize, channels=args.nccl_channels,
        protocols=parse_protocols(args.nccl_proto) if args.nccl_proto else None,
        nvls=args.nvls, staging_layers=args.staging_layers,
    )


def _plan_kwargs(args) -> dict:
    return dict(
        gpu_mem_gib=args.gpu_mem_gib, dtype=args.dtype, kv_dtype=args.kv_dtype, fp8_scales=args.fp8_scales,
        block_size=args.block_size, max_model_len=args.max_model_len, max_batched_tokens=args.max_batched_tokens,
        max_seqs=args.max_seqs, mem_fraction=args.mem_fraction, weights_gib=args.weights_gib,
        activation_gib=args.activation_gib, comm_gib=args.comm_gib, overhead_gib=args.overhead_gib,
        headroom_gib=args.headroom_gib, pp_interconnect=args.pp_interconnect, nccl=_nccl(args),
        cuda_graphs=not args.enforce_eager, cuda_context_mib=args.cuda_context_mib,
    )


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_plan(args) -> int:
    from .plan.memory import plan_memory

    model, gpu = _model_and_gpu(args)
    plan = plan_memory(model, args.tp or 1, args.pp, gpu, interconnect=args.interconnect, batch=args.batch,
                       seq_len=args.seq_len, **_plan_kwargs(args))
    if args.plot:
        from .cli_render import plot_plan

        plot_plan(plan, args.plot)
    if args.json:
        _print_json(plan.to_dict())
    else:
        from .cli_render import render_plan
        from .plan.model import load_model_spec

        render_plan(plan, load_model_spec(model), plot=args.plot)
    return 0


def cmd_scale(args) -> int:
    from .plan.scaling import scale

    model, gpu = _model_and_gpu(args)
    try:
        tps = tuple(int(t) for t in args.tps.split(",") if t.strip())
    except ValueError:
        raise _UsageError(f"kvpool: --tps must be comma-separated integers, got {args.tps!r}") from None
    if not tps or any(t < 1 for t in tps):
        raise _UsageError(f"kvpool: --tps must list positive integers, got {args.tps!r}")
    if args.tp:
        tps = tuple(sorted(set(tps) | {args.tp}))
    result = scale(model, gpu, tps, seq_len=args.seq_len, batch=args.batch, interconnect=args.interconnect,
                   pp=args.pp, **_plan_kwargs(args))
    if args.plot:
        from .cli_render import plot_scale

        plot_scale(result, args.plot)
    if args.json:
        _print_json(result)
    else:
        from .cli_render import render_scale

        render_scale(result, plot=args.plot)
    return 0


def cmd_comm(args) -> int:
    from .plan.comm_report import comm_report

    model, gpu = _model_and_gpu(args)
    links = tuple(x.strip() for x in args.interconnects.split(",")) if args.interconnects else None
    report = comm_report(model, gpu, args.tp or 4, batch=args.batch, seq_len=args.seq_len, links=links,
                         interconnect=args.interconnect, **_plan_kwargs(args))
    if args.json:
        _print_json(report)
    else:
        from .cli_render import render_comm

        render_comm(report)
    return 0


def cmd_diagnose(args) -> int:
    from .plan.diagnose import diagnose_file

    plan = None
    if args.model_flag:
        from .plan.memory import plan_memory

        plan = plan_memory(args.model_flag, args.tp or 1, args.pp, args.gpu_flag, mem_fraction=args.mem_fraction)
    snaps, findings = diagnose_file(args.file, plan)
    if args.json:
        _print_json({"ranks": [s.__dict__ for s in snaps], "findings": [f.to_dict() for f in findings]})
    else:
        from .cli_render import render_diagnose

        render_diagnose(snaps, findings)
    return 1 if any(f.severity == "error" for f in findings) else 0


def cmd_models(args) -> int:
    from .cli_render import model_rows, render_models

    rows = model_rows()
    if args.json:
        _print_json(rows)
    else:
        render_models(rows)
    return 0


def cmd_gpus(args) -> int:
    from .plan.hardware import GPUS, INTERCONNECTS

    if args.json:
        _print_json({"gpus": {k: g.to_dict() for k, g in GPUS.items()},
                     "interconnects": {k: i.to_dict() for k, i in INTERCONNECTS.items()}})
    else:
        from .cli_render import render_gpus

        render_gpus()
    return 0


COMMANDS = {"plan": cmd_plan, "scale": cmd_scale, "comm": cmd_comm, "diagnose": cmd_diagnose,
            "models": cmd_models, "gpus": cmd_gpus}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvpool`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(_strip_vllm_noise(argv))
        if args.command is None:
            parser.print_help()
            return 0
        return COMMANDS[args.command](args)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KVPoolError as exc:
        print(f"kvpool: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line, with the type so it can be reported
        print(f"kvpool: internal error ({type(exc).__name__}: {exc}); please report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
