"""Frozen layers computed once: the bottom of the model that never trains runs once per example.

Why: ``head_only`` and ``partial`` freeze the embeddings and the bottom blocks, yet without this
every epoch (and every job of a sweep) runs that frozen prefix forward on every example again,
although its output is the same each time. For ``head_only`` the prefix is the whole body, so a
training step is left with the pooler, the head, the optimizer and the loop.

What it does (``FrozenPrefixCache``, a callback in ``conf/perf``, switched per strategy by
``strategy.cache_frozen``): the frozen prefix is the embeddings plus blocks ``0 .. k-1`` when
none of them ever trains (``k`` from the strategy's own ``stage``/``selected``; gradual unfreezes
its lower parts later, so its prefix is empty and nothing is cached). Before training it runs
that prefix over every row of train and validation (test before testing), in length-sorted
batches of ``batch_size``, in eval mode under no grad and the run's precision, and keeps the
output of block ``k-1`` per row (``idx``), unpadded. During fit/validate/test, blocks
``0 .. k-2`` of the model return their input and block ``k-1`` returns the batch's cached rows,
padded by the batch's attention mask (:mod:`sftlab.perf.frozen_prefix`); the model is otherwise
called as usual, so the trainable blocks, pooler and head run their own code with the model's
own attention masks. The embeddings still run (cheap; their output is not used). After each
stage the swap is undone, so the exported model is the plain model.

What changes: the frozen layers run in **eval mode**, so there is no dropout inside them. Without
the cache they run in train mode (``model.train()`` reaches every module, frozen or not), and
their hidden/attention dropout perturbs the features the head sees; with it the head trains on
the clean features it is evaluated on. The top's outputs on cached inputs equal those of a live
eval-mode prefix: bit for bit when the cache was computed on the same batch, within fp32
rounding (~1e-8 on the tests' logits) when computed in another batch (other padding lengths
change the kernels' summation order).

On disk: ``<paths.cache_dir>/frozen/<key>.pt`` per split, keyed by the model (name and a digest
of the frozen weights themselves, so a revision or a retrained checkpoint at the same path gets
its own entry), the frozen depth, the split's tokenization fingerprint (files, tokenizer,
max_length, caps, ...; ``data/cache.py``), the precision, device type and attention
implementation; loaded memory-mapped, so every job of a sweep shares one copy. Size: one fp32
vector of ``hidden`` per real token (MiniLM: 46.9 MiB for 600 AG News rows, ~470 MiB for the sample),
or per row where the prefix is the whole body and the head reads only the first token (right
padding): then the rest of each row is never read, and only its first position is kept
(``PrefixStore(first_only=True)``, ~50x smaller on AG News; part of the disk key).

Architectures: those whose blocks take and return the ``[batch, tokens, hidden]`` tensor
(``SUPPORTED``: BERT-like, ELECTRA, DistilBERT, GPT-2); others (XLNet's [tokens, batch] streams,
DeBERTa's conv after block 0) run live with a warning. Under DDP rank 0 fills the disk cache
and the other ranks load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from sftlab.errors import ConfigError
from sftlab.layers import BLOCK, EMBEDDINGS
from sftlab.module_tree import get_module, unwrap
from sftlab.perf.frozen_prefix import FrozenPrefix, PrefixStore, attention_mask_of

log = logging.getLogger(__name__)

#: model types whose blocks pass [batch, tokens, hidden] tensors (checked again at run time)
SUPPORTED = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "gpt2"})
_VERSION = "1"
_STAGES = {"fit", "validate", "test"}


def frozen_depth(strategy, layer_map) -> int:
    """How many bottom blocks never train while the embeddings never train either (else 0)."""
    def never(part) -> bool:
        return strategy.stage(part, layer_map) is None or not strategy.selected(part, layer_map)

    if layer_map.embeddings is not None and not never(layer_map.embeddings):
        return 0
    depth = 0
    for part in layer_map.blocks:
        if not never(part):
            break
        depth += 1
    return depth


def cache_key(**parts: Any) -> str:
    """The hash of everything that shapes a split's prefix outputs."""
    return hashlib.sha256(json.dumps({"v": _VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:24]


def weights_digest(named_params) -> str:
    """Digest of parameter names, dtypes, shapes and bytes (~0.1 s for MiniLM's body)."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in named_params:
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenPrefixCache(pl.Callback):
    """Compute the frozen prefix once per row and train the top on it (see the module docstring)."""

    def __init__(self, cache_dir: str | None = None, batch_size: int = 64) -> None:
        self.cache_dir = Path(cache_dir) / "frozen" if cache_dir else None
        self.batch_size = int(batch_size)
        self.prefix: FrozenPrefix | None = None
        self.stores: dict[str, PrefixStore] = {}
        self._params: list[tuple[str, Any]] = []
        self._model_key: dict[str, Any] = {}
        self.first_only = False  # rows keep their first position only (PrefixStore)
        self.stats = {"rows_computed": 0, "rows_loaded": 0, "build_s": 0.0}

    # ------------------------------------------------------------------ install / remove
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = getattr(pl_module, "strategy", None)
        if stage not in _STAGES or not getattr(strategy, "cache_frozen", False):
            return
        model = pl_module.model
        if self.prefix is None or self.prefix.model is not model:
            self.prefix, self.stores = self._build(strategy, model), {}
            self.first_only = self.prefix is not None and self._first_only(trainer, pl_module)
            self._model_key["first_only"] = self.first_only
        if self.prefix is not None:
            self.prefix.install()
            pl_module.frozen_cached_blocks = self.prefix.depth  # these blocks do not run (train_mfu)

    def _build(self, strategy, model) -> FrozenPrefix | None:
        layer_map = strategy.layers(model)
        depth = frozen_depth(strategy, layer_map)
        if depth == 0:
            log.info("frozen prefix cache: %s trains the embeddings or the bottom block; nothing to cache",
                     strategy.name)
            return None
        if layer_map.model_type not in SUPPORTED:
            log.warning("frozen prefix cache: not available for model_type %r (supported: %s); the frozen "
                        "layers run live", layer_map.model_type, ", ".join(sorted(SUPPORTED)))
            return None
        self._params = [(n, p) for part in layer_map if part.kind == EMBEDDINGS
                        or (part.kind == BLOCK and part.index < depth) for n, p in part.params]
        self._model_key = {"model": getattr(unwrap(model), "name_or_path", ""),
                           "model_type": layer_map.model_type, "depth": depth}
        log.info("frozen prefix cache: embeddings + block.0..block.%d run once per example, in eval mode",
                 depth - 1)
        return FrozenPrefix(model, get_module(model, layer_map.blocks_path), depth)

    def _first_only(self, trainer, pl_module) -> bool:
        """Whether each row's first position is all the model reads of the prefix: the prefix is
        every block, the head reads only the first token, and rows are right-padded."""
        from sftlab.perf.last_block import reads_first_token

        assert self.prefix is not None
        if self.prefix.depth != len(self.prefix.all_blocks) or reads_first_token(pl_module) is not None:
            return False
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        return getattr(tokenizer, "padding_side", None) == "right"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.frozen_cached_blocks = 0
        if self.prefix is not None:
            self.prefix.remove()

    # ------------------------------------------------------------------ filling the stores
    def on_fit_start(self, trainer, pl_module) -> None:
        self._prepare(trainer, pl_module, ("train", "validation"))

    def on_validation_start(self, trainer, pl_module) -> None:
        # within fit the prefix cannot change (on_train_batch_start checks it stays frozen)
        self._prepare(trainer, pl_module, ("validation",), weights=trainer.state.fn != "fit")

    def on_test_start(self, trainer, pl_module) -> None:
        self._prepare(trainer, pl_module, ("test",))

    def _prepare(self, trainer, pl_module, splits, weights: bool = True) -> None:
        """Rank 0 loads or computes (and saves) first; the other ranks then load its files.

        The frozen weights are hashed here, not in ``setup``: Lightning restores a checkpoint
        (``ckpt_path``, ``resume=``, the best checkpoint for validate/test) after ``setup``, and
        a checkpoint may hold other frozen weights than the pretrained ones.
        """
        if self.prefix is None:
            return
        t0 = time.perf_counter()
        if weights:
            inner = unwrap(pl_module.model)
            now = {"weights": weights_digest(self._params),
                   "attn": getattr(getattr(inner, "config", None), "_attn_implementation", None)}
            if any(self._model_key.get(k) != v for k, v in now.items()):
                self.stores = {}  # rows of other weights
                self._model_key.update(now)
        if trainer.is_global_zero:
            for split in splits:
                self._fill(trainer, pl_module, split)
        trainer.strategy.barrier("frozen_prefix_cache")
        if not trainer.is_global_zero:
            for split in splits:
                self._fill(trainer, pl_module, split)
        self.stats["build_s"] += time.perf_counter() - t0

    def _fill(self, trainer, pl_module, split: str) -> None:
        dm = trainer.datamodule
        datasets = getattr(dm, "datasets", {})
        if split not in datasets or len(self.stores.get(split, ())) == len(datasets[split]):
            return  # no such split here (rows then fill batch by batch), or complete already
        path = self._path(trainer, dm, split)
        if path is not None and path.is_file():
            self.stores[split] = PrefixStore.load(path, first_only=self.first_only)
            self.stats["rows_loaded"] += len(self.stores[split])
            log.info("frozen prefix cache: %s split loaded from %s", split, path)
            return
        from torch.utils.data import DataLoader

        from sftlab.data.batching import LengthGroupedBatchSampler

        store = self.stores.setdefault(split, PrefixStore(first_only=self.first_only))
        sampler = LengthGroupedBatchSampler(dm.lengths[split], self.batch_size, shuffle=False)
        # its own generator: a DataLoader iterator otherwise draws its base seed from the global
        # one, and a run that computes the cache would then drop out other units than one that loads it
        loader = DataLoader(datasets[split], batch_sampler=sampler, collate_fn=dm.collate,
                            generator=torch.Generator())
        for batch in loader:
            self._compute(trainer, pl_module, store, batch)
        if path is not None:
            store.save(path)

    def _path(self, trainer, dm, split: str) -> Path | None:
        if self.cache_dir is None or not callable(getattr(dm, "fingerprint", None)):
            return None
        parts = dict(self._model_key, data=dm.fingerprint(split), precision=str(trainer.precision),
                     device=trainer.strategy.root_device.type)
        key = cache_key(**parts)
        log.debug("frozen prefix cache key %s: %s", key, parts)
        return self.cache_dir / f"{key}.pt"

    def _compute(self, trainer, pl_module, store: PrefixStore, batch) -> None:
        assert self.prefix is not None
        batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with trainer.precision_plugin.forward_context():
            hidden = self.prefix.compute(batch)
        store.add(batch["idx"].tolist(), hidden, attention_mask_of(batch))
        self.stats["rows_computed"] += len(batch["idx"])

    # ------------------------------------------------------------------ each batch
    def _feed(self, trainer, pl_module, split: str, batch) -> None:
        if self.prefix is None or not self.prefix.installed:
            return
        if "idx" not in batch:
            raise ConfigError("strategy.cache_frozen needs batches with an 'idx' (row index) column, as "
                              "sftlab's data modules give; set strategy.cache_frozen=false.")
        store = self.stores.setdefault(split, PrefixStore(first_only=self.first_only))
        idx = batch["idx"].tolist()
        if store.missing(idx):  # a split the data module does not expose: fill as batches come
            self._compute(trainer, pl_module, store, batch)
        self.prefix.feed(store.gather(idx, attention_mask_of(batch)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.prefix is not None and any(p.requires_grad for _, p in self._params):
            # something unfroze a part of the prefix: its outputs change from now on
            log.warning("frozen prefix cache: a frozen layer started training; the cache is off from here")
            pl_module.frozen_cached_blocks = 0
            self.prefix.remove()
            self.prefix, self.stores = None, {}
        self._feed(trainer, pl_module, "train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._feed(trainer, pl_module, "validation", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._feed(trainer, pl_module, "test", batch)

    def run_stats(self) -> dict[str, Any]:
        """What ``metrics.json`` reports (read after fit: the train and validation splits)."""
        if self.prefix is None:
            return {"frozen_cache_blocks": 0}
        return {"frozen_cache_blocks": self.prefix.depth,
                "frozen_cache_first_token_only": self.first_only,
                "frozen_cache_rows_computed": self.stats["rows_computed"],
                "frozen_cache_rows_loaded": self.stats["rows_loaded"],
                "frozen_cache_build_s": round(self.stats["build_s"], 3),
                "frozen_cache_mb": round(sum(s.nbytes for s in self.stores.values()) / 2**20, 3)}
