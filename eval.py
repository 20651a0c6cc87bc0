"""Evaluate a trained model: `python eval.py model_dir=<run dir or model folder> [split=test]`.

Thin on purpose: the work is in sftlab.evaluate.
"""

import hydra

import sftlab  # noqa: F401  (registers the ${sftlab.*} config resolvers)
from sftlab.errors import friendly_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@friendly_errors
def main(cfg):
    from sftlab.evaluate import main as run

    return run(cfg)


if __name__ == "__main__":
    main()
