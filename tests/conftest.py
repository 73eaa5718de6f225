"""Shared helpers: a fixture corpus the tests write themselves, and a papermill runner."""

import ast
import asyncio
import functools
import inspect
import json
import linecache
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import filelock
import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "LLM_Pretrain_SFT.ipynb"
STAGE_LINE = re.compile(r"^\[(\w+)\] (cached|built in [\d.]+s)(.*)$", re.M)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "true"
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, or the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # kernels' thread pools fight (10x slower)

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
# issue #7 repairs: (as written in the source, what the cleaned corpus must hold)
REPAIRED = [
    (
        "Он хотел видeть человeка, но Hаташa сказала: — Ax, он так добр! Taйна осталась c ним.",
        "Он хотел видеть человека, но Наташа сказала: — Ах, он так добр! Тайна осталась с ним.",
    ),
    (
        "Он спросил: чтó это? Нельзя навóзить поле в ме&#769;сте у реки.",
        "Он спросил: что это? Нельзя навозить поле в месте у реки.",
    ),
    ("ГЛАВА IV", "ГЛАВА 4"),
    (
        "VI Говорили, впрочем, мало, и все смотрели в окно.",
        "Говорили, впрочем, мало, и все смотрели в окно.",
    ),
    (
        "Квартира эта — N 50 на третьем этаже старого дома.",
        "Квартира эта — № 50 на третьем этаже старого дома.",
    ),
    (
        "Он как#то вышел, чтобы {382} забыться в неизвест?ном месте.",
        "Он как-то вышел, чтобы забыться в неизвестном месте.",
    ),
    (
        "Он вошел в гостиную и поклонился всем. Mon cher, vous êtes charmant. Потом он сел у окна "
        "и долго молчал, глядя на пустую улицу.",
        "Он вошел в гостиную и поклонился всем. Потом он сел у окна и долго молчал, глядя на пустую улицу.",
    ),
]
NEAR_DUPLICATE = (
    "Этот абзац почти повторяется: Ёлка стояла в углу, и все смотрели на неё.",
    "этот абзац почти повторяется — елка стояла в углу и все смотрели на нее",
)
STANZAS = [
    [
        "Мороз и солнце, день чудесный",
        "Еще ты дремлешь, друг прелестный",
        "Пора, красавица, проснись",
    ],
    ["Вечор, ты помнишь, вьюга злилась", "На мутном небе мгла носилась", "Луна, как бледное пятно"],
]
PARTLY_WRAPPED = (
    "Этот абзац в файле смешанного вида был перенесен по строкам посреди предложения, и "
    "его куски должны снова стать одной строкой, как и было задумано автором."
)
PUNCTUATION_CLEAN = "Что! Неужели? Ну… Как?! Так… Вот, и всё"
FOOTNOTED = [  # issue #16: (as written, what the cleaned corpus holds; None: dropped)
    ("— Сэ доммаж[1]! — рявкал Филя и вынимал из стола шоколадку.",
     "— Сэ доммаж! — рявкал Филя и вынимал из стола шоколадку."),
    ("[1] Жаль! (франц.).", None),
    ("Фин дэ сьекль [*] и прочее, сказал он и ушел домой.",
     "Фин дэ сьекль и прочее, сказал он и ушел домой."),
    ("[*] — Конец века (франц.). — Ред.", None),
    ('13 "Новый словарь для учащихся" (англ.).', None),
    ("-- -- Нет, -- ответил он тихо.", "— Нет, — ответил он тихо."),
]  # fmt: skip
MARKED_DUPLICATE = (  # the same paragraph twice, once with a footnote marker
    "[216] Она, оглядываясь, улыбалась и Тихону, и мужу, и официанту, провожавшему их.",
    "Она, оглядываясь, улыбалась и Тихону, и мужу, и официанту, провожавшему их.",
)


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
    write_special_files(folder, rng)
    return folder


