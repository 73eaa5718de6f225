"""Corpora shaped a little differently: they work, or stop with one clear line before publishing."""

from conftest import one_line_error, run_live, stage_dir


def test_one_sentence_per_line_corpus_keeps_sentences_and_validation(live_kernel, tmp_path):
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    subjects = ["Старик", "Мальчик", "Солдат", "Девушка", "Ямщик", "Граф", "Доктор", "Сосед"]
    verbs = ["долго смотрел на реку", "медленно шел по дороге", "тихо говорил с другом"]
    for f in range(3):
        lines = [
            f"{subjects[(i + f) % 8]} {verbs[i % 3]} в {i + 2 * f}-й день осени."
            for i in range(150)
        ]
        (corpus / f"lines_{f}.txt").write_text("\n".join(lines), encoding="utf-8")
    result = run_live(live_kernel, tmp_path, "dataset")
    assert result["error"] is None, result["error"]
    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    texts = pq.read_table(stage_dir(cache, "clean_corpus") / "paragraphs.parquet").column("text")
    assert len(texts) == 450, "sentences on their own lines were merged into paragraphs"
    splits = pq.read_table(stage_dir(cache, "dataset") / "split_paragraphs.parquet").to_pandas()
    assert 0.03 <= (splits.split == "validation").mean() <= 0.08


def test_corpus_where_nothing_survives_stops_before_publishing(live_kernel, tmp_path):
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "english.txt").write_text("This is English.\nSo is this line.\n12 345\n", "utf-8")
    result = run_live(live_kernel, tmp_path, "clean_corpus")
    assert "Nothing left after cleaning 1 files" in one_line_error(result)
    assert not list((tmp_path / "cache").glob("*/*/manifest.json")), "an empty stage was published"
