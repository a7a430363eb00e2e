"""Can a kernel read cold experts where they lie in host RAM? A probe for the next offload design.

    python scripts/zero_copy.py [--dry]      # prints one JSON object

Today an offloaded decode step stops at every MoE layer: the host reads the routing (a sync), copies the
missed experts into cache slots, launches the experts, then replays the next graph segment (on an H200 at
16 GiB the GPU was busy 5.9 of the 19.3 ms a token took). If a kernel can read a pinned host row in place
over PCIe (mapped memory: with unified addressing, cudaHostAlloc'd and cudaHostRegister'd memory is mapped,
and on most Linux machines the host pointer is the device pointer), the MoE kernels can take one address a
(layer, expert) -- a device row or a host row -- and the whole offloaded step becomes one graph with one
sync a token, the cache filling behind it on a side stream.

This measures what that rests on, with one Triton kernel that gathers rows through a table of addresses:
  * `*_equal`: the rows arrive intact from PyTorch's pinned memory and from localrun's own pinned rows
    (`experts.host_rows`, registered with cudaHostRegister as the ExpertStore's host rows are);
  * `*_bytes_per_s`: the gather from host rows (in place, over PCIe) against copying the same rows with
    `copy_(non_blocking=True)` a row at a time (what `_Copier` does) and against the gather from device rows;
  * `one_token_*_us`: 8 experts of 26B-A4B's size (3.35 MB), the misses of one layer at worst.
gpu_check runs it in a child process (`zero_copy` in its kernels step): a device that cannot read host memory
faults, and a fault would end the check's own CUDA context. --dry: the interpreter on the CPU, small rows,
equality only (no timings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 2048  # int32 words a program moves: 8 KiB, 16 words (four 16-byte loads) a thread at 4 warps
EXPERT_BYTES = 409 * 4 * BLOCK  # 3.35 MB, one 26B-A4B NF4 expert (gate_up and down codes, absmax), in whole blocks


def gather_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_rows_kernel(table_ptr, out_ptr, row_words, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        src = tl.load(table_ptr + row).to(tl.pointer_type(tl.int32))  # a device or a mapped host address
        src = tl.multiple_of(src, 16)  # rows start 16-byte aligned and hold whole blocks: 16-byte loads, no mask
        words = chunk * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + row.to(tl.int64) * row_words + words, tl.load(src + words))

    return _gather_rows_kernel


def address_table(rows: list, device):
    """The device table of rows' addresses (uint8 tensors of one length, whole blocks of 4 x BLOCK bytes,
    16-byte aligned, anywhere a kernel can address: device memory or mapped host memory)."""
    import torch

    nbytes = rows[0].numel()
    if nbytes % (4 * BLOCK) or any(r.numel() != nbytes or r.data_ptr() % 16 for r in rows):
        raise ValueError(f"gather takes 16-byte aligned rows of one length in whole {4 * BLOCK}-byte blocks")
    return torch.tensor([r.data_ptr() for r in rows], dtype=torch.int64).to(device)


def gather(table, out, kernel):
    """The rows `table` addresses into out [rows, row bytes] on the device, in one launch."""
    import torch
    import triton

    words = out.shape[1] // 4
    kernel[(table.numel(), triton.cdiv(words, BLOCK))](table, out.view(torch.int32), words, BLOCK=BLOCK)
    return out


def _sources(n_rows: int, nbytes: int, pin: bool) -> dict:
    """name -> n_rows host rows of nbytes filled with distinct bytes: PyTorch's pinned memory, localrun's."""
    import torch

    from localrun.experts import host_rows

    pattern = (torch.arange(n_rows * nbytes, dtype=torch.int64) * 7 % 251).to(torch.uint8).view(n_rows, nbytes)
    torch_pinned = pattern.pin_memory() if pin else pattern.clone()
    registered = host_rows(n_rows, nbytes, pin)
    registered.copy_(pattern)
    return {"torch_pinned": torch_pinned, "host_rows": registered}


def probe(dry: bool) -> dict:
    import torch

    from gpu_check import best_seconds  # this script's folder is first on sys.path

    dev = torch.device("cpu" if dry else "cuda")
    n_rows, nbytes = (3, 2 * 4 * BLOCK) if dry else (80, EXPERT_BYTES)  # 268 MB: past any L2
    kernel = gather_kernel()
    sources = _sources(n_rows, nbytes, pin=not dry)
    out: dict = {"rows": n_rows, "row_bytes": nbytes}
    tables = {name: address_table(list(host), dev) for name, host in sources.items()}
    for name, host in sources.items():
        got = gather(tables[name], torch.zeros(n_rows, nbytes, dtype=torch.uint8, device=dev), kernel)
        out[f"{name}_equal"] = bool(torch.equal(got.cpu(), host))
    if dry:
        return out
    host = sources["host_rows"]
    device_rows = host.to(dev)
    dst = torch.empty(n_rows, nbytes, dtype=torch.uint8, device=dev)
    total = n_rows * nbytes

    def copies(rows):
        for i, row in enumerate(rows):
            dst[i].copy_(row, non_blocking=True)

    on_device = address_table(list(device_rows), dev)
    ways = {"zero_copy_host_rows": lambda: gather(tables["host_rows"], dst, kernel),
            "zero_copy_torch_pinned": lambda: gather(tables["torch_pinned"], dst, kernel),
            "copy_a_row_at_a_time": lambda: copies(host),
            "gather_device_rows": lambda: gather(on_device, dst, kernel)}
    for name, fn in ways.items():
        out[f"{name}_bytes_per_s"] = total / best_seconds(fn, 5, dev)
    eight = tables["host_rows"][:8]
    out["one_token_zero_copy_8_experts_us"] = best_seconds(lambda: gather(eight, dst[:8], kernel), 20, dev) * 1e6
    out["one_token_copy_8_experts_us"] = best_seconds(lambda: copies(host[:8]), 20, dev) * 1e6
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="the interpreter on the CPU: equality only")
    args = parser.parse_args(argv)
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    print(json.dumps(probe(args.dry)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
