"""``train(cfg)``: the seed's six steps, top to bottom.

prepare data → load model → build task (strategy, optimizer) → train → evaluate → deploy.
Every object comes from the composed config (built in ``sftlab.config``); this module only wires
them, and the run's results go into its own dir (written by ``sftlab.results``):

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
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sftlab.config import (
    check_config,
    in_multirun,
    instantiate,
    instantiate_group,
    output_dir,
    route_lightning_logs,
)

log = logging.getLogger(__name__)

# The dir this process's run owns, once known: main() records a failure only there (a run
# refused because its dir holds another run must not write into that run).
_RUN_DIR: Path | None = None


def prepare_run(cfg: DictConfig) -> DictConfig:
    """Own the run dir before any work: a fresh one, the run ``resume=`` continues, or a sweep job's.

    Returns the config to run (a resumed run's own). Only rank 0 claims; DDP's other ranks
    are started later into the dir rank 0 already owns. A sweep job whose dir holds an
    earlier attempt (the sweep is being re-run) is skipped, resumed or started again there
    (``sftlab.sweeps``); every rank takes the same decision from the same files.
    """
    global _RUN_DIR
    from sftlab.cluster import check_shared_run_dir
    from sftlab.runs import adopt_run_dir, claim_run_dir, is_rank_zero, resume_config

    check_shared_run_dir(cfg)
    fresh = Path(cfg.paths.output_dir)
    if not is_rank_zero():
        # DDP's other ranks run this script again inside rank 0's run dir: they write nothing
        # there, their log included (it goes to the console, next to rank 0's)
        for handler in list(logging.getLogger().handlers):
            if isinstance(handler, logging.FileHandler):
                logging.getLogger().removeHandler(handler)
                handler.close()
    if not cfg.get("resume") and in_multirun():
        _RUN_DIR = fresh  # a sweep job's dir is its own, whatever an earlier attempt left there
        return _continue_sweep_job(cfg, fresh)
    if not cfg.get("resume") and is_rank_zero():
        claim_run_dir(fresh)
    _RUN_DIR = fresh
    if cfg.get("resume"):
        cfg = resume_config(cfg)
        run = Path(cfg.paths.output_dir)
        adopt_run_dir(run, fresh)
        _RUN_DIR = run
    return cfg


def _continue_sweep_job(cfg: DictConfig, job_dir: Path) -> DictConfig:
    """A sweep job in its own dir: skip it (``JobDone``), resume it, or start it there."""
    from omegaconf import open_dict

    from sftlab import sweeps
    from sftlab.runs import is_rank_zero, resume_config

    state = sweeps.read_state(job_dir)
    action = sweeps.decide(state, bool(OmegaConf.select(cfg, "sweep.rerun_failed", default=False)))
    if action == sweeps.SKIP:
        raise sweeps.JobDone(state)
    if action == sweeps.RESUME:
        log.info("Resuming sweep job %s from %s", job_dir, state.checkpoint)
        with open_dict(cfg):
            cfg.resume = str(job_dir)
        return resume_config(cfg, sweep_job=True)
    if state.status == "failed" and is_rank_zero():  # asked to rerun it
        sweeps.set_failed_attempt_aside(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def _guard_secrets(cfg: DictConfig, out: Path, resuming: bool) -> set[str]:
    """The secret values of this run; masks them in what Hydra saved before we ran."""
    from sftlab.checkpointing import remove_partial_checkpoints
    from sftlab.runs import is_rank_zero, new_wandb_id
    from sftlab.secrets import mask_files, secret_values

    if not resuming:
        new_wandb_id(cfg)
    secrets = secret_values(OmegaConf.to_container(cfg, resolve=True))
    if is_rank_zero():
        if resuming:
            remove_partial_checkpoints(Path(cfg.ckpt_path).parent)
        # Hydra saved the command line before we ran (a resumed sweep job's too): mask any
        # secret given there
        saved = sorted((out / ".hydra").glob("*.yaml"))
        if in_multirun():  # and once more for the whole sweep
            saved.append(out.parent / "multirun.yaml")
        mask_files(saved, secrets)
    return secrets


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, select the best checkpoint on validation, test it, export it; return metrics."""
    from sftlab.perf import blas

    blas.from_config(cfg)  # before anything imports torch: MKL's fast path on AMD CPUs
    cfg = prepare_run(cfg)
    check_config(cfg)
    import lightning.pytorch as pl

    from sftlab.callbacks import TrainThroughput
    from sftlab.checkpointing import AtomicCheckpointIO, RNGState
    from sftlab.cluster import cluster_plugins
    from sftlab.loggers import finish_wandb
    from sftlab.optim import base_lr
    from sftlab.perf.precision import resolve_precision
    from sftlab.pretrained import load_tokenizer
    from sftlab.results import peak_rss_mb, run_stats, save_results
    from sftlab.runs import keep_csv_history
    from sftlab.secrets import public_config
    from sftlab.tasks import build_datamodule, build_module, task_of

    route_lightning_logs()
    out = output_dir(cfg)
    resuming = bool(cfg.get("resume"))
    secrets = _guard_secrets(cfg, out, resuming)
    pl.seed_everything(cfg.seed, workers=True)

    # 1. prepare data (labels come from the data: the head's size and id2label; the data
    # config names the task, sequence classification unless data.task says otherwise)
    task = task_of(cfg)
    tokenizer = load_tokenizer(**cfg.model, split_into_words=task.split_into_words)
    datamodule = build_datamodule(cfg.data, task, tokenizer=tokenizer)
    label_names = datamodule.label_names

    # 2-3. load the pretrained model and build the task around it with the strategy
    strategy = instantiate(cfg.strategy)
    module = build_module(
        cfg.model, task,
        label_names=label_names,
        strategy=strategy,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        pad_token_id=tokenizer.pad_token_id,
    )

    # 4. train, in the precision measured fastest for this model on this machine (trainer.precision=auto)
    calibration = resolve_precision(cfg, module.model)
    throughput = TrainThroughput(peak_gflops=calibration.peak_gflops() if calibration else None,
                                 peak_per_process=bool(calibration and calibration.machine["device"] == "cuda"))
    # RNGState is not optional like the configured callbacks: without it a resumed run's
    # dropout differs from the uninterrupted run's
    callbacks = instantiate_group(cfg.get("callbacks")) + strategy.callbacks() + [throughput, RNGState()]
    callbacks += instantiate_group(cfg.get("perf"))  # speed-ups (conf/perf), also config callbacks
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        # the datamodule's batch sampler shards itself over ranks (sftlab.data.batching)
        use_distributed_sampler=False,
        plugins=[*(cfg.trainer.get("plugins") or []), *cluster_plugins(), AtomicCheckpointIO()],
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
        # a signal after the last point where training could stop still stops the run
        # (CrashSafeCheckpoint.after_fit: save, skip test and export, exit)
        for cb in trainer.callbacks:
            if callable(getattr(cb, "after_fit", None)):
                cb.after_fit(trainer)
        # the run's own numbers first: loading the best checkpoint below restores every
        # callback's state (throughput, skipped steps) to what it was at that checkpoint
        stats = run_stats(trainer, module, strategy)
        stats.update(calibration.metrics() if calibration else {"precision": str(cfg.trainer.precision)})
        stats.update(blas.status())
        # what a study groups by: the base LR trained with, the seed, the task's main metric
        stats.update(lr=base_lr(cfg.optimizer), seed=int(cfg.seed),
                     main_metric=getattr(module, "main_metric", "acc"))
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
                    config=hparams, metrics=metrics, extra={"label_names": label_names, "task": task.name},
                )
    except BaseException:
        finish_wandb(trainer.loggers, failed=True)
        raise
    finish_wandb(trainer.loggers, failed=False)
    return metrics


