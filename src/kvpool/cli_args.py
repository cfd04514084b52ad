"""The ``kvpool`` command's argument parser: each subcommand gets the flags it uses, each flag a help text.

Flags shared by several subcommands are defined once, in groups (model and GPU, serving settings,
explicit reservations, NCCL, output); a subcommand that would ignore a flag does not offer it (``comm``
has no ``--plot`` or ``--pp``; ``scale`` compares ``--tps`` and refuses ``--tp``). vLLM's flag names are
accepted as aliases, and its serve flags that do not change memory are dropped before parsing.
"""
from __future__ import annotations

import argparse

from . import __version__


class _UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# vLLM serve flags that do not change memory: accepted and ignored so a pasted command line works.
_VLLM_IGNORED_WITH_VALUE = ("--port", "--host", "--served-model-name", "--api-key", "--seed", "--swap-space",
                            "--download-dir", "--tokenizer", "--revision", "--load-format", "--uvicorn-log-level")
_VLLM_IGNORED_FLAGS = ("--trust-remote-code", "--enable-prefix-caching", "--no-enable-prefix-caching",
                       "--disable-log-requests", "--disable-log-stats", "--enable-chunked-prefill")


def _add_target(p: argparse.ArgumentParser, gpu_default: str = "h100-sxm") -> None:
    g = p.add_argument_group("model and GPU")
    g.add_argument("model_pos", nargs="?", metavar="MODEL",
                   help="model preset (kvpool models), or a config.json file or its folder")
    g.add_argument("gpu_pos", nargs="?", metavar="GPU", help=f"GPU preset (kvpool gpus; default {gpu_default})")
    g.add_argument("--model", dest="model_flag", metavar="MODEL", help="same as MODEL (as vllm serve takes it)")
    g.add_argument("--gpu", dest="gpu_flag", metavar="GPU", help="same as GPU")
    g.add_argument("--gpu-mem-gib", type=float, metavar="GIB", help="the GPU's memory in GiB instead of the preset's")
    p.set_defaults(gpu_default=gpu_default)


def _add_tp(g, default: int, what: str, unset: bool = False) -> None:
    """``--tp``; ``unset``: its value stays None when not given (the caller applies ``default``)."""
    g.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp", type=int, default=None if unset else default,
                   metavar="N", help=f"tensor-parallel degree: {what} (default {default})")


def _add_pp(g, unset: bool = False) -> None:
    g.add_argument("--pp", "--pipeline-parallel-size", "-pp", dest="pp", type=int, default=None if unset else 1,
                   metavar="N", help="pipeline-parallel degree (default 1); the tightest stage decides the block count")
    g.add_argument("--pp-interconnect", metavar="LINK",
                   help="link between pipeline stages (default: the GPU's link within 8 GPUs, else ib-ndr)")


