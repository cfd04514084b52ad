"""Check the planner against a real GPU: weights, activation peak, non-torch memory, free memory.

Builds Llama-3.1-8B from its preset config.json with transformers (random weights, nothing downloaded),
runs one prefill forward of ``--max-batched-tokens`` tokens and a sampler-sized LM-head pass, and prints
measured vs planned figures as JSON (also written to ``$OUT/plan_vs_gpu.json`` when ``OUT`` is set).

    PYTHONPATH=src python benchmarks/validate_plan_gpu.py --tokens 8192 --max-seqs 256

Note: transformers' Llama code is not vLLM's (separate q/k/v and gate/up projections, rotary copies),
so its activation peak is expected to sit above the plan's fused-kernel model; the gap is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tokens", default="2048,8192", help="comma-separated prefill sizes")
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--mem-fraction", type=float, default=0.9)
    args = ap.parse_args()

    import transformers

    from kvpool.plan import load_model_spec, plan_memory
    from kvpool.plan.model import PRESET_DIR

    dev = torch.device("cuda")
    torch.cuda.init()
    torch.zeros(1, device=dev)  # create the context
    free0, total = torch.cuda.mem_get_info()
    context = total - free0 - torch.cuda.memory_reserved()
    name = torch.cuda.get_device_name()

    with open(PRESET_DIR / f"{args.model}.json") as f:
        cfg = json.load(f)
    config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    torch.set_default_dtype(torch.float32)
    model.eval()
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated()

    runs = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        ids = torch.randint(0, config.vocab_size, (1, tokens), device=dev)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
            del out
        torch.cuda.synchronize()
        forward_peak = torch.cuda.max_memory_allocated() - base
        del ids

        # sampler: LM head over max_seqs rows, float32 logits, float32 probabilities
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            h = torch.randn(args.max_seqs, config.hidden_size, device=dev, dtype=torch.bfloat16)
            logits = model.lm_head(h).float()
            probs = torch.softmax(logits, dim=-1)
            del logits, probs, h
        torch.cuda.synchronize()
        sampler_peak = torch.cuda.max_memory_allocated() - base

        free1, _ = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        non_torch = total - free1 - reserved
        plan = plan_memory(args.model, tp=1, gpu="h100-sxm", gpu_mem_gib=total / GiB, mem_fraction=args.mem_fraction,
                           max_batched_tokens=tokens, max_seqs=args.max_seqs, cuda_graphs=False)
        act = plan.details["activation_bytes"]
        measured_kv = int(total * args.mem_fraction) - weights - max(forward_peak, sampler_peak) - non_torch
        runs.append({
            "tokens": tokens,
            "forward_peak_gib": {"measured": forward_peak / GiB, "plan": act["forward_peak"] / GiB},
            "sampler_peak_gib": {"measured": sampler_peak / GiB, "plan": act["sampler"] / GiB},
            "non_torch_gib": {"measured_after_run": non_torch / GiB, "measured_context_only": context / GiB,
                              "plan_overhead_without_graphs": plan.per_gpu["overhead_gib"]},
            "kv_cache_gib": {"measured_budget_left": measured_kv / GiB, "plan": plan.per_gpu["kv_cache_gib"]},
            "reserved_gib": reserved / GiB, "free_after_run_gib": free1 / GiB,
        })
    result = {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "model": args.model, "max_seqs": args.max_seqs, "build_s": round(build_s, 2), "total_gib": total / GiB,
        "weights_gib": {"measured": weights / GiB, "plan": plan.per_gpu["weights_gib"]},
        "spec_params": load_model_spec(args.model).num_parameters,
        "torch_params": sum(p.numel() for p in model.parameters()),
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "plan_vs_gpu.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
