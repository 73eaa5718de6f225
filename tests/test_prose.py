"""Each fact stated once, or checked: the README and the notebook's Markdown name knobs and refer to
the Defaults cell rather than repeat their values; where a value must appear in prose (the profiles
table, the model's size, the decoding), it is written in one of the forms below and checked here
against what the notebook's own definitions say. A change of the code that leaves the prose behind
fails here, in seconds."""

import re
from types import SimpleNamespace

import nbformat
import pytest
from conftest import NOTEBOOK, ROOT, definitions
from test_plan import Tokenizer, qwen_config

pytestmark = pytest.mark.fast  # definition cells only: `uv run pytest -m fast`


@pytest.fixture(scope="module")
def nb():
    return definitions(
        "# The assignment's prompts", "# Defaults", "# Settings", "# Hardware", "# Training plan",
        "# Stage 4: the model config", "# Stage 4: a new model", "# Stage 4: the validation blocks",
        "# Chat: the decoding settings", "# Training: the tied LM head",
    )  # fmt: skip


def prose() -> dict[str, str]:
    """{where: text} of the README and of every Markdown cell."""
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    texts = {"README.md": (ROOT / "README.md").read_text()}
    for index, cell in enumerate(cells):
        if cell.cell_type == "markdown" and cell.source.strip():
            texts[f"Markdown cell {index} ({cell.source.splitlines()[0][:40]})"] = cell.source
    return texts


def knob(nb, name: str, profile: str = "full"):
    default, _ = nb["KNOBS"][name]
    return default[nb["PROFILES"].index(profile)] if isinstance(default, tuple) else default


def params(nb, profile: str) -> str:
    cfg = {name: knob(nb, name, profile) for name in nb["KNOBS"]}
    model = nb["model_shape"](nb["llama_config"](cfg, Tokenizer()), False)
    return (
        f"{model.parameters / 1e6:.0f}"
        if model.parameters > 20e6
        else f"{model.parameters / 1e6:.1f}"
    )


def pretrain_decoding(nb):
    cfg = {name: knob(nb, name, "smoke") for name in nb["KNOBS"]} | {"attention": "sdpa"}
    return nb["new_model"](cfg, Tokenizer()).generation_config


def chat_decoding(nb):
    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=2)
    return nb["chat_generation_config"]({"SFT_MAX_NEW_TOKENS": 8}, tokenizer)


def greedy(config) -> str:
    assert not config.do_sample and config.num_beams in (None, 1), "the prose calls it greedy"
    return "reedy"


def gib(nb, parameters: int) -> str:
    return f"{nb['cache_gib'](parameters, 'adamw'):.1f}"


# (where it is said, the pattern, what its groups must be: from the notebook's definitions)
FACTS = [
    ("README.md", r"\(~(\d)k tokens\) → packed (\d+)-token blocks",
     lambda nb: (str(knob(nb, "VOCAB_SIZE") // 1000), str(knob(nb, "CONTEXT_LENGTH")))),
    ("README.md", r"\| `full` \| ~(\d+)M LLaMA \((\d+) × (\d+), GQA (\d+)/(\d+) heads\), (\d+) epochs "
     r"over all (\d+)-token blocks, batch (\d+) \| Qwen2.5-0.5B full finetune, (\d+) epoch over ~51k "
     r"conversations, batch (\d+) \|",
     lambda nb: (params(nb, "full"), *(str(knob(nb, k)) for k in (
         "MODEL_LAYERS", "MODEL_HIDDEN", "MODEL_HEADS", "MODEL_KV_HEADS", "EPOCHS",
         "CONTEXT_LENGTH", "EFFECTIVE_BATCH", "SFT_EPOCHS", "SFT_EFFECTIVE_BATCH")))),
    ("README.md", r"\| `cpu` \| ([\d.]+)M LLaMA \((\d+) × (\d+)\), (\d+) epochs over a fixed ([\d,]+)-block "
     r"subset, batch (\d+) .*?\| (\d+) steps of batch (\d+) on Qwen2.5-0.5B in fp32 within (\d+) GiB",
     lambda nb: (params(nb, "cpu"), *(f"{knob(nb, k, 'cpu'):,}" for k in (
         "MODEL_LAYERS", "MODEL_HIDDEN", "EPOCHS", "TRAIN_BLOCKS", "EFFECTIVE_BATCH",
         "SFT_MAX_STEPS", "SFT_EFFECTIVE_BATCH", "CPU_MEMORY_GIB")))),
    ("README.md", r"`up to ([\d.]+) GiB in the cache \(two checkpoints,\s+then the model\)` for the SFT "
     r"of Qwen2.5-0.5B, ([\d.]+) GiB for pretraining",
     lambda nb: (gib(nb, nb["model_shape"](qwen_config(), True).parameters),
                 gib(nb, nb["model_shape"](nb["llama_config"]({n: knob(nb, n) for n in nb["KNOBS"]},
                                                               Tokenizer()), False).parameters))),
    ("Stage 4 — pretraining", r"the `full` profile is (\d+) layers × (\d+) hidden \(~(\d+)M",
     lambda nb: (str(knob(nb, "MODEL_LAYERS")), str(knob(nb, "MODEL_HIDDEN")), params(nb, "full"))),
    ("Stage 4 — pretraining", r"would cost more than (\d+)% of the training compute",
     lambda nb: (f"{nb['EVAL_MAX_SHARE']:.0%}"[:-1],)),
    ("Epoch-end generations", r"G(reedy) decoding with a repetition guard \(`repetition_penalty` "
     r"([\d.]+) and no\s+repeated (\d)-gram\)",
     lambda nb: (greedy(c := pretrain_decoding(nb)), f"{c.repetition_penalty:g}",
                 str(c.no_repeat_ngram_size))),
    ("Stage 6 — base model answers", r"with g(reedy) decoding and\s+`repetition_penalty` ([\d.]+)",
     lambda nb: (greedy(c := chat_decoding(nb)), f"{c.repetition_penalty:g}")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("where", "pattern", "expected"), FACTS, ids=[f"{w}-{i}" for i, (w, _, _) in enumerate(FACTS)]
)
def test_a_value_in_prose_is_the_one_the_notebook_uses(nb, where, pattern, expected):
    (text,) = [t for name, t in prose().items() if where in name]
    found = re.search(pattern, text)
    assert found, f"{where} no longer says {pattern!r}: reword it and this check together"
    assert found.groups() == expected(nb), f"{where}: {found[0]!r} is stale"


def test_no_default_is_restated_in_prose_unchecked(nb):
    """'`KNOB`, 10 by default' is a second copy of the Defaults cell, which no check follows: prose
    names the knob (the Defaults cell has its value) or says it in a form FACTS checks. So is
    'greedy' outside the two decodings FACTS checks."""
    for where, text in prose().items():
        restated = re.findall(r"`([A-Z][A-Z_]{2,})`[^.;\n]{0,40}?\b[\w.]+ by default", text)
        assert not [k for k in restated if k in nb["KNOBS"]], (where, restated)
    said = sum(len(re.findall(r"greedy", t, re.I)) for t in prose().values())
    assert said == sum("reedy" in pattern for _, pattern, _ in FACTS), "an unchecked 'greedy'"
