"""``mf-edge models`` and ``mf-edge info``: the zoo as a table, one model's metadata."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from mf_edge.cli import app
from mf_edge.models import count_params, create_model, get_model_info, list_models


@app.command("models")
def models_command(
    pattern: str = typer.Argument(None, help="Shell-style filter, e.g. 'caformer_*'."),
) -> None:
    """List the model zoo: name, parameters, MACs, official top-1 and input size."""
    table = Table(title="MetaFormer zoo")
    for column in ("name", "params (M)", "MACs (G)", "top-1 (%)", "input", "classes"):
        table.add_column(column, justify="left" if column == "name" else "right")
    params_by_arch: dict[str, int] = {}
    for name in list_models(pattern):
        info = get_model_info(name)
        if info.arch not in params_by_arch:
            params_by_arch[info.arch] = count_params(create_model(info.arch))
        table.add_row(name, f"{params_by_arch[info.arch] / 1e6:.1f}" if info.num_classes == 1000 else "-",
                      f"{info.macs_g:.1f}" if info.macs_g else "-",
                      f"{info.top1:.1f}" if info.top1 else "-", str(info.image_size), str(info.num_classes))
    Console().print(table)
