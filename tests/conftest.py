"""Shared helpers: a fixture corpus the tests write themselves, and a papermill runner."""

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "LLM_Pretrain_SFT.ipynb"
STAGE_LINE = re.compile(r"^\[(\w+)\] (cached|built in [\d.]+s)(.*)$", re.M)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "true"

WORDS = (
    "дом лес река поле город солнце ветер ночь утро день снег дождь дорога окно дверь сад "
    "человек друг мать отец сестра брат старик девушка солдат князь граф барин ямщик "
    "говорил думал смотрел шел видел знал любил ждал слушал молчал писал читал помнил "
    "тихо долго вдруг опять снова никогда всегда уже еще только очень совсем почти "
    "большой старый новый темный светлый холодный теплый добрый злой тихий веселый "
    "и в на с по к у за от до из без над под о что как когда где но а да не"
).split()

# Special cases the cleaning must handle; tests look for them in the output.
WRAPPED_SENTENCE = (
    "Этот длинный абзац был перенесен по строкам как в старых электронных книгах и должен "
    "снова стать одной строкой без разрывов посреди предложения."
)
PRE_REFORM = "Вѣра и міръ остаются кириллицей, потому что ѣ и і это старые буквы."
LATIN_LINE = "This English line must be dropped."
MIXED_LINE = "Привет, world: смешанный абзац тоже уходит."
DUPLICATE = "Этот абзац повторяется в двух файлах и должен остаться только один раз в корпусе."
PUNCTUATION = "Что!!! Неужели??? Ну... Как?!?! Так…. Вот,, и всё"
PUNCTUATION_CLEAN = "Что! Неужели? Ну… Как?! Так… Вот, и всё"


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?", "…"])


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))


def write_corpus(folder: Path, seed: int = 0) -> Path:
    """Four small 'novels': plain, hard-wrapped (BOM + CRLF), a nested one, and a byte-identical copy."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    plain = [paragraph(rng) for _ in range(250)]
    plain[5:5] = ["— Нет.", paragraph(rng), "— Нет.", LATIN_LINE, MIXED_LINE, DUPLICATE]
    plain[20:20] = [PUNCTUATION, PRE_REFORM, "* * *", "12", "   "]
    (folder / "author_a.txt").write_text("\n\n".join(plain) + "\n", encoding="utf-8")

    wrapped = [WRAPPED_SENTENCE] + [paragraph(rng) for _ in range(250)] + [DUPLICATE]
    lines = []
    for para in wrapped:  # wrap at ~60 chars, first line indented like the real corpus
        words, current = para.split(), "   "
        for word in words:
            if len(current) + len(word) + 1 > 60:
                lines.append(current.rstrip())
                current = ""
            current += word + " "
        lines.append(current.rstrip())
    text = "\r\n".join(lines) + "\r\n"
    (folder / "author_b.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))

    (folder / "more").mkdir(exist_ok=True)
    nested = [paragraph(rng) for _ in range(250)]
    nested[10:10] = ["— Нет.", "Он подумал и ушел домой."]
    (folder / "more" / "author_c.txt").write_text("\n".join(nested), encoding="utf-8")
    shutil.copy(folder / "author_a.txt", folder / "author_a_copy.txt")
    return folder


def run_notebook(workdir: Path, name: str, **parameters) -> dict:
    """Execute the notebook with the smoke profile; return outputs, stage lines and timings."""
    params = {
        "PROFILE": "smoke",
        "DATA_DIR": str(workdir / "data"),
        "CACHE_DIR": str(workdir / "cache"),
        "ARTIFACTS_DIR": str(workdir / "artifacts"),
    }
    params.update(parameters)
    out = workdir / f"{name}.ipynb"
    start = time.perf_counter()
    nb = papermill.execute_notebook(
        str(NOTEBOOK), str(out), parameters=params, progress_bar=False, cwd=str(NOTEBOOK.parent)
    )
    seconds = time.perf_counter() - start
    texts, stage_seconds = [], 0.0
    for cell in nb.cells:
        cell_text = []
        for output in cell.get("outputs", []):
            cell_text.append("".join(output.get("text", "")))
            cell_text.append("".join(output.get("data", {}).get("text/plain", "")))
        texts.append("".join(cell_text))
        if "run_stage(" in cell.source:
            stage_seconds += cell.metadata.get("papermill", {}).get("duration") or 0.0
    text = "\n".join(texts)
    stages = {m.group(1): (m.group(2), m.group(3)) for m in STAGE_LINE.finditer(text)}
    return {"text": text, "cells": texts, "stages": stages, "seconds": seconds,
            "stage_seconds": stage_seconds, "nb": nb}


def stage_dir(cache: Path, stage: str) -> Path:
    """The one complete build of a stage (the one with a manifest)."""
    dirs = [p.parent for p in (cache / stage).glob("*/manifest.json")]
    assert len(dirs) == 1, f"expected one complete {stage} build, found {dirs}"
    return dirs[0]


def manifest(cache: Path, stage: str) -> dict:
    return json.loads((stage_dir(cache, stage) / "manifest.json").read_text())


@pytest.fixture(scope="session")
def cold_run(tmp_path_factory):
    """One cold smoke run over a fresh fixture corpus; other tests copy its folder."""
    workdir = tmp_path_factory.mktemp("cold")
    write_corpus(workdir / "data" / "corpus")
    result = run_notebook(workdir, "cold")
    return workdir, result


@pytest.fixture
def warm_copy(cold_run, tmp_path):
    """A private copy of the cold run's data and cache, to change and re-run."""
    workdir, _ = cold_run
    for folder in ("data", "cache"):
        shutil.copytree(workdir / folder, tmp_path / folder)
    return tmp_path