def evaluate_best(cfg: DictConfig, trainer, module, datamodule) -> dict[str, Any]:
    """Validation and test metrics of the best checkpoint (the last weights if none was kept)."""
    from sftlab.results import scalar_metrics

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    metrics: dict[str, Any] = {"best_checkpoint": best}
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
    metrics.update(scalar_metrics(results[0] if results else {}))  # [] when validation is off
    if cfg.get("test") and (datamodule.files.get("test") or datamodule.hub_name):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update(scalar_metrics(results[0] if results else {}))
    return metrics


def main(cfg: DictConfig) -> float:
    """Hydra task function: returns the task's main validation metric (val/acc, val/f1), the
    value sweepers (optuna) maximise.

    A failed run records ``status: failed`` and the error in its own metrics.json. In a
    multirun, one failing job (a NaN at a silly LR, a bad combination) must not take the
    sweep's other results with it: the failure is recorded for the sweep report, and the
    sweep goes on. A run stopped by SIGTERM/SIGINT records ``status: interrupted`` and how to
    resume it, and exits (a sweep stops too: the signal was meant for all of it). A sweep job
    that completed in an earlier run of the sweep returns its recorded value (``sftlab.sweeps``).
    """
    global _RUN_DIR
    from sftlab.cluster import hand_over_requeue
    from sftlab.results import record_failure, record_interrupted
    from sftlab.runs import RunInterrupted, is_rank_zero
    from sftlab.sweeps import JobDone, objective

    _RUN_DIR = None
    try:
        return objective(train(cfg))
    except JobDone as done:  # a re-run sweep: this job completed before
        log.info("%s", done)
        return done.state.value
    except RunInterrupted as err:
        if _RUN_DIR is not None and is_rank_zero():
            record_interrupted(_RUN_DIR, err)
            if err.checkpoint:
                log.warning("Stopped by %s at step %d; continue with: python train.py resume=%s",
                            err.signal_name, err.step, _RUN_DIR)
        hand_over_requeue(err)  # on SLURM under submitit: requeue the job, which resumes here
        raise
    except Exception as err:
        if _RUN_DIR is not None and is_rank_zero():
            record_failure(_RUN_DIR, err)
        if not in_multirun():
            raise
        log.error("Job failed (%s: %s); recorded in metrics.json, the sweep goes on.", type(err).__name__, err)
        return float("nan")
