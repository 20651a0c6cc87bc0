"""serve.py over real HTTP: a subprocess on a free loopback port, exercised with httpx.

Bad requests must each get a 4xx with a readable ``detail`` and leave the server healthy.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from conftest import LABELS, build_tiny_export  # noqa: E402

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 8
MAX_CHARS = 200
TEXTS = ["Stocks rallied on Wall Street.", "The Red Sox won the World Series",
         "NASA launches a new probe to study the Sun", "Talks in Geneva ended without a deal."]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return build_tiny_export(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "serve.py", f"model_dir={exported.parent}", f"port={port}",
             f"max_batch={MAX_BATCH}", f"max_text_chars={MAX_CHARS}", "log_level=warning"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=base, timeout=30) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"serve.py exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"serve.py did not answer /health within 60 s:\n{log.read_text()}")
                time.sleep(0.25)
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_health_and_labels(server, exported):
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == str(exported)
    assert health["max_batch"] == MAX_BATCH
    assert server.get("/labels").json() == {"labels": LABELS}


def test_predict_matches_classifier(server, exported):
    from sftlab.deploy import Classifier

    res = server.post("/predict", json={"texts": TEXTS})
    assert res.status_code == 200, res.text
    preds = res.json()["predictions"]
    expected = Classifier.load(exported).predict(TEXTS)
    # the rows differ (by > 0.01, 100x the tolerance, in some class): rows out of order fail
    for i in range(len(TEXTS)):
        for j in range(i):
            assert max(abs(expected[i]["probabilities"][k] - expected[j]["probabilities"][k])
                       for k in LABELS) > 0.01, (i, j)
    assert len(preds) == len(TEXTS)
    for p, e in zip(preds, expected, strict=True):
        assert set(p) == {"label", "label_id", "score", "probabilities"}
        assert (p["label"], p["label_id"]) == (e["label"], e["label_id"])
        assert abs(p["score"] - e["score"]) < 1e-4
        assert all(abs(p["probabilities"][k] - e["probabilities"][k]) < 1e-4 for k in LABELS)
    top = server.post("/predict", json={"texts": TEXTS[:1], "top_k": 2}).json()["predictions"][0]
    assert len(top["top_k"]) == 2 and top["top_k"][0][0] == top["label"]


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"json": {"texts": []}}, 422, "texts is empty"),
        ({"json": {"texts": "just one string"}}, 422, "valid list"),
        ({"json": {"texts": ["ok", 3]}}, 422, "texts.1"),
        ({"json": {"texts": ["x"] * (MAX_BATCH + 1)}}, 413, "max_batch"),
        ({"json": {"texts": ["ok", "y" * (MAX_CHARS + 1)]}}, 413, "texts.1 has 201 characters"),
        ({"content": b'{"texts": ["unterminated', "headers": {"content-type": "application/json"}},
         422, "not valid JSON"),
        ({"json": {"text": ["wrong field"]}}, 422, "texts is required"),
        ({"json": ["not", "an", "object"]}, 422, "JSON object"),
        ({"json": {"texts": ["ok"], "top_k": 0}}, 422, "top_k"),
        ({"content": b"x" * 200_000, "headers": {"content-type": "application/json"}}, 413, "bytes"),
    ],
)
def test_bad_requests_get_4xx(server, kwargs, status, message):
    res = server.post("/predict", **kwargs)
    assert res.status_code == status, res.text
    detail = res.json()["detail"]
    assert isinstance(detail, str) and message in detail
    assert server.get("/health").json()["status"] == "ok"


def test_wrong_method_and_path(server):
    assert server.get("/predict").status_code == 405
    assert server.get("/nope").status_code == 404
    assert server.get("/health").status_code == 200


def _serve_config(*overrides: str):
    """conf/serve.yaml composed as ``python serve.py ...`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="serve", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("overrides, host, port", [
    ([], "127.0.0.1", 8000),                              # the default: loopback only
    (["port=8123"], "127.0.0.1", 8123),
    (["host=0.0.0.0", "port=9000"], "0.0.0.0", 9000),     # opening up is an explicit choice
])
def test_serve_binds_loopback_unless_told_otherwise(exported, monkeypatch, overrides, host, port):
    """What ``sftlab.deploy.serve.main`` hands to uvicorn, without starting a server."""
    import uvicorn

    from sftlab.deploy import serve

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    cfg = _serve_config(f"model_dir={exported}", *overrides)
    assert cfg.host == host
    serve.main(cfg)
    assert len(calls) == 1
    app, kw = calls[0]
    assert (kw["host"], kw["port"]) == (host, port)
    assert app.state.classifier.labels == LABELS  # the app serves the model it was given
