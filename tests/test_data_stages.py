"""The three data stages (clean corpus -> tokenizer -> packed dataset) on the fixture corpus."""

import json
import re

import datasets
import numpy as np
import pyarrow.parquet as pq
import transformers
from conftest import (
    DUPLICATE,
    FOOTNOTED,
    LATIN_LINE,
    MARKED_DUPLICATE,
    MIXED_LINE,
    NEAR_DUPLICATE,
    PARTLY_WRAPPED,
    PRE_REFORM,
    PUNCTUATION_CLEAN,
    REPAIRED,
    STAGE_CELLS,
    STANZAS,
    WRAPPED_SENTENCE,
    stage_dir,
)

SMOKE_CONTEXT = 128


def test_cold_run_builds_every_stage(cold_run):
    _, result = cold_run
    for stage in STAGE_CELLS:  # every stage, in pipeline order
        status, why = result["stages"][stage]
        assert status.startswith("built"), (stage, status)
        assert "no previous build" in why


def test_clean_corpus_content(cold_run):
    workdir, _ = cold_run
    folder = stage_dir(workdir / "cache", "clean_corpus")
    table = pq.read_table(folder / "paragraphs.parquet").to_pandas()
    files = pq.read_table(folder / "files.parquet").to_pandas().set_index("file")
    texts = list(table.text)

    assert texts.count(DUPLICATE) == 1, "duplicate paragraph kept twice"
    assert len(texts) == len(set(t for t in texts if len(t) >= 40)) + sum(
        len(t) < 40 for t in texts
    )
    assert files.loc["author_a_copy.txt", "paragraphs_kept"] == 0, "byte-identical file not removed"
    assert texts.count("— Нет.") == 3, "legitimate repeated dialogue was deduplicated"
    assert LATIN_LINE not in texts and MIXED_LINE not in texts
    assert not any(re.search(r"[A-Za-z]", t) for t in texts), "Latin letters survived"
    assert PRE_REFORM in texts, "pre-reform Cyrillic letters were treated as foreign"
    assert PUNCTUATION_CLEAN in texts
    assert not any(re.search(r"!!|\?\?|\.\.|,,|\?!\?", t) for t in texts)
    assert WRAPPED_SENTENCE in texts, "hard-wrapped paragraph not re-joined"
    assert not any(ch in t for t in texts for ch in "\r\ufeff"), "CR or BOM in a paragraph"
    verse = [t for t in texts if "\n" in t]  # only stanzas keep line breaks: short lines each
    assert all(len(line) <= 60 for t in verse for line in t.split("\n")), "prose kept a line break"
    assert "* * *" not in texts and "12" not in texts  # no Cyrillic letters
    assert files.index.tolist() == sorted(files.index), "files not read in sorted order"
    assert "more/author_c.txt" in files.index, "nested folders not read"
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["dropped: duplicate"] >= 60
    assert stats["dropped: mostly foreign letters"] + stats["dropped: only foreign sentences"] >= 2


def test_repairs_keep_russian_text_and_verse_keeps_its_lines(cold_run):
    workdir, result = cold_run
    folder = stage_dir(workdir / "cache", "clean_corpus")
    texts = pq.read_table(folder / "paragraphs.parquet").column("text").to_pylist()
    for (
        source,
        repaired,
    ) in REPAIRED:  # homoglyphs, stress marks, numerals, №, noise, foreign phrase
        assert repaired in texts, (source, [t for t in texts if t[:12] == repaired[:12]])
    assert not any(
        re.search(r"[^\W\d_]", t) and re.search(r"[A-Za-z\u00c0-\u024f]", t) for t in texts
    )
    assert PARTLY_WRAPPED in texts, (
        "the wrapped paragraph of a partly wrapped file was not re-joined"
    )
    keys = [re.sub(r"[\W_]+", "", t.lower().replace("ё", "е")) for t in texts]
    near = re.sub(r"[\W_]+", "", NEAR_DUPLICATE[1].replace("ё", "е"))
    assert keys.count(near) == 1, "a near-duplicate pair survived (or both copies were dropped)"
    for stanza in STANZAS:  # one unit per stanza, line breaks kept, stanza numbers not glued
        assert "\n".join(stanza) in texts
    assert not any(t.startswith(("1 ", "2 ")) for t in texts)
    stats = json.loads((folder / "stats.json").read_text())
    for repair in (
        "Latin look-alikes in Russian words",
        "stress marks removed",
        "page numbers {123}",
        "heading numbers removed",
        "foreign sentences removed",
        "'#' used as a hyphen",
    ):
        assert stats[f"repaired: {repair}"] >= 1, repair
    assert stats["files"] == 9 and "centred_verse.txt" in result["text"]  # the fixture's 9 files
    # footnotes: markers go, footnote bodies and numbered note lines go, "— —" is one dash
    for source, cleaned in FOOTNOTED:
        assert source not in texts and (cleaned is None or cleaned in texts), (source, cleaned)
    assert not any(re.search(r"\[(\d+|\*)\]", t) for t in texts), "a footnote marker survived"
    assert texts.count(MARKED_DUPLICATE[1]) == 1, "copies differing by a marker both survived"
    assert stats["repaired: footnote markers removed"] >= 3
    assert (
        stats["dropped: footnote body"] == 2 and stats["dropped: numbered note or title line"] == 1
    )
    assert "main loss" in result["text"] and "kept %" in result["text"]


