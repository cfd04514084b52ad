"""Run every kvpool kernel once on a small case under ``compute-sanitizer --tool memcheck``.

    python benchmarks/sanitize_kernels.py --out benchmarks/out/sanitizer.json   # driver
    python benchmarks/sanitize_kernels.py --run                                  # the kernels (child)

The driver runs the child under memcheck with PyTorch's caching allocator off
(``PYTORCH_NO_CUDA_MEMORY_CACHING=1``), so every tensor is its own allocation and a read or write
past one is reported; it writes the error count and the sanitizer's tail to a JSON file. Block
tables carry -1 padding past each sequence: the kernels must never read what those entries name.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# new tokens per sequence of the attention cases (seq_lens [1, 16, 17, 300, 0]): a whole prompt, chunks not
# aligned to blocks, an empty row; the mixed call also takes decode rows (one new token)
PREFILL_Q_LENS, MIXED_Q_LENS = [1, 16, 9, 40, 0], [1, 1, 9, 1, 0]


def _attention_checks(k, v, table, seq_lens, ks, vs) -> list:
    """paged_prefill and paged_attention (issue 15) against the gather + causal-attention reference."""
    import torch

    import kvpool
    from kvpool.kernels import reference
    checks = []
    kf, vf, cu_k = reference.gather_kv_reference(k, v, table, seq_lens, ks, vs, out_dtype=torch.float32)
    for name, q_lens in (("paged_prefill", PREFILL_Q_LENS), ("paged_attention", MIXED_Q_LENS)):
        fn = getattr(kvpool, name, None)
        if fn is None:
            checks.append((f"{name} (not on this tree: skipped)", k.dtype, True))
            continue
        qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(k.device)
        q = torch.randn(sum(q_lens), k.shape[2] * 4, k.shape[3], device=k.device, dtype=torch.bfloat16)
        for window, cap in ((None, None), (40, 30.0)):
            out = fn(q, k, v, table, qsl, seq_lens, 0.1, sliding_window=window, logit_soft_cap=cap,
                     k_scale=ks, v_scale=vs)
            ref = reference.prefill_attention_reference(q.float(), kf, vf, qsl, cu_k, 0.1, window, cap)
            checks.append((name, k.dtype, bool(torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2))))
    return checks


def run_kernels() -> None:
    import torch

    from kvpool.kernels import copy_blocks, gather_kv, paged_decode, reference, write_kv

    torch.manual_seed(0)
    dev = os.environ.get("KVPOOL_SANITIZE_DEVICE", "cuda")  # "cpu" + TRITON_INTERPRET=1: a dry run of the script
    bs, heads, d = 16, 2, 128
    lens = [1, 16, 17, 300, 0]
    need = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(need) + 2
    table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n].to(torch.int32)
        at += n
    table, seq_lens = table.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
    checks = []
    for kv_dtype, scales in ((torch.bfloat16, None), (torch.float8_e4m3fn, "token_head"),
                             (torch.float8_e4m3fn, "head")):
        k = torch.zeros(num_blocks, bs, heads, d, dtype=kv_dtype, device=dev)
        v = torch.zeros_like(k)
        if scales == "token_head":
            ks, vs = (torch.zeros(num_blocks, bs, heads, device=dev) for _ in range(2))
        elif scales == "head":
            ks, vs = (torch.full((heads,), 0.02, device=dev) for _ in range(2))
        else:
            ks = vs = None
        slots = (table.long()[:, :, None] * bs + torch.arange(bs, device=dev)).view(len(lens), -1)
        slots = torch.cat([slots[b, :n] for b, n in enumerate(lens)]).to(torch.int32)
        slots[5] = -1
        new_k = torch.randn(slots.numel(), heads, d, device=dev, dtype=torch.bfloat16)
        write_kv(new_k, new_k * 0.5, k, v, slots, ks, vs)
        kk, vv, cu = gather_kv(k, v, table, seq_lens, ks, vs)
        kr, _, _ = reference.gather_kv_reference(k, v, table, seq_lens, ks, vs)
        checks.append(("gather", kv_dtype, torch.equal(kk, kr)))
        q = torch.randn(len(lens), heads * 4, d, device=dev, dtype=torch.bfloat16)
        for window, cap in ((None, None), (40, 30.0)):
            out = paged_decode(q, k, v, table, seq_lens, d ** -0.5, window, cap, ks, vs)
            ref = reference.paged_decode_reference(q, k, v, table, seq_lens, d ** -0.5, window, cap, ks, vs)
            checks.append(("decode", kv_dtype, bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2))))
        checks += _attention_checks(k, v, table, seq_lens, ks, vs)
        caches = [k, v] + ([ks, vs] if scales == "token_head" else [])
        spare = perm[at:at + 2].to(dev)  # the two blocks no table holds: copy-on-write targets never alias a source
        copy_blocks(caches, table[3, :2], spare)
        checks.append(("stage_blocks", kv_dtype, _stage_round_trip(caches, num_blocks, dev)))
    # the split + merge path: one long sequence, few programs
    from kvpool.kernels.decode import paged_decode_triton
    out = paged_decode_triton(q, k, v, table, seq_lens, 0.1, k_scale=ks, v_scale=vs, num_splits=5)
    ref = reference.paged_decode_reference(q, k, v, table, seq_lens, 0.1, k_scale=ks, v_scale=vs)
    checks.append(("decode-split", k.dtype, bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2))))
    try:  # a failure here must not hide the kernels' own results above
        checks += run_elastic(dev)
    except Exception as e:  # noqa: BLE001
        print(f"sanitize_kernels: the elastic case failed: {type(e).__name__}: {e}")
        checks.append(("elastic", "setup", False))
    if dev == "cuda":
        torch.cuda.synchronize()
    bad = [c for c in checks if not c[2]]
    print(f"sanitize_kernels: {len(checks)} result checks, {len(bad)} wrong {bad}")
    if bad:
        sys.exit(2)


def _stage_round_trip(caches, num_blocks: int, dev: str) -> bool:
    """The host tier's gather/scatter at the pool's edges, plus an id past the end (masked in the kernel)."""
    import torch

    from kvpool.kernels import reference, stage_blocks, unstage_blocks
    from kvpool.kernels.block_stage import bytes_per_block
    from kvpool.kernels.block_stage_kernel import launch_block_stage

    staging = torch.zeros(3, bytes_per_block(caches), dtype=torch.uint8, device=dev)
    expect = staging.clone()
    ids = torch.tensor([num_blocks - 1, 0, 1], device=dev)
    stage_blocks(caches, ids, staging)
    reference.stage_blocks_reference(caches, ids, expect)
    unstage_blocks(staging, caches, torch.tensor([2, 3, num_blocks - 2], device=dev))
    before = staging.clone()
    launch_block_stage(caches, torch.tensor([0, num_blocks, -1], device=dev), staging, to_staging=True)
    return bool(torch.equal(before, expect) and torch.equal(staging[1:], before[1:]))


def run_elastic(dev: str) -> list:
    """Issue 16: grow -> decode -> shrink (a held block moved down) -> sleep -> wake -> decode on an elastic pool.

    Decode reads only blocks the tables name, all below ``num_blocks``: memcheck sees no access to an
    unmapped chunk, and the relocated block reads back as it was written."""
    import torch

    from kvpool.elastic import ElasticKVPool
    from kvpool.kernels import paged_decode, reference, write_kv

    tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2,
            "intermediate_size": 512, "vocab_size": 128, "torch_dtype": "bfloat16", "max_position_embeddings": 8192}
    pool = ElasticKVPool.for_shard(tiny, 4096, 16, 0, 1, dev, num_blocks=8, max_seqs=2)
    checks = []

    def decode(seq):
        b = pool.tables.batch([seq])  # every token computed: a zero-token batch, its table and lens
        k, v = pool.cache.k_caches[0], pool.cache.v_caches[0]
        q = torch.ones(1, 4, 64, device=dev, dtype=torch.bfloat16)
        out = paged_decode(q, k, v, b.block_table, b.seq_lens, 0.125)
        ref = reference.paged_decode_reference(q, k, v, b.block_table, b.seq_lens, 0.125)
        return bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)), out

    pool.grow(4000)  # rows of 4 KiB, 512 blocks a chunk: 8 chunks mapped in each of the 4 regions
    pool.tables.add("first", 3000)  # 188 blocks, the lowest ids
    pool.tables.add("low", 40)  # 3 blocks above them
    for seq in ("first", "low"):
        b = pool.tables.batch([seq])
        new = torch.randn(b.slot_mapping.numel(), 2, 64, device=dev, dtype=torch.bfloat16)
        write_kv(new, new, pool.cache.k_caches[0], pool.cache.v_caches[0], b.slot_mapping)
        pool.tables.mark_computed(b)
    ok, before = decode("low")
    checks.append(("elastic-decode-after-grow", "bf16", ok))
    pool.tables.free("first")
    released = pool.shrink(pool.num_blocks - 4)  # "low"'s blocks above the new top move down, 7 chunks go
    ok, after = decode("low")
    checks.append(("elastic-shrink-moves-held-blocks", "bf16", ok and released > 0 and torch.equal(before, after)))
    pool.tables.free("low")
    pool.sleep()
    pool.wake()
    pool.tables.add("again", 20)
    ok, _ = decode("again")
    checks.append(("elastic-decode-after-wake", "bf16", ok))
    return checks


def drive(out: Path, timeout: int) -> int:
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer", "/opt/cuda/bin/compute-sanitizer") if Path(p).exists()),
        None)
    result = {"tool": tool}
    if tool is None:
        result.update(summary="skipped: compute-sanitizer not found on this machine", errors=None)
    else:
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        cmd = [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, __file__, "--run"]
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            text = proc.stdout + proc.stderr
            m = re.search(r"ERROR SUMMARY: (\d+) error", text)
            errors = int(m.group(1)) if m else None
            checks = re.search(r"sanitize_kernels: .*", text)
            result.update(returncode=proc.returncode, errors=errors, tail=text[-3000:],
                          summary=(f"{errors} errors" if errors is not None else f"no summary (rc {proc.returncode})")
                          + (f"; {checks.group(0)}" if checks else ""))
        except subprocess.TimeoutExpired:
            result.update(errors=None, summary=f"timed out after {timeout} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("compute-sanitizer memcheck:", result["summary"])
    if result.get("tail") and result.get("errors"):
        print(result["tail"])
    return 0 if result.get("errors") in (0, None) else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="kvpool kernels under compute-sanitizer memcheck")
    ap.add_argument("--run", action="store_true", help="run the kernels (the sanitized child)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sanitizer.json"))
    ap.add_argument("--timeout", type=int, default=100)
    a = ap.parse_args()
    if a.run:
        run_kernels()
    else:
        sys.exit(drive(Path(a.out), a.timeout))
