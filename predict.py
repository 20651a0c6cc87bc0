"""Label texts with a trained model: `python predict.py model_dir=<run dir or model folder> text="..."`.

Also `input=<file>` (.txt/.csv/.tsv/.jsonl/.json) or stdin; JSON lines on stdout (or output=).
Thin on purpose: the work is in sftlab.deploy.predict (importable, and called by the tests).
"""

import sys

import hydra

import sftlab  # noqa: F401  (registers the ${sftlab.*} config resolvers)
from sftlab.errors import friendly_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@friendly_errors
def main(cfg):
    from sftlab.deploy.predict import main as run

    run(cfg)


if __name__ == "__main__":
    from sftlab.deploy.predict import quote_text_args

    sys.argv = quote_text_args(sys.argv)  # text= is one literal string, commas and all
    main()
