"""XNNPACK's depthwise kernels on ConvFormer's 7x7 depthwise convolution, fp32 against int8.

Why the ExecuTorch int8 scheme keeps depthwise convolutions float, and why ``split_depthwise`` splits
them. One ``SepConv``-sized depthwise convolution (stage 1 of ConvFormer-S18 by default: 128 channels at
56x56, batch 1) is lowered four ways, each its own ``.pte``: fp32 or int8 (executorch's
``XNNPACKQuantizer``, symmetric per-channel), as one 7x7 convolution or split into 7x3 + two dilated 7x2
parts. Each program runs in the ExecuTorch runtime with ETDump on, at ``--threads`` threads; the table
sums the median time of each XNNPACK operator kind::

    python benchmarks/xnnpack_depthwise.py [--channels 128 --size 56 --threads 1 --runs 20]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from mf_edge.converters.executorch.deployment_rewrites import SplitDepthwiseConv


def depthwise(channels: int, split: bool) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels, bias=False)
    return (SplitDepthwiseConv(conv) if split else conv).eval()


def quantized(module: nn.Module, example: tuple[torch.Tensor]) -> nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
    prepared(*example)
    return convert_pt2e(prepared)


def lower(module: nn.Module, example: tuple[torch.Tensor], path: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = to_edge_transform_and_lower(torch.export.export(module, example),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    return path


def operator_times(pte: Path, example: tuple[torch.Tensor], runs: int) -> dict[str, float]:
    """Median ms per XNNPACK operator kind (``Convolution (NHWC, F32) DWConv``, ``Add (ND)``...), summed."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    program = portable_lib._load_for_executorch(str(pte), enable_etdump=True)
    for _ in range(runs):
        program.forward(example)
    etdump = pte.with_suffix(".etdp")
    program.write_etdump_result_to_file(str(etdump))
    totals: dict[str, float] = collections.defaultdict(float)
    for _, row in Inspector(etdump_path=str(etdump)).to_dataframe().iterrows():
        name = row["event_name"]
        if " #" in name:
            totals[name.split(" #")[0]] += statistics.median(row["raw"])
        elif name == "DELEGATE_CALL":
            totals["(delegate call)"] = statistics.median(row["raw"])
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(args.threads)
    example = (torch.randn(1, args.channels, args.size, args.size),)
    print(f"depthwise 7x7, {args.channels} channels at {args.size}x{args.size}, {args.threads} thread(s), "
          f"median of {args.runs} runs\n")
    print("| program | XNNPACK operator | ms |\n|---|---|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for precision in ("fp32", "int8"):
            for split in (False, True):
                module = depthwise(args.channels, split)
                if precision == "int8":
                    module = quantized(module, example)
                label = f"{precision}, {'split 7x3 + 7x2 + 7x2' if split else 'one 7x7'}"
                pte = lower(module, example, Path(folder) / f"{precision}-{split}.pte")
                for operator, ms in operator_times(pte, example, args.runs).items():
                    print(f"| {label} | {operator} | {ms:.3f} |")


if __name__ == "__main__":
    main()
