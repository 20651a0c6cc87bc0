"""Fine-tune a pretrained transformer: `python train.py [group=option ...] [key=value ...]`.

Thin on purpose: the work is in sftlab.train (importable, and called by the tests).
"""

import hydra

import sftlab  # noqa: F401  (registers the ${sftlab.*} config resolvers)
from sftlab.errors import friendly_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@friendly_errors
def main(cfg):
    from sftlab.train import main as run

    return run(cfg)


if __name__ == "__main__":
    main()