def write_special_files(folder: Path, rng: random.Random) -> None:
    """Issue #7 cases: repairs, a near-duplicate pair, a partly wrapped file, verse, centred verse."""
    repairs = [paragraph(rng) for _ in range(120)]
    repairs[3:3] = [source for source, _ in REPAIRED] + [NEAR_DUPLICATE[0], MARKED_DUPLICATE[1]]
    footnotes = [paragraph(rng) for _ in range(40)]
    footnotes[5:5] = [source for source, _ in FOOTNOTED] + [MARKED_DUPLICATE[0]]
    (folder / "footnotes.txt").write_text("\n".join(footnotes), encoding="utf-8")
    (folder / "repairs.txt").write_text("\n".join(repairs), encoding="utf-8")
    # one paragraph per line (long lines), except one paragraph wrapped at ~70 characters
    mixed = [paragraph(rng) + " " + paragraph(rng) + " " + paragraph(rng) for _ in range(60)]
    wrapped, line = [], ""
    for word in PARTLY_WRAPPED.split():
        if len(line) + len(word) > 70:
            wrapped.append(line.rstrip())
            line = ""
        line += word + " "
    mixed[30:30] = [*wrapped, line.rstrip(), NEAR_DUPLICATE[1]]
    (folder / "partly_wrapped.txt").write_text("\n".join(mixed), encoding="utf-8")
    verse = [paragraph(rng) for _ in range(30)]
    for number, stanza in enumerate(STANZAS, 1):
        verse += ["", str(number), "", *stanza, ""]
    (folder / "verse.txt").write_text("\n".join(verse + [paragraph(rng) for _ in range(30)]))
    centred = [
        " " * rng.randint(2, 30) + rng.choice(WORDS).capitalize() + " " + rng.choice(WORDS)
        for _ in range(60)
    ]
    (folder / "centred_verse.txt").write_text("\n".join(centred), encoding="utf-8")


SFT_PAIRS = [
    ("Назови столицу страны.", "Страна: Франция", "Столица Франции — Париж."),
    ("Назови столицу страны.", "Страна: Италия", "Столица Италии — Рим."),
    ("Назови столицу страны.", "Страна: Япония", "Столица Японии — Токио."),
    ("Сколько будет два плюс два?", None, "Два плюс два — четыре."),
    ("Сколько будет три плюс три?", "", "Три плюс три — шесть."),
    ("Переведи слово на английский.", "Слово: кошка", "Кошка по-английски — cat."),
    ("Переведи слово на английский.", "Слово: собака", "Собака по-английски — dog."),
    ("Какого цвета небо?", None, "Днем ясное небо голубое."),
    ("Какого цвета трава?", None, "Летом трава зеленая."),
    ("Когда выпадает снег?", "", "Снег обычно выпадает зимой."),
    ("Назови время года.", "Месяц: июль", "Июль — это лето."),
    ("Назови время года.", "Месяц: январь", "Январь — это зима."),
]
BAD_SFT_ROWS = [
    {"instruction": "Строка без ответа.", "input": None, "output": None},
    {"instruction": "   ", "input": None, "output": "Пустая инструкция."},
    {"instruction": "Слишком длинный ответ.", "input": None, "output": " ".join(["слово"] * 200)},
]


def sft_rows() -> list[dict]:
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in SFT_PAIRS * 4]
    return rows + BAD_SFT_ROWS


def write_sft_parquet(folder: Path, rows: list[dict] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows or sft_rows()), folder / "train.parquet")
    return folder


def build_tiny_qwen(folder: Path, vocab: int | None = None, hidden: int = 64) -> Path:
    """A 2-layer random Qwen2 with a small byte-level BPE that has Qwen2.5's special tokens and its
    exact chat template (the one TRL ships), eos = pad = <|endoftext|> as in the base model
    (`vocab`: the model's embedding rows, if more than the tokenizer's)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from trl.chat_template_utils import qwen2_5_chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [" ".join(filter(None, r.values())) for r in sft_rows()] + ["system user assistant"] * 5
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = qwen2_5_chat_template
    fast.save_pretrained(folder)
    config = transformers.Qwen2Config(
        vocab_size=vocab or len(fast),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def shared_fixture(tmp_path_factory, name: str, make) -> Path:
    """A folder made once per test session and shared by the xdist workers: the first to get here
    makes it (make(folder)), the others wait for it."""
    root = tmp_path_factory.getbasetemp()  # this session's, above each xdist worker's own temp
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / name
    with filelock.FileLock(str(root / f"{name}.lock")):
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return shared_fixture(tmp_path_factory, "tiny-qwen", build_tiny_qwen)


TINY_QWEN: list[Path] = []  # set by the cold_run fixture, used as the default SFT_BASE_MODEL


def smoke(workdir: Path, **parameters) -> dict:
    """The smoke profile on a work folder's data/, cache/ and artifacts/, plus `parameters`."""
    return {
        "PROFILE": "smoke",
        "CORPUS_DIR": str(workdir / "data" / "corpus"),
        "SFT_DATA_DIR": str(workdir / "data" / "alpaca-cleaned-ru"),
        "CACHE_DIR": str(workdir / "cache"),
        "ARTIFACTS_DIR": str(workdir / "artifacts"),
        "SFT_BASE_MODEL": str(TINY_QWEN[0]) if TINY_QWEN else "Qwen/Qwen2.5-0.5B",
    } | parameters


