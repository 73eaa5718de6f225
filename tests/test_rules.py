"""Pure rules of the data stages — cleaning, the split, packing — on the notebook's definition
cells alone, in this process: seconds, no kernel, no notebook run."""

import collections
import html
import random
import unicodedata

import numpy as np
import pytest
from conftest import (
    FOOTNOTED,
    PUNCTUATION,
    PUNCTUATION_CLEAN,
    REPAIRED,
    STANZAS,
    WRAPPED_SENTENCE,
    definitions,
    paragraph,
)

pytestmark = pytest.mark.fast  # definition cells only: `uv run pytest -m fast`

CLEANING = ["# Inputs", "# Text", "# Stage 1"]  # (its definition cells: a new one is taken too)
PACKING = ["# Stage 3"]


@pytest.fixture(scope="module")
def nb():
    return definitions(*CLEANING, *PACKING)


def clean(nb, paragraphs: list[str]) -> tuple[list[str], object]:
    log = nb["CleaningLog"]()
    return nb["clean_paragraphs"](paragraphs, log), log


def test_repairs_footnotes_and_punctuation(nb):
    as_read = [unicodedata.normalize("NFC", html.unescape(source)) for source, _ in REPAIRED]
    kept, log = clean(nb, as_read + [PUNCTUATION])  # (reading a file decodes entities, NFC)
    assert kept == [repaired for _, repaired in REPAIRED] + [PUNCTUATION_CLEAN]
    assert (
        log.repairs["Latin look-alikes in Russian words"] >= 1
        and log.repairs["stress marks removed"]
    )
    kept, log = clean(nb, [source for source, _ in FOOTNOTED])
    assert kept == [cleaned for _, cleaned in FOOTNOTED if cleaned]
    assert log.drops == collections.Counter({"footnote body": 2, "numbered note or title line": 1})


def test_the_script_filter_keeps_russian_sentences_and_drops_foreign_paragraphs(nb):
    mixed = (
        "Он вошел в гостиную и поклонился всем. Mon cher, vous êtes charmant. Потом он сел у окна."
    )
    kept, log = clean(nb, ["This English line must be dropped.", mixed])
    assert kept == ["Он вошел в гостиную и поклонился всем. Потом он сел у окна."]
    assert log.drops == {"mostly foreign letters": 1}


def test_wrapped_lines_rejoin_and_verse_keeps_its_lines(nb):
    rng, lines = random.Random(0), []
    for para in [WRAPPED_SENTENCE] + [paragraph(rng) for _ in range(30)]:  # wrapped at ~60
        line = "   "  # a paragraph's first line is indented, as in the corpus
        for word in para.split():
            if len(line) + len(word) + 1 > 60:
                lines.append(line.rstrip())
                line = ""
            line += word + " "
        lines.append(line.rstrip())
    paragraphs = nb["split_paragraphs"]("\n".join([*lines, "", *STANZAS[0]]))
    assert paragraphs[0] == WRAPPED_SENTENCE and paragraphs[-1] == "\n".join(STANZAS[0])
    assert len(paragraphs) == 32, "wrapped paragraphs were split or joined"


def test_duplicates_go_corpus_wide_short_lines_only_inside_a_repeated_passage(nb):
    long = "Этот абзац повторяется в двух файлах и должен остаться только один раз в корпусе."
    seen, log = set(), nb["CleaningLog"]()
    first = ["— Нет.", long, "— Нет."]
    kept = nb["drop_duplicates"](first, nb["dedup_keys"](first), seen, log)
    again = ["Другое начало.", long.upper(), "— Нет.", "Конец."]  # the long one again, in capitals
    kept += nb["drop_duplicates"](again, nb["dedup_keys"](again), seen, log)
    assert kept == ["— Нет.", long, "— Нет.", "Другое начало.", "— Нет.", "Конец."]
    assert log.drops == {"duplicate": 1}


def units(nb, sizes_per_file: list[list[int]]) -> list:
    return [nb["Unit"](f, row, 0, [np.ones(n, dtype=np.int32)], n, True)
            for f, sizes in enumerate(sizes_per_file) for row, n in enumerate(sizes)]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_split_holds_its_share_of_tokens_in_every_big_file(nb, seed):
    rng = np.random.default_rng(seed)
    files = [list(rng.integers(5, 400, size=rng.integers(50, 400))) for _ in range(6)]
    cfg = {"SEED": seed, "VAL_FRACTION": 0.05}
    split = units(nb, files)
    is_val, sections = nb["assign_splits"](split, 512, cfg)
    tokens = np.array([u.tokens for u in split])
    assert abs(tokens[is_val].sum() / tokens.sum() - 0.05) < 0.01
    assert len(set(sections[is_val]) & set(sections[~is_val])) == 0, "a section in both splits"
    assert (is_val == nb["assign_splits"](split, 512, cfg)[0]).all(), "not deterministic"
    for f in range(6):  # each file lands in both splits
        mine = np.array([u.file_id == f for u in split])
        assert is_val[mine].any() and (~is_val[mine]).any()


def test_a_corpus_of_one_section_is_too_small_to_split(nb):
    with pytest.raises(nb["CorpusError"], match="too small for a train/validation split"):
        nb["assign_splits"](units(nb, [[10, 10]]), 512, {"SEED": 0, "VAL_FRACTION": 0.05})


def test_packing_joins_a_section_s_paragraphs_and_pads_only_the_last_block(nb):
    special = {"bos": 2, "eos": 3, "pad": 1, "newline": 9}
    segments = [np.array([10, 11]), np.array([12]), np.array([13, 14, 15]), np.array([16])]
    sequences = nb["build_sequences"](segments, [0, 0, None, 1], max_tokens=5, newline_id=9)
    assert [np.concatenate(s).tolist() for s in sequences] == [[10, 11, 9, 12], [13, 14, 15], [16]]
    blocks = nb["pack_blocks"](sequences, 5, special)
    stream = [2, 10, 11, 9, 12, 3, 2, 13, 14, 15, 3, 2, 16, 3]
    assert blocks.ravel().tolist() == stream + [1] * (len(blocks) * 5 - len(stream))
    assert (blocks[:-1] != 1).all(), "only the last block may hold padding"