def _add_memory_args(p: argparse.ArgumentParser, max_model_len: bool = True) -> None:
    from .plan.dtypes import KV_DTYPE_NAMES, SERVING_DTYPE_NAMES
    from .plan.kv import FP8_SCALE_MODES

    g = p.add_argument_group("serving settings (vLLM's flag names are accepted too)")
    g.add_argument("--dtype", default=None, help=" | ".join(("auto",) + SERVING_DTYPE_NAMES)
                   + " (default: the checkpoint's; fp32 is served as bf16)")
    g.add_argument("--kv-dtype", "--kv-cache-dtype", dest="kv_dtype", default="auto",
                   help=" | ".join(("auto",) + KV_DTYPE_NAMES) + " (default auto: the serving dtype; fp8 is e4m3)")
    g.add_argument("--fp8-scales", default="per_token_head", choices=FP8_SCALE_MODES,
                   help="scale layout of an fp8 KV cache: per_token_head (default; a float32 per token and KV head, "
                        "in the pool), per_head (one per KV head, outside the pool), per_tensor (one per layer and K/V "
                        "tensor, outside the pool: vLLM's layout and figure) or none")
    g.add_argument("--block-size", type=int, default=16, metavar="TOKENS",
                   help="tokens per KV block, a power of two (default 16, as vLLM)")
    if max_model_len:
        g.add_argument("--max-model-len", type=int, metavar="TOKENS",
                       help="longest request in tokens, for the concurrency figure (default: the model's "
                            "max_position_embeddings)")
    g.add_argument("--max-batched-tokens", "--max-num-batched-tokens", dest="max_batched_tokens", type=int,
                   metavar="TOKENS", help="largest prefill step in tokens, sizes the activation peak (default: vLLM "
                        "serve's, 8192 on GPUs of 70 GiB or more except A100, else 2048)")
    g.add_argument("--max-seqs", "--max-num-seqs", dest="max_seqs", type=int, metavar="N",
                   help="most sequences per step, sizes the sampler (default: vLLM serve's, 1024 on GPUs of 70 GiB or "
                        "more except A100, else 256)")
    g.add_argument("--mem-fraction", "--gpu-memory-utilization", dest="mem_fraction", type=float, metavar="F",
                   help="fraction of GPU memory the server may use, in (0, 1] (vLLM semantics; default 0.9)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, so no graph pool (vLLM flag)")
    g.add_argument("--interconnect", metavar="LINK",
                   help="nvlink3 | nvlink4 | nvlink5 | pcie4 | pcie5 | ib-hdr | ib-ndr (default: the GPU's)")
    r = p.add_argument_group("explicit per-GPU reservations (each replaces its computed value)")
    r.add_argument("--weights-gib", type=float, metavar="GIB", help="reserve this for weights")
    r.add_argument("--activation-gib", type=float, metavar="GIB", help="reserve this for activations")
    r.add_argument("--comm-gib", type=float, metavar="GIB", help="reserve this for communication buffers")
    r.add_argument("--overhead-gib", type=float, metavar="GIB", help="reserve this for the non-torch memory vLLM's profile run adds besides "
                   "communication (lazily loaded kernels)")
    r.add_argument("--headroom", dest="headroom_gib", type=float, metavar="GIB", help="keep this many GiB free")
    r.add_argument("--cuda-context-mib", type=int, metavar="MIB", help="measured non-torch MiB after a forward at tp 1 (CUDA context + kernels); "
                   "its context part exists before vLLM's snapshot")
    n = p.add_argument_group("NCCL (default: the NCCL_* environment, else NCCL's defaults)")
    n.add_argument("--nccl-buffsize", type=int, metavar="BYTES", help="NCCL_BUFFSIZE (default 4 MiB)")
    n.add_argument("--nccl-channels", type=int, metavar="N",
                   help="NCCL's collective channels, NCCL_MAX_NCHANNELS (default 24 on NVLink, 2 on PCIe)")
    n.add_argument("--nccl-proto", metavar="PROTOS", help="NCCL_PROTO, e.g. ^LL128 (default LL,LL128,Simple)")
    n.add_argument("--nvls", dest="nvls", action="store_true", default=None,
                   help="count NVLink SHARP buffers (default: on NVLink 4/5 with more than 2 ranks)")
    n.add_argument("--no-nvls", dest="nvls", action="store_false", help="do not count NVLS buffers")
    n.add_argument("--staging-layers", type=int, metavar="N",
                   help="all-reduce staging buffers kept: 1 (default, reused) or the number of layers")


def _add_output(p: argparse.ArgumentParser, plot: str | None = None) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")
    if plot:
        g.add_argument("--plot", metavar="FILE.png", help=f"also draw {plot} (matplotlib)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory plan and KV capacity",
                       description="Where each GPU's memory goes (weights, activations, NCCL, CUDA context) and "
                                   "what is left for the KV cache: blocks, tokens, concurrency; with --batch and "
                                   "--seq-len, whether that workload fits.")
    _add_target(p)
    g = p.add_argument_group("parallelism and workload")
    _add_tp(g, 1, "GPUs that split every layer", unset=True)  # unset: a --vllm-log's degree fills it
    _add_pp(g, unset=True)
    g.add_argument("--batch", type=int, metavar="N", help="target batch: check it fits (with --seq-len)")
    g.add_argument("--seq-len", type=int, metavar="TOKENS", help="target tokens per sequence (with --batch)")
    _add_memory_args(p)
    p.add_argument_group("host tier").add_argument(
        "--host-kv-gib", type=float, metavar="GIB",
        help="pinned host memory per GPU for the host KV tier (evicted prefix blocks kept on the host): report its "
             "blocks, tokens and bytes (JSON: kv_cache.host_tier)")
    _add_output(p, plot="one stacked bar of memory per GPU")
    p.add_argument_group("compare with vLLM").add_argument(
        "--vllm-log", metavar="FILE",
        help="a `vllm serve` start-up log: plan with its settings (flags given here win) and print each figure it "
             "logged (weights, KV GiB, tokens, concurrency; torch peak and non-torch at debug level) beside the plan's")


