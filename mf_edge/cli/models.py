"""``mf-edge models`` and ``mf-edge info``: the zoo as a table, one model's metadata."""

from __future__ import annotations

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from mf_edge.cli import app
from mf_edge.errors import UserError
from mf_edge.models import get_model_info, list_models
from mf_edge.models.stats import ModelStats, zoo_stats
from mf_edge.models.zoo import WEIGHTS_LICENSE, ModelInfo

TABLE_WIDTH = 80  # the zoo table fits in this many columns


def _millions(stats: ModelStats) -> str:
    """``11.9`` or, with frozen parameters (RandFormer), ``11.9+0.2`` like the official table."""
    trainable = (stats.params - stats.frozen_params) / 1e6
    return f"{trainable:.1f}+{stats.frozen_params / 1e6:.1f}" if stats.frozen_params else f"{trainable:.1f}"


@app.command("models")
def models_command(
    pattern: str = typer.Argument(None, help="Shell-style filter, e.g. 'caformer_*'."),
) -> None:
    """List the model zoo: name, parameters, MACs, official top-1 and input size.

    Example: mf-edge models 'caformer_*'
    """
    names = list_models(pattern)
    if not names:
        raise UserError(f"no model matches {pattern!r}; run `mf-edge models` for the full list.")
    table = Table(title="MetaFormer zoo", caption="params counted here; MACs and top-1 from the official "
                  "tables (ImageNet-1k val)", box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True, min_width=max(len(n) for n in names))
    for column in ("params M", "MACs G", "top-1 %", "size", "pretrain"):
        table.add_column(column, justify="right", no_wrap=True)
    for name in names:
        info = get_model_info(name)
        table.add_row(name, _millions(zoo_stats(name)), f"{info.macs_g:.1f}" if info.macs_g else "-",
                      f"{info.top1:.1f}" if info.top1 else "-", str(info.image_size), info.pretrain)
    console = Console()
    if console.width < TABLE_WIDTH:  # never squeeze a name: let a narrow terminal wrap the line instead
        console = Console(width=TABLE_WIDTH)
    console.print(table)


def describe(info: ModelInfo, stats: ModelStats) -> list[tuple[str, str]]:
    """``(field, value)`` rows of ``mf-edge info``: architecture, preprocessing, numbers, weights."""
    config = info.config
    norm = ("modified LayerNorm over (H, W, C), no bias (GroupNorm with 1 group)" if config.group_norm
            else "LayerNorm over C, no bias")
    head = ("MlpHead: Linear -> SquaredReLU -> LayerNorm -> Linear (4x hidden)" if config.mlp_head
            else "Linear")
    top1 = f"{info.top1:.1f} % (ImageNet-1k, official)" if info.top1 else "- (ImageNet-21k classifier)"
    macs = f"{stats.macs / 1e9:.2f} G counted (FlopCounterMode)"
    if info.macs_g:
        macs += f", {info.macs_g:.1f} G official"
    return [
        ("name", info.name),
        ("family", info.family),
        ("architecture", info.arch),
        ("depths", " ".join(map(str, config.depths))),
        ("dims", " ".join(map(str, config.dims))),
        ("token mixers", " ".join(config.mixers)),
        ("norm", norm),
        ("res scale", " ".join("-" if s is None else str(s) for s in config.res_scale)),
        ("head", head),
        ("pretrain", info.pretrain),
        ("classes", f"{info.num_classes} ({info.labels})"),
        ("input size", f"3 x {info.image_size} x {info.image_size}"),
        ("mean", ", ".join(f"{v:.3f}" for v in info.mean)),
        ("std", ", ".join(f"{v:.3f}" for v in info.std)),
        ("crop_pct", f"{info.crop_pct:g}"),
        ("interpolation", info.interpolation),
        ("top-1", top1),
        ("params", f"{stats.params:,} ({_millions(stats)} M"
                   + (", frozen random matrices" if stats.frozen_params else "") + ")"),
        ("MACs", macs),
        ("official weights", info.official_url if info.hub_file else "- (none published)"),
        ("timm hub id", f"timm/{info.timm_hub_id}" if info.timm_hub_id else "- (not in timm)"),
        ("license", WEIGHTS_LICENSE),
    ]


@app.command("info")
def info_command(name: str = typer.Argument(..., help="A model name from `mf-edge models`.")) -> None:
    """Show one model's metadata: architecture, preprocessing, accuracy, size, cost and weights.

    Example: mf-edge info convformer_s18
    """
    info = get_model_info(name)
    console = Console()
    for field, value in describe(info, zoo_stats(name)):
        console.print(f"[bold]{field:<17}[/bold] {value}", highlight=False, soft_wrap=True)
