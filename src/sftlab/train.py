"""``train(cfg)``: the seed's six steps, top to bottom.

prepare data → load model → build task (strategy, optimizer) → train → evaluate → deploy.
Every object comes from the composed config with ``hydra.utils.instantiate``; this module only
wires them and writes the run's results into its own dir:

    <run dir>/config.yaml             the resolved config, secrets removed (resume= reads it)
    <run dir>/metrics.json            flat keys: val/acc, test/f1_macro, train_samples_per_s ...
                                      or status: failed / interrupted and why
    <run dir>/checkpoints/            best + last.ckpt (every epoch, every checkpoint.every_n_steps
                                      steps, and on SIGTERM/SIGINT; written atomically)
    <run dir>/model/                  save_pretrained folder of the best checkpoint
    <run dir>/confusion_matrix.{csv,png}, test_predictions.csv
    <run dir>/.hydra/                 the composed config and the overrides

``python train.py resume=<run dir>`` continues a stopped or killed run in place (see
``sftlab.runs``); with the same seed it ends with the same weights and metrics as a run that
was never stopped, because checkpoints carry the RNG states and the loader's position.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sftlab.errors import ConfigError, checked
from sftlab.files import write_json

log = logging.getLogger(__name__)

# The dir this process's run owns, once known: main() records a failure only there (a run
# refused because its dir holds another run must not write into that run).
_RUN_DIR: Path | None = None


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own errors through as themselves.

    Hydra wraps whatever a constructor raises in an ``InstantiationException`` that repeats the
    target and the config key around it; a ``ConfigError`` from ``TextClassifier`` (max_length
    beyond the model's positions) or a strategy (trainable_layers too large) would then print
    as a multi-line Hydra error instead of our one sentence.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from sftlab.errors import SftlabError

    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err.__cause__
        while cause is not None and not isinstance(cause, SftlabError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict group (callbacks, loggers); skip null/disabled ones."""
    out = []
    for _, node in (group or {}).items():
        if node is None or not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        if node.pop("enable", True) is False:
            continue
        out.append(instantiate(node))
    return out


def route_lightning_logs() -> None:
    """Send Lightning's messages through the root logger only (Hydra's console + run log).

    Lightning adds its own console handler when it is imported before logging is configured,
    which prints every message twice under Hydra.
    """
    if logging.getLogger().hasHandlers():
        for name in ("lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            lg.handlers.clear()
            lg.propagate = True


def check_config(cfg: DictConfig) -> None:
    """Cheap checks before anything is loaded, so a typo costs seconds, not an epoch."""
    from sftlab.optim import learning_rate

    learning_rate(cfg.optimizer.get("lr"))
    for key in ("batch_size", "eval_batch_size"):
        checked(f"data.{key}", cfg.data.get(key), int, positive=True)
    if int(cfg.model.get("max_length", 1)) <= 0:
        raise ConfigError(f"model.max_length must be positive, got {cfg.model.max_length}.")


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and finished children, e.g. data workers)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(self_kb, child_kb) / 1024, 1)


