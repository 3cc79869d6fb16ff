"""Fortieth session: fixes from that session's reviews, each test failing on the code before it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO1, DEMO2 = ROOT / "models" / "demo-mamba1", ROOT / "models" / "demo-mamba2"


def test_the_server_refuses_a_request_past_any_runners_max_positions(request):
    """The server's position check read llama.cpp's `n_ctx` by name, so a backend with another
    position cap was not checked. It now reads the Runner's `max_positions` (llama.cpp's n_ctx
    is one): a request past it is a 400 naming the cap; one inside it is generated as alone."""
    from conftest import post_json, start_server
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    r = open_runner(DEMO2, "torch")
    request.addfinalizer(r.close)
    alone = generate(r, [[5, 6, 7]], max_new_tokens=8).tokens[0]
    r.max_positions, r.max_positions_name = 16, "this backend's cap"
    server = start_server(r, request, max_num_seqs=4)
    status, _, body = post_json(server, {"prompt": list(range(3, 13)), "max_tokens": 7, "temperature": 0})
    assert status == 400, body
    assert "would pass this backend's cap=16" in json.loads(body)["error"]["message"]
    status, _, body = post_json(server, {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["token_ids"] == alone


def test_tensorrt_preflight_compares_release_numbers_not_spellings(tmp_path, onnx_export, monkeypatch):
    """verify's preflight refused a good engine when pip's version string and
    `tensorrt.__version__` (the sidecar's) spelled one release differently, and did not check at
    all when TensorRT came from its CUDA-specific distribution (`tensorrt-cu12`)."""
    from importlib import metadata

    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.tensorrt import SIDECAR_FORMAT, sidecar_path
    from mamba_deploy.runners import preflight

    onnx_dir = onnx_export("mamba2")[0]
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 100)
    sidecar_path(engine).write_text(json.dumps({"format": SIDECAR_FORMAT, "onnx_dir": str(onnx_dir),
                                               "manifest": manifest, "defaults": {},
                                               "build": {"engine_bytes": 100, "tensorrt": "10.13.0.35"}}))

    def installed(versions):
        def version(name):
            if name not in versions:
                raise metadata.PackageNotFoundError(name)
            return versions[name]
        monkeypatch.setattr(metadata, "version", version)

    for same in ("10.13.0.35", "10.13.0.35.post1", "v10.13.0.35"):
        installed({"tensorrt": same})
        assert preflight._tensorrt_config(engine).d_model == manifest["config"]["d_model"], same
    installed({"tensorrt-cu12": "10.12.0.36"})
    with pytest.raises(ExportError, match=r"built by TensorRT 10.13.0.35, and this is TensorRT 10.12.0.36"):
        preflight._tensorrt_config(engine)
    installed({})
    assert preflight._tensorrt_config(engine) is not None  # nothing recorded here: the runner's own check decides
