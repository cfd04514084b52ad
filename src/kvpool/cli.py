"""The ``kvpool`` command: plan, scale, comm, diagnose, models, gpus.

Pure Python (no torch import): ``kvpool plan llama-3.1-70b --tp 4 --gpu a100-80gb`` answers in well
under a second on a laptop. vLLM's flag names are accepted as aliases so a vLLM command line can be
pasted. Errors print one line to stderr and exit with status 2, never a traceback. The parser is in
``cli_args``, the tables in ``cli_render`` (fitted to the terminal by ``cli_layout``).
"""
from __future__ import annotations

import json
import sys

from .cli_args import _UsageError, build_parser, strip_vllm_noise
from .errors import KVPoolError


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


_PLAN_FLAGS = ("gpu_mem_gib", "dtype", "kv_dtype", "fp8_scales", "block_size", "max_model_len", "max_batched_tokens",
               "max_seqs", "mem_fraction", "weights_gib", "activation_gib", "comm_gib", "overhead_gib", "headroom_gib",
               "pp_interconnect", "cuda_context_mib", "host_kv_gib")


def _plan_kwargs(args) -> dict:
    """plan_memory's keyword arguments from the flags this subcommand has (a flag it lacks keeps the default)."""
    kw = {name: getattr(args, name) for name in _PLAN_FLAGS if hasattr(args, name)}
    return dict(kw, nccl=_nccl(args), cuda_graphs=not args.enforce_eager)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _apply_vllm_log(args):
    """Read ``--vllm-log`` and fill every setting the command line left unset from it (None without a log)."""
    if not args.vllm_log:
        return None
    from .plan.vllm_log import read_vllm_log

    log = read_vllm_log(args.vllm_log)
    if not (args.model_flag or args.model_pos) and log.model:
        args.model_pos = log.model
    for name, value in log.settings.items():
        if name == "enforce_eager":
            args.enforce_eager = args.enforce_eager or bool(value)
        elif name == "kv_dtype":
            args.kv_dtype = value if args.kv_dtype == "auto" else args.kv_dtype
        elif name == "block_size":
            args.block_size = value if args.block_size == 16 else args.block_size
        elif getattr(args, name, None) is None:
            setattr(args, name, value)
    return log


def cmd_plan(args) -> int:
    from .plan.memory import plan_memory

    log = _apply_vllm_log(args)
    model, gpu = _model_and_gpu(args)
    tp, pp = (1 if v is None else v for v in (args.tp, args.pp))
    plan = plan_memory(model, tp, pp, gpu, interconnect=args.interconnect, batch=args.batch, seq_len=args.seq_len,
                       **_plan_kwargs(args))
    rows = None
    if log is not None:
        from .plan.vllm_log import compare_with_plan

        rows = compare_with_plan(log, plan)
    if args.plot:
        from .cli_plots import plot_plan

        plot_plan(plan, args.plot)
    if args.json:
        out = plan.to_dict()
        if log is not None:
            out["vllm_log"] = {"version": log.version, "model": log.model, "settings": log.settings,
                               "rows": [r.to_dict() for r in rows]}
        _print_json(out)
    else:
        from .cli_render import render_plan

        render_plan(plan, plot=args.plot)
        if log is not None:
            from .cli_vllm_log import render_vllm_log

            render_vllm_log(log, rows)
    return 0


def cmd_scale(args) -> int:
    from .plan.scaling import scale

    if args.tp_given is not None:
        raise _UsageError(f"kvpool scale: --tp {args.tp_given} is not a scale option: scale compares the degrees of "
                          f"--tps (default 1,2,4,8); use --tps {args.tp_given} for that degree alone, or "
                          f"kvpool plan --tp {args.tp_given} for its memory plan")
    model, gpu = _model_and_gpu(args)
    try:
        tps = tuple(int(t) for t in args.tps.split(",") if t.strip())
    except ValueError:
        raise _UsageError(f"kvpool: --tps must be comma-separated integers, got {args.tps!r}") from None
    if not tps or any(t < 1 for t in tps):
        raise _UsageError(f"kvpool: --tps must list positive integers, got {args.tps!r}")
    result = scale(model, gpu, tps, seq_len=args.seq_len, batch=args.batch, interconnect=args.interconnect,
                   pp=args.pp, **_plan_kwargs(args))
    if args.plot:
        from .cli_plots import plot_scale

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
    links = None
    if args.interconnects is not None:
        links = tuple(x.strip() for x in args.interconnects.split(",") if x.strip())
        if not links:
            raise _UsageError(f"kvpool: --interconnects must list links (kvpool gpus), got {args.interconnects!r}")
    report = comm_report(model, gpu, args.tp, batch=args.batch, seq_len=args.seq_len, links=links,
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
    plan_flags = {"--gpu": args.gpu_flag, "--tp": args.tp, "--pp": args.pp, "--mem-fraction": args.mem_fraction}
    if args.model_flag:
        from .plan.memory import plan_memory

        plan = plan_memory(args.model_flag, 1 if args.tp is None else args.tp, 1 if args.pp is None else args.pp,
                           args.gpu_flag or "h100-sxm", mem_fraction=args.mem_fraction)
    elif any(v is not None for v in plan_flags.values()):
        given = ", ".join(k for k, v in plan_flags.items() if v is not None)
        raise _UsageError(f"kvpool diagnose: {given} describe the plan to compare with; give --model too")
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
        try:
            args = parser.parse_args(strip_vllm_noise(argv))
        except SystemExit as exc:  # --help and --version print, then exit: return their status instead
            return exc.code if isinstance(exc.code, int) else 0
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
