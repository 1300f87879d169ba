"""Weights: Hub download through huggingface_hub (served locally), cache reuse, offline failure,
checkpoint formats and wrappers, classifier re-initialisation, and every kind of bad input."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mf_edge import UserError, create_model
from mf_edge.layouts import official_to_timm
from mf_edge.weights import read_state_dict, save_state_dict

NAME = "poolformerv2_s12"  # the smallest model with a timm copy of its weights
IMAGE_SIZE = 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    return create_model(NAME, seed=7, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def official_pth(source_model, tmp_path_factory) -> Path:
    return save_state_dict(source_model, tmp_path_factory.mktemp("ckpt") / f"{NAME}.pth")


def logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


class _HubHandler(BaseHTTPRequestHandler):
    """Answers ``HEAD``/``GET /{repo}/resolve/main/{file}`` like the Hub, from ``server.files``."""

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self._answer(with_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(with_body=True)

    def _answer(self, with_body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        data = self.server.files.get(self.path)  # type: ignore[attr-defined]
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_hub(tmp_path, monkeypatch) -> Iterator[ThreadingHTTPServer]:
    """A Hub endpoint on 127.0.0.1 (``HF_ENDPOINT``) and an empty download cache (``MF_EDGE_CACHE``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.files, server.requests = {}, []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("MF_EDGE_CACHE", str(tmp_path / "hub-cache"))
    yield server
    server.shutdown()
    thread.join()


def test_imagenet_weights_download_once_then_come_from_the_cache(local_hub, official_pth, source_model,
                                                                  batch):
    local_hub.files[f"/sail/dl/resolve/main/poolformerv2/{NAME}.pth"] = official_pth.read_bytes()
    first = create_model(NAME, weights="imagenet", image_size=IMAGE_SIZE)
    assert any(r.startswith("GET /sail/dl/resolve/main/poolformerv2/") for r in local_hub.requests), \
        local_hub.requests
    assert torch.equal(logits(first, batch), logits(source_model, batch))
    record = first.mf_edge_weights
    assert record["source"] == "imagenet" and record["layout"] == "official"
    assert record["sha256"] == hashlib.sha256(official_pth.read_bytes()).hexdigest()
    assert Path(record["path"]).is_relative_to(Path(os.environ["MF_EDGE_CACHE"]))

    seen = len(local_hub.requests)
    second = create_model(NAME, weights="imagenet", image_size=IMAGE_SIZE)
    assert len(local_hub.requests) == seen, "the second call went to the network"
    assert second.mf_edge_weights["path"] == record["path"]
    assert torch.equal(logits(second, batch), logits(first, batch))


def test_imagenet_weights_fall_back_to_timm_safetensors(local_hub, source_model, batch, tmp_path):
    timm_file = save_state_dict(source_model, tmp_path / "model.safetensors", layout="timm")
    local_hub.files[f"/timm/{NAME}.sail_in1k/resolve/main/model.safetensors"] = timm_file.read_bytes()
    model = create_model(NAME, weights="imagenet", image_size=IMAGE_SIZE)
    assert f"HEAD /sail/dl/resolve/main/poolformerv2/{NAME}.pth" in local_hub.requests  # tried first
    assert model.mf_edge_weights["layout"] == "timm"
    assert torch.equal(logits(model, batch), logits(source_model, batch))


def test_registered_model_without_published_weights_asks_for_a_path(local_hub):
    """Caught: a register_model'ed architecture (no hub file, no timm id) sent HEAD requests for
    ``sail/dl/resolve/main/`` (the repo root) and retried 5 times before failing."""
    with pytest.raises(UserError, match="convformer_d1 has no published ImageNet weights.*--weights PATH"):
        create_model("convformer_d1", weights="imagenet")  # tests/small_models.py
    assert local_hub.requests == []


def test_offline_with_empty_cache_fails_in_one_line(tmp_path):
    """HF_HUB_OFFLINE=1 and nothing cached: one line naming --weights PATH and --weights random."""
    script = ("from mf_edge import UserError, create_model\n"
              "try:\n    create_model('caformer_s18', weights='imagenet')\n"
              "except UserError as error:\n    print(error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MF_EDGE_CACHE": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300, check=True)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    assert "caformer_s18" in lines[0] and "--weights PATH" in lines[0] and "--weights random" in lines[0]
    assert "https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth" in lines[0]


def test_checkpoint_formats_and_wrappers_all_load(source_model, official_pth, batch, tmp_path):
    """Official layout plain / in ``model`` / in ``state_dict`` (.pth) and .safetensors; timm layout
    .safetensors and .pth (with DataParallel's ``module.`` prefix): the same logits every time."""
    official = read_state_dict(official_pth)
    timm_state = official_to_timm(official)
    torch.save({"model": official, "epoch": 3}, tmp_path / "wrapped-model.pth")
    torch.save({"state_dict": official}, tmp_path / "wrapped-state-dict.pth")
    torch.save({f"module.{k}": v for k, v in timm_state.items()}, tmp_path / "timm-module.pth")
    paths = [official_pth, tmp_path / "wrapped-model.pth", tmp_path / "wrapped-state-dict.pth",
             tmp_path / "timm-module.pth",
             save_state_dict(source_model, tmp_path / "official.safetensors"),
             save_state_dict(source_model, tmp_path / "timm.safetensors", layout="timm")]
    want = logits(source_model, batch)
    for path in paths:
        model = create_model(NAME, weights=path, image_size=IMAGE_SIZE)
        assert torch.equal(logits(model, batch), want), path.name
        assert model.mf_edge_weights["source"] == "path"


def test_other_num_classes_reinitialises_the_head_and_says_so(source_model, official_pth, batch, capsys):
    model = create_model(NAME, weights=official_pth, num_classes=10, image_size=IMAGE_SIZE)
    note = capsys.readouterr().err
    assert "re-initialising the classifier for 10 classes (the checkpoint has 1000)" in note
    assert logits(model, batch).shape == (1, 10)
    kept = {k: v for k, v in source_model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    again = create_model(NAME, weights=official_pth, num_classes=10, image_size=IMAGE_SIZE)
    assert torch.equal(logits(again, batch), logits(model, batch))  # the new head is seeded
    assert model.mf_edge_weights["seed"] == 0


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(UserError, match="Did you mean: poolformerv2_s12"):
        create_model("poolformer_v2_s12")


def test_checkpoint_of_another_architecture_names_the_keys(official_pth):
    with pytest.raises(UserError) as error:
        create_model("convformer_s18", weights=official_pth)
    message = str(error.value)
    # the MLP head, and SepConv's pwconv1/act1/dwconv/pwconv2 in all 18 blocks
    assert "140 missing: head.fc1.bias, head.fc1.weight, head.fc2.bias, head.fc2.weight, head.norm.bias" \
        in message
    assert "unexpected: head.bias, head.weight" in message
    with pytest.raises(UserError, match=r"mis-shaped: downsample_layers\.0\.conv\.bias \(64,\) vs \(96,\)"):
        create_model("poolformerv2_m36", weights=official_pth)


def test_randformer_matrices_sized_for_another_image_size_say_which(official_pth, tmp_path):
    state = read_state_dict(official_pth)
    for stage, blocks, tokens in ((2, 6, 196), (3, 2, 49)):  # randformer_s12 at 224
        for block in range(blocks):
            state[f"stages.{stage}.{block}.token_mixer.random_matrix"] = torch.rand(tokens, tokens)
    torch.save(state, tmp_path / "randformer_s12.pth")
    with pytest.raises(UserError, match=r"random_matrix .*image_size=224"):
        create_model("randformer_s12", weights=tmp_path / "randformer_s12.pth", image_size=64)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "truncated-safetensors", "not-a-state-dict"])
def test_damaged_checkpoint_is_a_clear_error(damage, official_pth, source_model, tmp_path):
    data = official_pth.read_bytes()
    if damage == "truncated":
        path = tmp_path / "half.pth"
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path = tmp_path / "garbage.pth"
        path.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "truncated-safetensors":
        path = save_state_dict(source_model, tmp_path / "half.safetensors")
        path.write_bytes(path.read_bytes()[:100_000])
    else:
        path = tmp_path / "list.pth"
        torch.save([torch.zeros(3)], path)
    with pytest.raises(UserError) as error:
        create_model(NAME, weights=path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    expected = "holds no state dict" if damage == "not-a-state-dict" else "corrupt or truncated"
    assert expected in message


def test_missing_path_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass an existing file to --weights"):
        create_model(NAME, weights=tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is a folder"):
        create_model(NAME, weights=tmp_path)