def test_tokenizer_round_trips_and_special_tokens(cold_run):
    workdir, result = cold_run
    folder = stage_dir(workdir / "cache", "tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(folder / "hf")
    texts = pq.read_table(stage_dir(workdir / "cache", "clean_corpus") / "paragraphs.parquet")
    texts = texts.column("text").to_pylist() + ["  двойной  пробел\nи ѣ «ё» — …", " ведущий"]
    ids = tok(texts, verbose=False)["input_ids"]
    assert tok.batch_decode(ids, skip_special_tokens=True) == texts
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<pad>", "<bos>", "<eos>")] == [
        0,
        1,
        2,
        3,
    ]
    assert all(seq[0] == tok.bos_token_id for seq in ids)
    assert not any(tok.unk_token_id in seq for seq in ids)
    assert tok.model_max_length == SMOKE_CONTEXT
    assert 300 <= len(tok) <= 400
    assert re.search(r"exact round trip: (\d+)/\1 paragraphs, 9/9 tricky strings", result["text"])


def test_packed_dataset_blocks_labels_and_split(cold_run):
    workdir, _ = cold_run
    folder = stage_dir(workdir / "cache", "dataset")
    packed = datasets.load_from_disk(str(folder / "dataset"))
    assert set(packed) == {"train", "validation"}
    for split in packed.values():
        ids = np.array(split["input_ids"])
        mask, labels = np.array(split["attention_mask"]), np.array(split["labels"])
        assert ids.shape[1] == SMOKE_CONTEXT and len(ids) > 0
        assert (labels[mask == 1] == ids[mask == 1]).all() and (labels[mask == 0] == -100).all()
        assert (ids[mask == 0] == 1).all(), "padding is not <pad>"
        assert (mask[:-1] == 1).all(), "only the last block may be padded"
        assert (ids == 0).sum() == 0, "<unk> in packed data"
        stream = ids[mask == 1]
        assert stream[0] == 2, "a split must start with <bos>"
        after_eos = stream[1:][stream[:-1] == 3]
        assert len(after_eos) > 0 and (after_eos == 2).all(), (
            "a unit after <eos> must start with <bos>"
        )
        assert stream[-1] == 3, "the last unit must end with <eos>"

    splits = pq.read_table(folder / "split_paragraphs.parquet").to_pandas()
    corpus = pq.read_table(stage_dir(workdir / "cache", "clean_corpus") / "paragraphs.parquet")
    corpus = corpus.to_pandas().merge(splits, on=["file_id", "para_id"])
    by_split = corpus.groupby("split")
    assert set(by_split.groups) == {"train", "validation"}
    long = corpus[corpus.text.str.len() >= 40]  # short dialogue ("— Нет.") may repeat anywhere
    by_long = long.groupby("split")
    assert not set(by_long.get_group("train").text) & set(by_long.get_group("validation").text)
    assert corpus.groupby(["file_id", "para_id"]).split.nunique().max() == 1
    per_file = corpus.groupby("file_id").split.unique()
    big = corpus.groupby("file_id").size() >= 200  # >= 1/VAL_FRACTION blocks: in both splits
    assert all("train" in s and "validation" in s for s in per_file[big]), "a big file not in both"
    val_share = (corpus.split == "validation").mean()
    assert 0.03 < val_share < 0.08, "validation share far from VAL_FRACTION = 0.05"


def test_warm_run_skips_all_and_reproduces_outputs(cold_run, warm_copy):
    from conftest import progress_bars, run_alone

    cold_dir, cold = cold_run
    warm = run_alone(warm_copy, "warm")  # as the cold run: the notebook alone in its folder
    assert {s: v[0] for s, v in warm["stages"].items()} == {
        "clean_corpus": "cached",
        "tokenizer": "cached",
        "dataset": "cached",
        "pretrain": "cached",
        "sft_data": "cached",
        "base_answers": "cached",
        "sft_model": "cached",
    }
    assert warm["stage_seconds"] < 0.5 * cold["stage_seconds"], (
        warm["stage_seconds"],
        cold["stage_seconds"],
    )

    def shown(run, workdir):  # what every cell shows, except the build-or-load cells themselves
        return [  # (table columns are as wide as the longest path: spacing may differ)
            re.sub(r"\s+", " ", text.replace(str(workdir), "<workdir>"))
            for text, source in zip(run["cells"], run["sources"], strict=True)
            if "run_stage(" not in source and not source.startswith("# Summary")
        ]

    assert shown(warm, warm_copy) == shown(cold, cold_dir)
    assert "val perplexity" in warm["text"], "the warm run must still show the training table"
    bars = progress_bars(cold["nb"])
    for step in ("cleaning", "Map", "generating", "answering", "Tokenizing train dataset"):
        assert any(step in bar for bar in bars), (step, bars)
    assert any(bar.startswith("# Stage 4: train") for bar in bars), "no training progress bar"
    assert progress_bars(warm["nb"]) == [], "a warm run shows progress bars"