def _add_scale(sub) -> None:
    p = sub.add_parser("scale", help="memory, capacity and speed at TP = 1, 2, 4, 8",
                       description="The same model at several tensor-parallel degrees: memory and KV capacity per "
                                   "GPU, the batch that fits, roofline decode tokens/s, latency, prefill time, "
                                   "speedup and efficiency.")
    _add_target(p)
    g = p.add_argument_group("degrees and workload")
    g.add_argument("--tps", default="1,2,4,8", metavar="LIST", help="comma-separated TP degrees (default 1,2,4,8)")
    g.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp_given", help=argparse.SUPPRESS)
    _add_pp(g)
    g.add_argument("--seq-len", type=int, default=4096, metavar="TOKENS",
                   help="tokens per sequence (default 4096)")
    g.add_argument("--batch", type=int, metavar="N", help="run this batch (default: the largest that fits, "
                                                          "capped by --max-seqs)")
    _add_memory_args(p)
    _add_output(p, plot="decode tokens/s and efficiency against the TP degree")


def _add_comm(sub) -> None:
    p = sub.add_parser("comm", help="NCCL buffers, all-reduce cost, interconnect comparison",
                       description="Communication under tensor parallelism: NCCL's buffer memory per GPU, "
                                   "all-reduces per forward pass, and per interconnect the all-reduce time, its "
                                   "share of a decode step and the decode rate.")
    _add_target(p)
    g = p.add_argument_group("parallelism and workload")
    _add_tp(g, 4, "GPUs sharing the all-reduces, 2 or more")
    g.add_argument("--batch", type=int, default=32, metavar="N", help="decode batch (default 32)")
    g.add_argument("--seq-len", type=int, default=4096, metavar="TOKENS", help="tokens per sequence (default 4096)")
    g.add_argument("--interconnects", default=None, metavar="LIST",
                   help="comma-separated links to compare (default: the GPU's, then every intra-node link)")
    _add_memory_args(p, max_model_len=False)
    _add_output(p)


def _add_diagnose(sub) -> None:
    p = sub.add_parser("diagnose", help="name the problem in per-GPU memory snapshots",
                       description="Read per-rank memory snapshots and name what they show (a heavy rank 0, "
                                   "fragmentation, NCCL or graph memory, no free memory), each with its figures and "
                                   "the fix. Exit status 1 when an error is found.")
    p.add_argument("file", help="JSON list of per-rank torch figures, or nvidia-smi CSV")
    g = p.add_argument_group("compare with a plan")
    g.add_argument("--model", dest="model_flag", metavar="MODEL", help="also compare with this model's plan")
    g.add_argument("--gpu", dest="gpu_flag", metavar="GPU", help="GPU of that plan (default h100-sxm)")
    g.add_argument("--tp", "--tensor-parallel-size", "-tp", dest="tp", type=int, metavar="N",
                   help="tensor-parallel degree of that plan (default 1)")
    g.add_argument("--pp", "--pipeline-parallel-size", "-pp", dest="pp", type=int, metavar="N",
                   help="pipeline-parallel degree of that plan (default 1)")
    g.add_argument("--mem-fraction", "--gpu-memory-utilization", dest="mem_fraction", type=float, metavar="F",
                   help="vLLM gpu_memory_utilization of that plan (default 0.9)")
    _add_output(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvpool", description="Plan, size and check a paged KV cache under tensor parallelism.")
    parser.add_argument("-V", "--version", action="version", version=f"kvpool {__version__}",
                        help="print kvpool's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_plan(sub)
    _add_scale(sub)
    _add_comm(sub)
    _add_diagnose(sub)
    for name, text in (("models", "built-in model presets"), ("gpus", "GPU and interconnect presets")):
        p = sub.add_parser(name, help=text, description=f"List the {text} with their key figures.")
        _add_output(p)
    return parser


def strip_vllm_noise(argv: list[str]) -> list[str]:
    """``argv`` without the vLLM serve flags (and their values) that do not change memory."""
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
