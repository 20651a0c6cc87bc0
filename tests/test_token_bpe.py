"""NER with byte-level BPE tokenizers (RoBERTa, GPT-2): words need their prefix space.

Such a tokenizer reads a word's leading space as part of its first piece ("ĠBlackburn"), so
words tokenized one by one (``is_split_into_words``) without ``add_prefix_space=True`` get
pieces that raw text never gives ("B", "lackburn"): training and the exported pipeline would
disagree. Tiny random RoBERTa and GPT-2 models with a byte-level BPE trained here on the
CoNLL sample's words (no hub) run ``data=conll2003 debug=fast`` end to end; the export's stock
pipeline and sftlab's Python API must then find the same entities.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, tiny_overrides

KINDS = ("roberta", "gpt2")
TEXTS = ["Peter Blackburn spoke to the European Commission in Brussels on Thursday.",
         "Japan began the defence of their Asian Cup title with a win against Syria."]


def conll_sentences(split: str, n: int) -> list[list[str]]:
    with open(ROOT / "data" / "conll2003" / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["tokens"] for line in islice(fh, n)]


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory) -> dict[str, Path]:
    """kind -> a folder with a tiny random ``RobertaModel`` / ``GPT2Model`` and a byte-level
    BPE tokenizer of that family (saved without ``add_prefix_space``, as on the hub)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        GPT2Config,
        GPT2Model,
        GPT2TokenizerFast,
        RobertaConfig,
        RobertaModel,
        RobertaTokenizerFast,
    )

    root = tmp_path_factory.mktemp("bpe")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    texts = [" ".join(s) for s in conll_sentences("train", 400)] + TEXTS
    bpe.train_from_iterator(texts, vocab_size=800, min_frequency=1, special_tokens=specials, show_progress=False)
    bpe.save_model(str(root))
    merges = [tuple(line.split()) for line in (root / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")]
    tokenizers = {"roberta": RobertaTokenizerFast(vocab=bpe.get_vocab(), merges=merges),
                  "gpt2": GPT2TokenizerFast(vocab=bpe.get_vocab(), merges=merges, unk_token="<unk>",
                                            bos_token="<s>", eos_token="</s>")}
    out = {}
    for kind, tok in tokenizers.items():
        torch.manual_seed(0)
        if kind == "roberta":  # RoBERTa's positions start after the padding index: 128 + 2
            model = RobertaModel(RobertaConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=130, type_vocab_size=1, initializer_range=1.0,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        else:
            model = GPT2Model(GPT2Config(
                vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=1.0,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        out[kind] = root / kind
        model.save_pretrained(out[kind])
        tok.save_pretrained(out[kind])
    return out


@pytest.fixture(scope="module")
def bpe_runs(tmp_path_factory, bpe_dirs) -> dict[str, Path]:
    """kind -> the run dir of ``data=conll2003 debug=fast`` with that tiny model."""
    import torch

    from sftlab.train import train

    root = tmp_path_factory.mktemp("bpe_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in KINDS:
            # a small LR keeps the wide random weights, which tag entities of several kinds
            train(compose_config(["data=conll2003", "debug=fast", "trainer.precision=32-true",
                                  *tiny_overrides(root / kind, root / "cache", bpe_dirs[kind]),
                                  "optimizer.lr=1e-5"]))
    finally:
        torch.set_num_threads(threads)
    return {kind: root / kind for kind in KINDS}


def encodings(tok, sentences: list[list[str]]) -> tuple[list[list[int]], list[list[int]]]:
    """(ids of the words tokenized as words, ids of the same sentence as raw text)."""
    words = tok(sentences, is_split_into_words=True)["input_ids"]
    text = tok([" ".join(s) for s in sentences])["input_ids"]
    return words, text


@pytest.mark.parametrize("kind", KINDS)
def test_words_are_tokenized_as_in_running_text(bpe_dirs, kind):
    from transformers import AutoTokenizer

    from sftlab.pretrained import load_tokenizer, needs_prefix_space

    sentences = conll_sentences("test", 8)
    plain = AutoTokenizer.from_pretrained(bpe_dirs[kind])
    assert needs_prefix_space(plain)
    words, text = encodings(plain, sentences)
    assert words != text  # the problem: a word alone loses its leading-space piece
    tok = load_tokenizer(str(bpe_dirs[kind]), split_into_words=True)
    assert not needs_prefix_space(tok) and tok.add_prefix_space is True
    words, text = encodings(tok, sentences)
    assert words == text
    # classification tokenizes raw text: its tokenizer stays as the checkpoint has it
    same = load_tokenizer(str(bpe_dirs[kind]))
    assert needs_prefix_space(same) and same(TEXTS)["input_ids"] == plain(TEXTS)["input_ids"]


def test_wordpiece_tokenizers_are_left_alone(tiny_model_dir):
    from transformers import AutoTokenizer

    from sftlab.pretrained import load_tokenizer, needs_prefix_space

    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir), split_into_words=True)
    assert not needs_prefix_space(plain)
    assert "add_prefix_space" not in tok.init_kwargs or not tok.init_kwargs["add_prefix_space"]
    sentences = conll_sentences("test", 8)
    assert tok(sentences, is_split_into_words=True)["input_ids"] == \
        plain(sentences, is_split_into_words=True)["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_ner_run_and_its_export_agree(bpe_runs, kind):
    from transformers import AutoTokenizer, pipeline

    from sftlab import Classifier

    run = bpe_runs[kind]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and "test/f1" in metrics and "val/f1" in metrics
    model_dir = run / "model"
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["add_prefix_space"] is True
    # the export's tokenizer gives raw text the pieces training gave the words
    words, text = encodings(AutoTokenizer.from_pretrained(model_dir), conll_sentences("test", 8))
    assert words == text

    pipe = pipeline("token-classification", model=str(model_dir), aggregation_strategy="simple")
    want = [[(e["entity_group"], e["start"], e["end"], e["word"], float(e["score"])) for e in ents]
            for ents in pipe(TEXTS)]
    spans = [e for ents in want for e in ents]
    assert len(spans) >= 4 and len({e[0] for e in spans}) >= 2, want  # something to compare
    got = Classifier.load(run).predict(TEXTS)
    assert [r["text"] for r in got] == TEXTS
    for rec, ents in zip(got, want, strict=True):
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in rec["entities"]] == \
            [e[:4] for e in ents]
        assert all(abs(a["score"] - b[4]) < 1e-4 for a, b in zip(rec["entities"], ents, strict=True))
