"""``mf-edge models`` and ``mf-edge info``: the zoo table, one model's metadata, errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mf_edge.cli import main
from mf_edge.models import MetaFormer, count_params, get_model_info, list_models


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``mf-edge ARGS`` in this process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_models_lists_every_name_intact_even_on_a_narrow_terminal(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "50")
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()[:1].isalpha()}
    assert set(list_models()) <= set(rows)
    assert rows["randformer_s12"] == ["11.9+0.2", "1.9", "76.6", "224", "in1k"]
    assert rows["caformer_b36_384_in21ft1k"] == ["98.8", "72.2", "88.1", "384", "in21ft1k"]
    assert rows["convformer_s18_in21k"][2:] == ["-", "224", "in21k"]


def test_models_pattern_filters_and_no_match_is_an_error(capsys) -> None:
    code, out, _ = run_cli(["models", "caformer_s18*"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.strip().startswith("caformer_")]
    assert listed == list_models("caformer_s18*") and len(listed) == 5
    code, out, err = run_cli(["models", "resnet*"], capsys)
    assert code == 2 and "error: no model matches 'resnet*'" in err


def test_info_prints_architecture_preprocessing_numbers_and_sources(capsys) -> None:
    code, out, _ = run_cli(["info", "caformer_s18"], capsys)
    assert code == 0
    fields = {line[:17].strip(): line[17:].strip() for line in out.splitlines()}
    with torch.device("meta"):
        params = count_params(MetaFormer(get_model_info("caformer_s18").config))
    assert fields["depths"] == "3 3 9 3" and fields["dims"] == "64 128 320 512"
    assert fields["token mixers"] == "sepconv sepconv attention attention"
    assert fields["norm"] == "LayerNorm over C, no bias" and fields["head"].startswith("MlpHead")
    assert fields["input size"] == "3 x 224 x 224" and fields["mean"] == "0.485, 0.456, 0.406"
    assert (fields["crop_pct"], fields["interpolation"]) == ("1", "bicubic")
    assert fields["classes"] == "1000 (imagenet-1k)" and fields["top-1"].startswith("83.6 %")
    assert fields["params"].startswith(f"{params:,} (26.3 M")
    assert fields["MACs"] == "4.11 G counted (FlopCounterMode), 4.1 G official"
    assert fields["official weights"] == "https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth"
    assert fields["timm hub id"] == "timm/caformer_s18.sail_in1k"
    assert fields["license"].startswith("Apache-2.0")


def test_unknown_name_is_one_error_line_with_close_matches() -> None:
    """The installed ``mf-edge`` script: non-zero exit, one ``error:`` line, no traceback."""
    script = Path(sys.executable).parent / "mf-edge"
    result = subprocess.run([str(script), "info", "cafromer_s18"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'cafromer_s18'.")
    assert "Did you mean: caformer_s18" in lines[0]


def test_zoo_stats_table_matches_the_models() -> None:
    """``zoo_stats.json`` (read by ``models``/``info`` without PyTorch) against meta-device builds: every
    parameter count, and the counted MACs of one model per family (all of them under ``-m slow``)."""
    from mf_edge.models.factory import model_stats
    from mf_edge.models.stats import zoo_stats

    for name in list_models():
        assert zoo_stats(name)[:2] == model_stats(name)[:2], name
    for name in ("identityformer_s12", "randformer_s12", "poolformerv2_s12", "convformer_s18",
                 "caformer_s18"):
        assert zoo_stats(name) == model_stats(name, macs=True), name


@pytest.mark.slow
def test_zoo_stats_table_macs_of_every_model() -> None:
    from mf_edge.models.stats import compute_table, zoo_stats

    assert {name: list(zoo_stats(name)) for name in list_models()} == compute_table()


def test_version_and_help_without_type_noise(capsys) -> None:
    """``--version`` prints the version; on/off flags show no ``<bool>``; each command has an example."""
    import mf_edge

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"mf-edge {mf_edge.__version__}"
    for command in (["--help"], ["convert", "--help"], ["train", "--help"], ["bench", "--help"]):
        code, out, _ = run_cli(command, capsys)
        assert code == 0 and "<bool>" not in out, command
        assert command == ["--help"] or "Example: mf-edge " + command[0] in out, command


def test_light_commands_do_not_import_torch() -> None:
    """``--help``, ``models`` and ``info`` start without PyTorch (7-10 s of imports on a slow host)."""
    code = ("import sys; from mf_edge.cli import main\n"
            "for argv in (['--help'], ['models'], ['info', 'caformer_s18']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_engine_default_max_batch_matches_the_converter() -> None:
    from mf_edge.cli.engine import DEFAULT_MAX_BATCH
    from mf_edge.converters.tensorrt.target import DEFAULT_MAX_BATCH as CONVERTER_DEFAULT

    assert DEFAULT_MAX_BATCH == CONVERTER_DEFAULT