def save_confusion(confusion, label_names: list[str], out: Path) -> None:
    """The test confusion matrix as CSV (rows = true, cols = predicted) and as a PNG heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat = confusion.numpy().astype(int)
    lines = ["true\\pred," + ",".join(label_names)]
    lines += [f"{name}," + ",".join(map(str, row)) for name, row in zip(label_names, mat, strict=True)]
    (out / "confusion_matrix.csv").write_text("\n".join(lines) + "\n")
    k = len(label_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.0 * k + 2))
    ax.imshow(mat, cmap="Blues")
    ax.set_xticks(range(k), label_names, rotation=45, ha="right")
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(mat[i, j]), ha="center", va="center",
                    color="white" if mat[i, j] > mat.max() / 2 else "black")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)


def save_test_predictions(module, label_names: list[str], out: Path) -> None:
    """Per-example test predictions in the file's row order (the loader sorts by length)."""
    rows = sorted(module.test_predictions)
    lines = ["idx,true_id,label_id,label," + ",".join(f"p_{n}" for n in label_names)]
    for idx, true, probs in rows:
        best = max(range(len(probs)), key=probs.__getitem__)
        lines.append(f"{idx},{true},{best},{label_names[best]}," + ",".join(f"{p:.6f}" for p in probs))
    (out / "test_predictions.csv").write_text("\n".join(lines) + "\n")


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def prepare_run(cfg: DictConfig) -> DictConfig:
    """Own the run dir before any work: a fresh one, or the run that ``resume=`` continues.

    Returns the config to run (a resumed run's own). Only rank 0 claims; DDP's other ranks
    are started later into the dir rank 0 already owns.
    """
    global _RUN_DIR
    from sftlab.runs import adopt_run_dir, claim_run_dir, is_rank_zero, resume_config

    fresh = Path(cfg.paths.output_dir)
    if not is_rank_zero():
        # DDP's other ranks run this script again inside rank 0's run dir: they write nothing
        # there, their log included (it goes to the console, next to rank 0's)
        for handler in list(logging.getLogger().handlers):
            if isinstance(handler, logging.FileHandler):
                logging.getLogger().removeHandler(handler)
                handler.close()
    elif not cfg.get("resume"):
        claim_run_dir(fresh)
    _RUN_DIR = fresh
    if cfg.get("resume"):
        cfg = resume_config(cfg)
        run = Path(cfg.paths.output_dir)
        adopt_run_dir(run, fresh)
        _RUN_DIR = run
    return cfg


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, select the best checkpoint on validation, test it, export it; return metrics."""
    cfg = prepare_run(cfg)
    check_config(cfg)
    import lightning.pytorch as pl

    from sftlab.callbacks import CrashSafeCheckpoint, FiniteLossGuard, RNGState, TrainThroughput
    from sftlab.checkpointing import AtomicCheckpointIO, remove_partial_checkpoints
    from sftlab.loggers import finish_wandb
    from sftlab.pretrained import load_tokenizer
    from sftlab.runs import is_rank_zero, new_wandb_id
    from sftlab.secrets import mask_files, public_config, secret_values

    route_lightning_logs()
    out = output_dir(cfg)
    resuming = bool(cfg.get("resume"))
    if not resuming:
        new_wandb_id(cfg)
    secrets = secret_values(OmegaConf.to_container(cfg, resolve=True))
    if is_rank_zero():
        if resuming:
            remove_partial_checkpoints(Path(cfg.ckpt_path).parent)
        else:  # Hydra saved the command line before we ran: mask any secret given there
            saved = sorted((out / ".hydra").glob("*.yaml"))
            if in_multirun():  # and once more for the whole sweep
                saved.append(out.parent / "multirun.yaml")
            mask_files(saved, secrets)
    pl.seed_everything(cfg.seed, workers=True)

    # 1. prepare data (labels come from the data: the head's size and id2label)
    tokenizer = load_tokenizer(**cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    label_names = datamodule.label_names

    # 2-3. load the pretrained model and build the task around it with the strategy
    strategy = instantiate(cfg.strategy)
    module = instantiate(
        cfg.model,
        label_names=label_names,
        strategy=strategy,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        pad_token_id=tokenizer.pad_token_id,
    )

    # 4. train
    throughput = TrainThroughput()
    # RNGState is not optional like the configured callbacks: without it a resumed run's
    # dropout differs from the uninterrupted run's
    callbacks = instantiate_group(cfg.get("callbacks")) + strategy.callbacks() + [throughput, RNGState()]
    callbacks += instantiate_group(cfg.get("perf"))  # speed-ups (conf/perf), also config callbacks
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        # the datamodule's batch sampler shards itself over ranks (see data.py)
        use_distributed_sampler=False,
        plugins=[*(cfg.trainer.get("plugins") or []), AtomicCheckpointIO()],
    )
    hparams = public_config(OmegaConf.to_container(cfg, resolve=True), secrets)
    if trainer.is_global_zero and not resuming:  # resolved, readable without Hydra (eval.py, resume=)
        OmegaConf.save(OmegaConf.create(hparams), out / "config.yaml")
    try:
        if resuming and trainer.is_global_zero:
            keep_csv_history(trainer.loggers, Path(cfg.ckpt_path))
        for lg in trainer.loggers:
            lg.log_hyperparams(hparams)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        guard = next((cb for cb in trainer.callbacks if isinstance(cb, CrashSafeCheckpoint)), None)
        if guard is not None:  # a signal after the last point where training could stop
            guard.stop_if_requested(trainer)  # then: save, skip test and export, exit
        # the run's own numbers first: loading the best checkpoint below restores every
        # callback's state (throughput, skipped steps) to what it was at that checkpoint
        stats = run_stats(trainer, module, throughput, strategy)
        bad = next((cb for cb in trainer.callbacks if isinstance(cb, FiniteLossGuard)), None)
        if bad is not None:
            stats["skipped_bad_steps"] = bad.bad_steps
        if resuming:
            stats["resumed_from"] = cfg.ckpt_path
        # 5. evaluate the best checkpoint on validation and test
        metrics = evaluate_best(cfg, trainer, module, datamodule)
        metrics.update(stats, peak_rss_mb=peak_rss_mb())
        # 6. deploy: results, confusion matrix, exported model
        if trainer.is_global_zero:
            save_results(cfg, out, module, label_names, metrics, trainer.loggers)
            if cfg.get("export"):
                from sftlab.deploy import export_model

                export_model(
                    strategy.export_model(module.model), tokenizer, out / "model",
                    config=hparams, metrics=metrics, extra={"label_names": label_names},
                )
    except BaseException:
        finish_wandb(trainer.loggers, failed=True)
        raise
    finish_wandb(trainer.loggers, failed=False)
    return metrics


def keep_csv_history(loggers, ckpt: Path) -> None:
    """A resumed run's ``metrics.csv`` keeps the rows logged before its checkpoint.

    Lightning's CSVLogger deletes an existing metrics.csv when it starts writing, so a resumed
    run would hold only what it logged itself. Rows from after the checkpoint (a stopped run
    flushed them; the resumed run logs those steps again) are left out.
    """
    import csv

    import torch
    from lightning.pytorch.loggers import CSVLogger

    csv_loggers = [lg for lg in loggers if isinstance(lg, CSVLogger)]
    if not csv_loggers:
        return
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    for lg in csv_loggers:
        path = Path(lg.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)
                    if str(r.get("step", "")).isdigit() and int(r["step"]) < step]
        lg.experiment.metrics[:0] = rows  # the writer (created now) writes them with the new rows


def evaluate_best(cfg: DictConfig, trainer, module, datamodule) -> dict[str, Any]:
    """Validation and test metrics of the best checkpoint (the last weights if none was kept)."""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    metrics: dict[str, Any] = {"best_checkpoint": best}
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    metrics.update(scalar_metrics(results[0] if results else {}))  # [] when validation is off
    if cfg.get("test") and (datamodule.files.get("test") or datamodule.hub_name):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update(scalar_metrics(results[0] if results else {}))
    return metrics


def run_stats(trainer, module, throughput, strategy) -> dict[str, Any]:
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.model.parameters())
    return {
        "train_time_s": round(throughput.train_time_s, 3),
        "train_samples_per_s": round(throughput.samples_per_s, 3),
        "time_to_first_step_s": round(throughput.first_step_s or 0.0, 3),
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_mb": peak_rss_mb(),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "strategy": strategy.name,
        "status": "completed",
    }


def save_results(cfg, out: Path, module, label_names: list[str], metrics: dict[str, Any], loggers) -> None:
    """metrics.json, the confusion matrix, per-example test predictions, and the summary table."""
    from sftlab.console import print_metrics_table
    from sftlab.loggers import log_confusion_to_wandb

    if module.test_confusion is not None:
        save_confusion(module.test_confusion, label_names, out)
        save_test_predictions(module, label_names, out)
        rows = sorted(module.test_predictions)
        preds = [max(range(len(p)), key=p.__getitem__) for _, _, p in rows]
        log_confusion_to_wandb(loggers, [t for _, t, _ in rows], preds, label_names)
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)
                        and not k.startswith(("val/", "test/"))}, step=int(metrics.get("global_step", 0)))
        lg.save()
    write_json(out / "metrics.json", metrics)
    print_metrics_table(metrics, title=f"{metrics.get('strategy', '')} · {out.name}")
    log.info("Run dir: %s", out)


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def main(cfg: DictConfig) -> float:
    """Hydra task function: returns val/acc, the value sweepers (optuna) maximise.

    A failed run records ``status: failed`` and the error in its own metrics.json. In a
    multirun, one failing job (a NaN at a silly LR, a bad combination) must not take the
    sweep's other results with it: the failure is recorded for the sweep report, and the
    sweep goes on. A run stopped by SIGTERM/SIGINT records ``status: interrupted`` and how to
    resume it, and exits (a sweep stops too: the signal was meant for all of it).
    """
    global _RUN_DIR
    from sftlab.runs import RunInterrupted, is_rank_zero

    _RUN_DIR = None
    try:
        return float(train(cfg).get("val/acc", float("nan")))
    except RunInterrupted as err:
        if _RUN_DIR is not None and is_rank_zero():
            _record(_RUN_DIR, {"status": "interrupted", "signal": err.signal_name, "global_step": err.step,
                               "checkpoint": err.checkpoint, "resume": f"python train.py resume={_RUN_DIR}"})
            if err.checkpoint:
                log.warning("Stopped by %s at step %d; continue with: python train.py resume=%s",
                            err.signal_name, err.step, _RUN_DIR)
        raise
    except Exception as err:
        if _RUN_DIR is not None and is_rank_zero():
            _record(_RUN_DIR, {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        if not in_multirun():
            raise
        log.error("Job failed (%s: %s); recorded in metrics.json, the sweep goes on.", type(err).__name__, err)
        return float("nan")


def _record(run_dir: Path, data: dict[str, Any]) -> None:
    """Write a run's end state into its metrics.json, never hiding the error that ended it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "metrics.json", data)
    except Exception:  # noqa: BLE001
        pass
