"""An HTTP service around :class:`sftlab.deploy.Classifier`: ``create_app(model_dir)`` -> FastAPI.

Why this shape: the model is loaded once, when the app is created, so a bad ``model_dir`` fails
at startup rather than on the first request; requests are checked before they reach the model
(limits on batch size and text length keep one client from stalling or exhausting the server);
and every bad request gets a 4xx with one readable sentence in ``detail``. Inference runs in
FastAPI's worker threads behind a lock: torch already uses every core for one batch, and
concurrent forwards would only thrash.

Endpoints::

    POST /predict  {"texts": ["...", ...], "top_k": 2}  -> {"predictions": [{label, label_id,
                                                             score, probabilities[, top_k]}]}
                   (a token-classification model: {"predictions": [{text, entities: [{entity_group,
                    word, start, end, score}]}]}, character offsets)
    GET  /health   -> {"status": "ok", "model": "<folder>", ...}
    GET  /labels   -> {"labels": [...]}

No ``from __future__ import annotations`` here: FastAPI reads the request model from the
endpoint's annotations, and the models are built inside ``create_app`` (fastapi and pydantic
are imported only when a server is made, as they are an optional extra).
"""

import logging
import sys
import threading
from pathlib import Path
from typing import Any

from sftlab.errors import ConfigError, SftlabError, checked

log = logging.getLogger(__name__)


def _describe(errors: list[dict[str, Any]]) -> str:
    """One sentence from pydantic's error list (the first error; the list is returned too)."""
    if not errors:
        return "Invalid request; send {\"texts\": [\"...\"]}."
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    kind = err.get("type", "")
    if kind == "json_invalid":
        return 'The request body is not valid JSON; send {"texts": ["..."]} with content-type application/json.'
    if kind == "missing":
        return f'{where or "body"} is required; send {{"texts": ["..."]}}.'
    if kind in ("model_attributes_type", "dict_type") and not where:
        return ('The request body must be a JSON object like {"texts": ["..."]}, sent with '
                "content-type application/json.")
    if kind == "extra_forbidden":
        return f'{where} is not a field of the request; the fields are "texts" and "top_k".'
    return f"{where or 'body'}: {err.get('msg', 'invalid value')}."


def create_app(
    model_dir: str | Path,
    max_batch: int = 64,
    max_text_chars: int = 10000,
    *,
    device: str | None = None,
    precision: str = "fp32",
    max_length: int | None = None,
    batch_size: int = 64,
):
    """A FastAPI app serving the model in ``model_dir`` (exported folder or run dir)."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.encoders import jsonable_encoder
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
    except ImportError:
        raise SftlabError("Serving needs fastapi and uvicorn; install them with "
                          "pip install 'sftlab[serve]'.") from None

    from sftlab.deploy.predictor import Classifier

    max_batch = checked("max_batch", max_batch, int, positive=True)
    max_text_chars = checked("max_text_chars", max_text_chars, int, positive=True)
    clf = Classifier.load(model_dir, device=device, precision=precision, max_length=max_length)
    lock = threading.Lock()
    # a request can hold at most max_batch texts of max_text_chars (4 bytes per char in UTF-8,
    # worst case, plus JSON escaping); anything larger is refused before it is read
    max_body = max_batch * (max_text_chars * 6 + 16) + 4096

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[StrictStr] = Field(description=f"1 to {max_batch} texts, each at most "
                                                   f"{max_text_chars} characters")
        top_k: StrictInt | None = Field(None, ge=1, description="also list the k best labels")

    class Prediction(BaseModel):
        label: str
        label_id: int
        score: float
        probabilities: dict[str, float]
        top_k: list[tuple[str, float]] | None = None

    class Entity(BaseModel):
        entity_group: str
        word: str
        start: int
        end: int
        score: float

    class Entities(BaseModel):
        text: str
        entities: list[Entity]

    tagger = getattr(clf, "task", None) == "token_classification"

    class PredictResponse(BaseModel):
        predictions: list[Entities] if tagger else list[Prediction]  # type: ignore[valid-type]

    app = FastAPI(
        title="sftlab tagger" if tagger else "sftlab classifier",
        description=(f"Named-entity recognition with {clf.source}. Tags: {', '.join(clf.labels)}."
                     if tagger else
                     f"Text classification with {clf.source}. Labels: {', '.join(clf.labels)}."),
        version="1",
    )
    app.state.classifier = clf

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # the offending input is not echoed back: it can be megabytes, and it is the client's own
        errors = [{k: v for k, v in e.items() if k not in ("input", "url")} for e in exc.errors()]
        errors = jsonable_encoder(errors, custom_encoder={Exception: str})
        return JSONResponse(status_code=422, content={"detail": _describe(errors), "errors": errors})

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            return JSONResponse(status_code=413, content={
                "detail": f"The request body has {size} bytes, more than this server takes "
                          f"({max_body}); send at most {max_batch} texts of {max_text_chars} "
                          "characters."})
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": clf.source, "labels": len(clf.labels),
                "device": str(clf.device), "precision": clf.precision,
                "max_batch": max_batch, "max_text_chars": max_text_chars}

    @app.get("/labels")
    def labels() -> dict[str, list[str]]:
        return {"labels": clf.labels}

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
    def predict(req: PredictRequest):
        if not req.texts:
            raise HTTPException(422, 'texts is empty; send at least one text: {"texts": ["..."]}.')
        if len(req.texts) > max_batch:
            raise HTTPException(413, f"{len(req.texts)} texts is more than max_batch={max_batch}; "
                                     "split them over several requests.")
        for i, text in enumerate(req.texts):
            if len(text) > max_text_chars:
                raise HTTPException(413, f"texts.{i} has {len(text)} characters, more than "
                                         f"max_text_chars={max_text_chars}; shorten or split it.")
        try:
            with lock:
                records = clf.predict(req.texts, batch_size=batch_size, top_k=req.top_k)
        except SftlabError as err:
            raise HTTPException(422, str(err)) from None
        except Exception as err:  # keep serving; the log has the traceback
            log.exception("Prediction failed")
            raise HTTPException(500, f"Prediction failed ({type(err).__name__}); see the server log.") from None
        return {"predictions": records}

    return app


def main(cfg) -> None:
    """Load the model and run uvicorn on ``cfg.host:cfg.port`` (127.0.0.1 by default)."""
    if not cfg.get("model_dir"):
        raise ConfigError("model_dir is required: python serve.py model_dir=<run dir or model folder>.")
    try:
        import uvicorn
    except ImportError:
        raise SftlabError("Serving needs fastapi and uvicorn; install them with "
                          "pip install 'sftlab[serve]'.") from None
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()
    port = checked("port", cfg.get("port", 8000), int, lo=0, hi=65535)
    app = create_app(
        str(cfg.model_dir),
        max_batch=cfg.get("max_batch", 64),
        max_text_chars=cfg.get("max_text_chars", 10000),
        device=cfg.get("device"),
        precision=cfg.get("precision") or "fp32",
        max_length=cfg.get("max_length"),
    )
    host = str(cfg.get("host") or "127.0.0.1")
    log.info("Serving %s on http://%s:%s (API docs at /docs)", app.state.classifier.source, host, port)
    uvicorn.run(app, host=host, port=port, log_level=str(cfg.get("log_level") or "info"))
