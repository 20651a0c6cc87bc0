"""Serve a trained model over HTTP: `python serve.py model_dir=<run dir or model folder> [port=8000]`.

POST /predict {"texts": [...]}, GET /health, GET /labels; binds 127.0.0.1 unless host= says
otherwise. Thin on purpose: the app is sftlab.deploy.serve.create_app (importable, tested over HTTP).
"""

import hydra

import sftlab  # noqa: F401  (registers the ${sftlab.*} config resolvers)
from sftlab.errors import friendly_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@friendly_errors
def main(cfg):
    from sftlab.deploy.serve import main as run

    run(cfg)


if __name__ == "__main__":
    main()
