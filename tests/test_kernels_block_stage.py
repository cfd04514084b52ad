"""stage_blocks / unstage_blocks (Triton) against their torch references: raw bytes of every block tensor,
block-major staging rows, ids checked in the wrapper and masked in the kernel (#14 item 4)."""
import pytest
import torch
from kernels_util import (
    DEVICES,
    FP8,
    same_bits,
    triton_backend,  # noqa: F401  (fixture)
)

from kvpool.errors import BlockIndexError, KernelError
from kvpool.kernels import reference, stage_blocks, unstage_blocks
from kvpool.kernels.block_stage import bytes_per_block


def _tensors(kind, num_blocks, device, gen):
    """Block tensors views of ONE random byte buffer, as PagedKVCache carves them (kind: the dtypes' mix)."""
    shapes = {  # (dtype, row shape) per tensor
        "bf16": [(torch.bfloat16, (4, 2, 16))] * 4,
        "fp8-scales": [(FP8, (4, 2, 16))] * 4 + [(torch.float32, (4, 2))] * 4,
        "mla": [(torch.bfloat16, (4, 1, 40))] * 2,
        "odd-bytes": [(FP8, (3,)), (FP8, (5,)), (torch.float16, (1,))],  # rows not a multiple of 2: int8 words
    }[kind]
    sizes = [num_blocks * torch.empty(s, dtype=d).numel() * d.itemsize for d, s in shapes]
    buf = torch.randint(0, 256, (sum(sizes),), generator=gen, dtype=torch.uint8).to(device)
    out, start = [], 0
    for (dtype, shape), n in zip(shapes, sizes):
        out.append(buf[start:start + n].view(dtype).view(num_blocks, *shape))
        start += n
    return out


KINDS = ["bf16", "fp8-scales", "mla", "odd-bytes"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("triton_backend")
def test_stage_and_unstage_match_reference(device, kind):
    gen = torch.Generator().manual_seed(KINDS.index(kind))
    tensors = _tensors(kind, 7, device, gen)
    width = bytes_per_block(tensors)
    staging = torch.zeros(4, width, dtype=torch.uint8, device=device)
    expect = staging.clone()
    ids = torch.tensor([6, 0, 3], dtype=torch.int32, device=device)

    stage_blocks(tensors, ids, staging)
    reference.stage_blocks_reference(tensors, ids, expect)
    assert torch.equal(staging, expect)
    start = 0  # the layout itself: row j = every tensor's row ids[j], back to back, in order
    for t in tensors:
        n = t[0].numel() * t.element_size()
        assert torch.equal(staging[1, start:start + n], t[0].reshape(-1).view(torch.uint8))
        start += n
    assert not staging[3].any()  # rows past n untouched

    targets = [t.clone() for t in tensors]
    want = [t.clone() for t in tensors]
    dst = [1, 5, 2]
    unstage_blocks(staging, targets, dst)
    reference.unstage_blocks_reference(staging, want, torch.tensor(dst))
    for got, ref, orig in zip(targets, want, tensors):
        assert same_bits(got, ref)
        assert same_bits(got[dst], orig[[6, 0, 3]])  # the blocks moved
        assert same_bits(got[[0, 3, 4, 6]], orig[[0, 3, 4, 6]])  # the others did not


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("triton_backend")
def test_kernel_masks_ids_outside_the_cache(device):
    """The kernel itself skips an id outside [0, num_blocks) (ids on a GPU are not checked by default)."""
    from kvpool.kernels.block_stage_kernel import launch_block_stage
    gen = torch.Generator().manual_seed(5)
    tensors = _tensors("fp8-scales", 5, device, gen)
    before = [t.clone() for t in tensors]
    staging = torch.full((3, bytes_per_block(tensors)), 7, dtype=torch.uint8, device=device)
    ids = torch.tensor([2, 5, -1], dtype=torch.int64, device=device)
    launch_block_stage(tensors, ids, staging, to_staging=True)
    assert (staging[1:] == 7).all() and not (staging[0] == 7).all()
    launch_block_stage(tensors, ids, staging, to_staging=False)  # scatter: rows 5 and -1 write nothing
    for got, orig in zip(tensors, before):
        assert same_bits(got, orig)


@pytest.mark.parametrize("call", ["stage", "unstage"])
@pytest.mark.parametrize("ids,error,fragment", [
    ([0, 9], BlockIndexError, "block_ids[1]=9 is outside [0, 6)"),
    (torch.tensor([-1, 2]), BlockIndexError, "block_ids[0]=-1 is outside [0, 6)"),
    ([0, 1, 2, 3, 4], KernelError, "5 block ids but staging holds 4 rows"),
    ([1.0], KernelError, "must hold integer block ids"),
    (torch.tensor([[1]]), KernelError, "1-D int32/int64"),
])
def test_bad_ids_refused_with_state_unchanged(call, ids, error, fragment):
    gen = torch.Generator().manual_seed(9)
    tensors = _tensors("fp8-scales", 6, "cpu", gen)
    staging = torch.randint(0, 256, (4, bytes_per_block(tensors)), generator=gen, dtype=torch.uint8)
    before, staged = [t.clone() for t in tensors], staging.clone()
    with pytest.raises(error) as err:
        stage_blocks(tensors, ids, staging) if call == "stage" else unstage_blocks(staging, tensors, ids)
    assert fragment in str(err.value)
    assert torch.equal(staging, staged) and all(same_bits(a, b) for a, b in zip(tensors, before))


def test_unstage_refuses_a_repeated_block():
    tensors = _tensors("bf16", 6, "cpu", torch.Generator().manual_seed(1))
    staging = torch.zeros(2, bytes_per_block(tensors), dtype=torch.uint8)
    with pytest.raises(BlockIndexError, match="repeat a block"):
        unstage_blocks(staging, tensors, [3, 3])
    stage_blocks(tensors, [3, 3], staging)  # a gather may read one block twice
    assert torch.equal(staging[0], staging[1])


@pytest.mark.parametrize("make,fragment", [
    (lambda ts, st: ([ts[0].transpose(1, 2)] + ts[1:], st), "must be contiguous"),
    (lambda ts, st: (ts, st[:, 1:]), "contiguous 2-D uint8"),
    (lambda ts, st: (ts, st[:, :-1].contiguous()), "staging rows hold"),
    (lambda ts, st: (ts, st.view(torch.int16)), "contiguous 2-D uint8"),
    (lambda ts, st: (ts[:1] + [ts[1][:3]], st), "has 3 blocks but tensors[0] has 6"),
    (lambda ts, st: ([], st), "non-empty list"),
])
def test_bad_tensors_refused(make, fragment):
    tensors = _tensors("bf16", 6, "cpu", torch.Generator().manual_seed(2))
    staging = torch.zeros(2, bytes_per_block(tensors), dtype=torch.uint8)
    ts, st = make(tensors, staging)
    for call in (lambda: stage_blocks(ts, [0], st), lambda: unstage_blocks(st, ts, [0])):
        with pytest.raises(KernelError, match=fragment.replace("[", r"\[")):
            call()


def test_custom_ops_are_registered():
    tensors = _tensors("mla", 4, "cpu", torch.Generator().manual_seed(3))
    staging = torch.zeros(2, bytes_per_block(tensors), dtype=torch.uint8)
    torch.ops.kvpool.stage_blocks(tensors, torch.tensor([3, 1]), staging)
    copies = [t.clone() for t in tensors]
    torch.ops.kvpool.unstage_blocks(staging, copies, torch.tensor([0, 2]))
    for got, orig in zip(copies, tensors):
        assert same_bits(got[[0, 2]], orig[[3, 1]])