def run_notebook(workdir: Path, name: str, until=None, edits=(), faults=None, **parameters):
    """Execute the notebook with papermill and the smoke profile, in a fresh kernel (`until`: only
    its cells up to that stage's build-or-load cell; `edits`: see apply_edits; `faults`: see
    inject); return outputs, stage lines and timings."""
    params = smoke(workdir, **parameters)
    notebook, edits = NOTEBOOK, [*edits, *inject(faults)]
    if until or edits:
        nb = nbformat.read(notebook, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        for cell, source in zip(code, apply_edits([c.source for c in code], edits), strict=True):
            cell.source = source
        if until:
            title = STAGE_CELLS.get(until, until)
            stop = next(
                i
                for i, c in enumerate(nb.cells)
                if c.cell_type == "code" and c.source.startswith(title)
            )
            nb.cells = nb.cells[: stop + 1]
        notebook = workdir / f"{name}-edited.ipynb"
        nbformat.write(nb, notebook)
    out = workdir / f"{name}.ipynb"
    start = time.perf_counter()
    nb = papermill.execute_notebook(
        str(notebook), str(out), parameters=params, progress_bar=False, cwd=str(NOTEBOOK.parent)
    )
    return notebook_result(nb, seconds=time.perf_counter() - start)


def run_alone(workdir: Path, name: str, **parameters) -> dict:
    """The notebook copied by itself into `workdir` (beside its data/) and run there with papermill:
    the smoke profile, every path at its default (relative to the working folder when no project is
    around), the tiny local Qwen as the base model."""
    notebook = workdir / NOTEBOOK.name
    shutil.copy(NOTEBOOK, notebook)
    parameters = {"PROFILE": "smoke", "SFT_BASE_MODEL": str(TINY_QWEN[0])} | parameters
    start = time.perf_counter()
    nb = papermill.execute_notebook(
        str(notebook),
        str(workdir / f"{name}.ipynb"),
        parameters=parameters,
        progress_bar=False,
        cwd=str(workdir),
    )
    return notebook_result(nb, seconds=time.perf_counter() - start)


def replace(old: str, new: str, times: int = 1) -> tuple:
    """An edit of the notebook: the text `old` (found `times` times) becomes `new`."""
    return re.compile(re.escape(old)), lambda match: new, times


def insert_statement(function: str, statement: str, times: int = 1) -> tuple:
    """An edit of the notebook: `function` (each of `times` definitions) gains a first statement."""
    pattern = re.compile(rf"^( *)(def {function}\(.*?\).*?:\n)", re.M | re.S)
    return pattern, lambda m: f"{m[1]}{m[2]}{m[1]}    {statement}\n", times


def apply_edits(sources: list[str], edits) -> list[str]:
    """The code cells' sources with each edit made; an edit whose pattern does not match exactly
    as often as it expects fails the test (an edit that silently misses would test nothing)."""
    for pattern, new, times in edits:
        found = sum(len(pattern.findall(source)) for source in sources)
        assert found == times, f"edit {pattern.pattern!r}: {found} matches, expected {times}"
        sources = [pattern.sub(new, source) for source in sources]
    return sources


def notebook_result(nb, seconds: float, stage_seconds: float | None = None) -> dict:
    """What an executed notebook showed: each cell's text, the stage lines, timings."""
    texts = [cell_text(cell) for cell in nb.cells]
    if stage_seconds is None:
        stage_seconds = sum(
            cell.metadata.get("papermill", {}).get("duration") or 0.0
            for cell in nb.cells
            if "run_stage(" in cell.source
        )
    text = "\n".join(texts)
    stages = {m.group(1): (m.group(2), m.group(3)) for m in STAGE_LINE.finditer(text)}
    return {
        "text": text,
        "cells": texts,
        "sources": [c.source for c in nb.cells],
        "stages": stages,
        "seconds": seconds,
        "stage_seconds": stage_seconds,
        "nb": nb,
    }


def stage_dir(cache: Path, stage: str) -> Path:
    """The one complete build of a stage (the one with a manifest)."""
    dirs = [p.parent for p in (cache / stage).glob("*/manifest.json")]
    assert len(dirs) == 1, f"expected one complete {stage} build, found {dirs}"
    return dirs[0]


def stage_keys(result: dict) -> dict:
    """stage -> the 12-character key its stage line printed."""
    return {stage: line.split("(")[1][:12] for stage, (_, line) in result["stages"].items()}


def build_of(cache: Path, stage: str, result: dict) -> Path:
    """The build of `stage` that a run printed (its key is in the stage line)."""
    key = stage_keys(result)[stage]
    return next((cache / stage).glob(f"{key}*/manifest.json")).parent


def manifest(cache: Path, stage: str) -> dict:
    return json.loads((stage_dir(cache, stage) / "manifest.json").read_text())


@pytest.fixture(scope="session")
def cold_run(tmp_path_factory, tiny_qwen):
    """One cold smoke run over fresh fixtures, shared by every test (and xdist worker); tests that
    change anything copy its folder first. The notebook runs alone, as on Colab or Kaggle: copied
    into the folder with its data/, no project around it, paths left at their defaults."""
    TINY_QWEN[:] = [tiny_qwen]

    def make(workdir: Path) -> None:
        write_corpus(workdir / "data" / "corpus")
        write_sft_parquet(workdir / "data" / "alpaca-cleaned-ru")
        result = run_alone(workdir, "cold")
        (workdir / "cold.json").write_text(
            json.dumps({k: result[k] for k in ("seconds", "stage_seconds")})
        )

    workdir = shared_fixture(tmp_path_factory, "cold", make)
    timings = json.loads((workdir / "cold.json").read_text())
    return workdir, notebook_result(nbformat.read(workdir / "cold.ipynb", as_version=4), **timings)


@pytest.fixture
def warm_copy(cold_run, tmp_path):
    """A private copy of the cold run's data and cache, to change and re-run."""
    workdir, _ = cold_run
    for folder in ("data", "cache"):
        shutil.copytree(workdir / folder, tmp_path / folder)
    return tmp_path


TIMING_KEYS = ("runtime", "per_second", "train_loss", "total_flos")


def log_history(cache: Path, stage: str) -> list[dict]:
    """A training stage's log history without its timing entries (those differ run to run)."""
    log = json.loads((stage_dir(cache, stage) / "log_history.json").read_text())
    return [{k: v for k, v in e.items() if not any(t in k for t in TIMING_KEYS)} for e in log]


def assert_resumed_like(cache: Path, reference: Path, stage: str, *resumed_at: int) -> None:
    """A resumed run logs what an uninterrupted one logs — every eval loss, learning rate and grad
    norm — except the train loss of the log interval the resume cut (the Trainer's own resume starts
    its running loss at the checkpoint); its final weights are the same bytes."""
    ours, theirs = log_history(cache, stage), log_history(reference, stage)
    cut = {
        next((e["step"] for e in theirs if "loss" in e and e["step"] > at), None)
        for at in resumed_at
    }

    def without_cut(log):
        return [{k: v for k, v in e.items() if not (k == "loss" and e["step"] in cut)} for e in log]

    assert without_cut(ours) == without_cut(theirs)
    weights = [stage_dir(c, stage) / "model" / "model.safetensors" for c in (cache, reference)]
    assert weights[0].read_bytes() == weights[1].read_bytes(), "the resumed model differs"


def one_line_error(err) -> str:
    """The error a user sees: exactly one line, no traceback (papermill still fails the run).
    `err`: papermill's exception, or a live-kernel result."""
    if isinstance(err, dict):
        assert err["error"], "the run did not stop"
        err = SimpleNamespace(**err["error"])
    assert err.ename in ("UserError", "CorpusError", "Paused", "Diverged", "Stopped"), (
        err.ename,
        err.evalue,
    )
    assert len(err.traceback) == 1 and "\n" not in err.traceback[0].rstrip("\n"), err.traceback
    return err.evalue


def progress_bars(nb) -> list[str]:
    """Progress output in an executed notebook: tqdm widgets, tqdm text bars, the Trainer's HTML bar."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data, text = output.get("data", {}), "".join(output.get("text", ""))
            title = cell.source.splitlines()[0]
            if "application/vnd.jupyter.widget-view+json" in data:
                found.append(f"{title}: {data.get('text/plain', 'widget')}")
            elif "<progress" in data.get("text/html", "") or re.search(r"\d+%\|", text):
                found.append(title)
    return found


class LiveKernel:
    """One kernel for many short runs of the notebook's leading cells (settings, stage keys).

    Each run starts from an empty namespace (`%reset -f`), then executes the parameters cell, an
    injected cell like papermill's, and the following cells up to the one whose first line starts
    with `until`: a fresh "Run All" in everything but the imports, which stay loaded (seconds
    instead of a new kernel per case)."""

    def __init__(self):
        from nbclient import NotebookClient

        self.source = nbformat.read(NOTEBOOK, as_version=4)
        self.client = NotebookClient(
            nbformat.v4.new_notebook(),
            kernel_name="python3",
            timeout=600,
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},
        )
        self.context = self.client.setup_kernel()
        self.context.__enter__()

    def close(self) -> None:
        self.context.__exit__(None, None, None)

    def run(
        self, parameters: dict, until: str, edits=(), after=(), faults=None, reset: bool = True
    ):
        """Outputs of each executed cell and the error (ename, evalue, traceback) if one stopped it.
        `edits`: see apply_edits; `faults`: see inject; `after`: more code to run at the end;
        reset=False runs the cells again in the namespace left by the previous run."""
        cells = [c for c in self.source.cells if c.cell_type == "code"]
        stop = next(i for i, c in enumerate(cells) if c.source.startswith(until))
        sources = apply_edits([c.source for c in cells], [*edits, *inject(faults)])[: stop + 1]
        injected = "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        reset_cell = RESET if reset else "pass"
        return self.run_cells([reset_cell, sources[0], injected, *sources[1:], *after])

    def run_cells(self, sources: list[str]) -> dict:
        """Execute these cells in the kernel as it is, as a student re-runs cells in JupyterLab:
        each cell's outputs, the error that stopped them (ename, evalue, traceback) and the stage
        lines."""
        from nbclient.exceptions import CellExecutionError

        texts, error = [], None
        self.client.nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
        for index, cell in enumerate(self.client.nb.cells):
            try:
                self.client.execute_cell(cell, index)
            except CellExecutionError:
                out = next(o for o in cell.outputs if o.output_type == "error")
                error = {"ename": out.ename, "evalue": out.evalue, "traceback": out.traceback}
            texts.append(cell_text(cell))
            if error:
                break
        text = "\n".join(texts)
        stages = {m.group(1): (m.group(2), m.group(3)) for m in STAGE_LINE.finditer(text)}
        return {"text": text, "cells": texts, "error": error, "stages": stages}


def cell_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append("".join(output.get("text", "")))
        parts.append("".join(output.get("data", {}).get("text/plain", "")))
        parts.append("".join(output.get("data", {}).get("text/markdown", "")))
    return "\n".join(p for p in parts if p)


@pytest.fixture(scope="session")
def live_kernel():
    kernel = LiveKernel()
    yield kernel
    kernel.close()


ALL_CELLS = "# Summary: shown here"  # the notebook's last cell
STAGE_CELLS = {  # the build-or-load cell of each stage: a run can stop right after it
    "clean_corpus": "# Stage 1: clean the corpus",
    "tokenizer": "# Stage 2: train the tokenizer",
    "dataset": "# Stage 3: pack the blocks",
    "pretrain": "# Stage 4: train",
    "sft_data": "# Stage 5: make the conversations",
    "base_answers": "# Stage 6: the base model answers",
    "sft_model": "# Stage 7: instruction-tune",
}


def run_live(kernel: LiveKernel, workdir: Path, until: str = ALL_CELLS, **parameters) -> dict:
    """The notebook in the session's live kernel, smoke profile on `workdir`, up to `until` (a
    cell title or a stage name: that stage's build-or-load cell)."""
    edits, after, faults = (
        parameters.pop(k, d) for k, d in (("edits", ()), ("after", ()), ("faults", None))
    )
    until = STAGE_CELLS.get(until, until)
    return kernel.run(
        smoke(workdir, **parameters), until=until, edits=edits, after=after, faults=faults
    )


SHOW_SETTINGS = "import json; print('CFG=' + json.dumps({k: [CFG[k], SOURCES[k]] for k in CFG}))"


def shown_settings(result) -> dict:
    """{knob: [value, where it came from]} as SHOW_SETTINGS printed it at the end of a run."""
    assert result["error"] is None, result["error"]
    return json.loads(re.search(r"^CFG=(.*)$", result["text"], re.M).group(1))


def statuses(result) -> dict:
    """stage -> "built" or "cached", from a run's stage lines."""
    return {stage: status.split(" ")[0] for stage, (status, _) in result["stages"].items()}


BASE_DEFINITIONS = (
    "# Imports",
    "# User errors",
    "# Stage cache: digests of files",
    "# Durable files",
)


@functools.cache
def code_cells() -> tuple[str, ...]:
    return tuple(
        c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"
    )


def assigned(node) -> list[str]:
    """The names a statement assigns (`A = 1`, `A, B = 1, 2`, `A: int = 1`)."""
    targets = getattr(node, "targets", [getattr(node, "target", None)])
    return [n.id for t in targets if t for n in ast.walk(t) if isinstance(n, ast.Name)]


def definition_only(source: str) -> bool:
    """Cells that only define (functions, classes, constants, imports): safe to run alone."""
    allowed = (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
    for node in ast.parse(source).body:
        if isinstance(node, ast.With) and "get_ipython" in ast.unparse(node):
            continue  # the one-line errors' hook (a plain Python run keeps its tracebacks)
        names = assigned(node)
        constant = isinstance(node, ast.Assign | ast.AnnAssign) and names and all(n.isupper() for n in names)  # fmt: skip
        if not (isinstance(node, allowed) or constant):
            return False
    return True


def definitions(*titles: str) -> dict:
    """A namespace where the imports and the definition cells (definition_only) whose titles start
    with one of `titles` ran, in notebook order: pure rules tested in seconds, without the notebook
    around them. A title prefix takes a whole section ("# Stage 1"): its build-or-load and display
    cells are left out, so a new helper cell is never missed."""
    prefixes = (*BASE_DEFINITIONS, *titles)
    chosen = [
        s
        for s in code_cells()
        if s.startswith(prefixes) and (s.startswith("# Imports") or definition_only(s))
    ]
    for prefix in prefixes:
        assert any(s.startswith(prefix) for s in chosen), f"no code cell titled {prefix!r}"
    namespace = {"__name__": "__main__"}
    for source in chosen:
        title = source.splitlines()[0]  # its filename: inspect finds the source (stage keys)
        linecache.cache[title] = (len(source), None, source.splitlines(True), title)
        exec(compile(source, title, "exec"), namespace)
    return namespace


# Test hooks live here, not in the notebook: `faults` patches the Trainer in the kernel right after
# the imports (library code: the stage keys stay the same). {"signal_at_step": ["SIGINT", N]}: the
# signal arrives during step N; "second_signal_in_save": again while that checkpoint is written;
# {"disk_full_at_step": N}: checkpoint N meets a full disk; {"nan_loss_at_step": N}: the training
# loss is NaN from step N on (pretraining's Trainer.compute_loss); {"disk_free_gib": G}: the disk reports
# G GiB free; {"kill_after_checkpoint": {STAGE: N}}: the process dies right after that stage's checkpoint N
# is complete; {"versions": {LIBRARY: VERSION}}: importlib.metadata reports these releases (after the
# Set-up cell's check); {"other_tokenizer_bytes": True}: a tokenizer saved with save_pretrained gets
# one more byte, as a library release that writes other bytes would;
# {"count_host_syncs": PATH}: the calls that would wait for a GPU (item, tolist, bool), counted
# per optimizer step (the optimizer's own excepted) and written to PATH as {stage: [counts]};
# {"no_posix_locks": True}: fcntl.flock fails with ENOSYS, as on a mount without POSIX locks;
# {"await_interrupt": {"at_checkpoint": N} or {"in": FUNCTION}, with "ready" and "go" paths}: once
# checkpoint N is saved, or at the first generate() a notebook FUNCTION calls, the kernel creates
# READY and waits for GO, which stop_button() writes once it has interrupted the kernel. The hooks
# run in a namespace of their own (test_faults), so a stop's line never names one of them.
FAULTS = """
import importlib.metadata, json, os, shutil, signal, sys, time, safetensors, torch, transformers
for _owner, _name in PATCHED:
    if not hasattr(_owner, "_real_" + _name):
        setattr(_owner, "_real_" + _name, getattr(_owner, _name))
_SPEC, _SENT, _WAITED = SPEC, [], []


class _Faults(transformers.TrainerCallback):
    def __init__(self, stage):
        self.stage, self.counts, self.caught, self.saved = stage, [], [], {}

    def on_step_begin(self, args, state, control, **kwargs):
        name, step = _SPEC.get("signal_at_step", (None, None))
        if name and state.global_step + 1 == step and not _SENT:
            _SENT.append(getattr(signal, name))
            os.kill(os.getpid(), _SENT[0])
        if "count_host_syncs" in _SPEC:
            self.caught, self.saved = [], {n: getattr(torch.Tensor, n) for n in ("item", "tolist", "__bool__")}
            for n, method in self.saved.items():
                def counted(tensor, *a, _m=method, _n=n, **k):
                    if not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.optim"):
                        self.caught.append(_n)
                    return _m(tensor, *a, **k)
                setattr(torch.Tensor, n, counted)

    def on_step_end(self, args, state, control, **kwargs):
        for n, method in self.saved.items():
            setattr(torch.Tensor, n, method)
        self.counts += [len(self.caught)] if self.saved else []
        self.saved = {}

    def on_train_end(self, args, state, control, **kwargs):
        if "count_host_syncs" in _SPEC:
            path = _SPEC["count_host_syncs"]
            found = json.load(open(path)) if os.path.exists(path) else {}
            json.dump(found | {self.stage: self.counts}, open(path, "w"))

    def on_save(self, args, state, control, **kwargs):
        wait = _SPEC.get("await_interrupt", {})
        if state.global_step == wait.get("at_checkpoint"):
            _await_interrupt(wait)
        step = _SPEC.get("kill_after_checkpoint", {}).get(self.stage)
        if step is not None and state.global_step >= step:
            print(f"FAULTS: killing the process after checkpoint {state.global_step}")
            os._exit(3)  # like a dead kernel: no clean-up, no manifest


def _await_interrupt(wait):
    if _WAITED:
        return
    _WAITED.append(True)
    open(wait["ready"], "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(wait["go"]):
        assert time.monotonic() < deadline, "the test never interrupted the kernel"
        time.sleep(0.01)


def _generate(self, *args, **kwargs):
    wait, frame = _SPEC.get("await_interrupt", {}), sys._getframe(1)
    while frame and "in" in wait and frame.f_code.co_name != wait["in"]:
        frame = frame.f_back
    if frame and "in" in wait:
        _await_interrupt(wait)
    return transformers.GenerationMixin._real_generate(self, *args, **kwargs)


def _train(self, *args, **kwargs):
    self.add_callback(_Faults("sft_model" if "SFT" in type(self).__name__ else "pretrain"))
    return transformers.Trainer._real_train(self, *args, **kwargs)


def _save_checkpoint(self, model, trial):
    if _SENT and _SPEC.get("second_signal_in_save"):
        os.kill(os.getpid(), _SENT[0])
    if self.state.global_step == _SPEC.get("disk_full_at_step"):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    return transformers.Trainer._real__save_checkpoint(self, model, trial)


def _compute_loss(self, model, inputs, *args, **kwargs):
    loss = transformers.Trainer._real_compute_loss(self, model, inputs, *args, **kwargs)
    step = _SPEC.get("nan_loss_at_step")
    if step is not None and model.training and self.state.global_step + 1 >= step:
        loss = loss * float("nan")
    return loss


transformers.Trainer.train, transformers.Trainer._save_checkpoint = _train, _save_checkpoint
transformers.Trainer.compute_loss = _compute_loss
transformers.GenerationMixin.generate = _generate
import errno, fcntl
fcntl._real_flock = getattr(fcntl, "_real_flock", fcntl.flock)
if _SPEC.get("no_posix_locks"):  # as on a FUSE mount without flock (Google Drive)
    def _no_flock(*args, **kwargs):
        raise OSError(errno.ENOSYS, "Function not implemented")
    fcntl.flock = _no_flock
if "disk_free_gib" in _SPEC:
    shutil.disk_usage = lambda p: shutil._real_disk_usage(p)._replace(free=int(_SPEC["disk_free_gib"] * 2**30))
if "versions" in _SPEC:  # a runtime with other releases, as the notebook reads them
    importlib.metadata.version = lambda name: _SPEC["versions"].get(name) or importlib.metadata._real_version(name)
if _SPEC.get("other_tokenizer_bytes"):  # a tokenizers release that writes other bytes
    def _save_pretrained(self, folder, *args, **kwargs):
        saved = transformers.PreTrainedTokenizerFast._real_save_pretrained(self, folder, *args, **kwargs)
        with open(os.path.join(folder, "tokenizer_config.json"), "a") as config:
            config.write("\\n")
        return saved
    transformers.PreTrainedTokenizerFast.save_pretrained = _save_pretrained
"""
PATCHED = (  # what FAULTS patches (and UNDO_FAULTS restores)
    '((transformers.Trainer, "train"), (transformers.Trainer, "_save_checkpoint"), '
    '(transformers.Trainer, "compute_loss"), (transformers.GenerationMixin, "generate"), '
    '(shutil, "disk_usage"), (importlib.metadata, "version"), '
    '(transformers.PreTrainedTokenizerFast, "save_pretrained"))'
)
FAULTS = FAULTS.replace("in PATCHED:", f"in {PATCHED}:")
UNDO_FAULTS = f"""
import fcntl, importlib.metadata, shutil, transformers
fcntl.flock = getattr(fcntl, "_real_flock", fcntl.flock)
for _owner, _name in {PATCHED}:
    if hasattr(_owner, "_real_" + _name):
        setattr(_owner, _name, getattr(_owner, "_real_" + _name))
"""
IMPORTS_END = 'pd.set_option("display.max_colwidth", 200)'  # the imports cell's last line'
RESET = "get_ipython().run_line_magic('reset', '-f')\n" + UNDO_FAULTS  # a fresh namespace


def inject(faults: dict | None) -> list:
    """The edit that installs `faults` (see FAULTS) right after the notebook's imports."""
    code = FAULTS.replace("SPEC, []", f"{faults!r}, []", 1)
    installed = (  # _test_faults["_SPEC"]: what a test may change between cells
        f"_test_faults = {{'__name__': 'test_faults'}}\n"
        f"exec(compile({code!r}, 'test_faults', 'exec'), _test_faults)"
    )
    return [replace(IMPORTS_END, IMPORTS_END + "\n" + installed)] if faults else []


def stop_button(kernel, folder: Path) -> dict:
    """JupyterLab's stop button, pressed once the kernel reaches an "await_interrupt" point (see
    FAULTS): a thread waits for the kernel's READY file, interrupts the kernel as the button does
    (a SIGINT through the kernel manager), then writes GO. Returns the spec's paths."""
    paths = {"ready": str(folder / "ready"), "go": str(folder / "go")}

    def press():
        deadline = time.monotonic() + 300
        while not Path(paths["ready"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        pressed = kernel.client.km.interrupt_kernel()  # nbclient's manager is asynchronous
        if inspect.isawaitable(pressed):
            asyncio.run(pressed)
        Path(paths["go"]).touch()

    threading.Thread(target=press, daemon=True).start()
    return paths


@pytest.fixture(autouse=True)
def fast_tests_run_no_notebook(request, monkeypatch):
    """A test marked fast works on definition cells alone: one that runs the notebook or starts a
    kernel fails at once, so `pytest -m fast` stays the tier to run after each edit."""
    if request.node.get_closest_marker("fast"):

        def refuse(*args, **kwargs):
            raise AssertionError("a fast test ran the notebook or a kernel: unmark it")

        monkeypatch.setattr(papermill, "execute_notebook", refuse)
        monkeypatch.setattr(LiveKernel, "__init__", refuse)


def pytest_collection_modifyitems(items):
    """The GPU check's CPU run (the longest test, with fixtures of its own) goes first: with
    `--dist worksteal` one worker runs it while the other builds the shared cold run."""
    items.sort(key=lambda item: "test_gpu_check" not in item.nodeid)
