"""Pin llama.cpp's token ids for a GGUF file's tokenizer, for tests/integration/test_real_model.py.

    LLAMA_VENV/bin/python tools/pin_llamacpp_tokens.py MODEL.gguf tests/data/smollm2_llamacpp_tokens.json

Run once, in a scratch venv with llama-cpp-python built from source (not a titan_mem dependency). The
test then checks that the tokenizer `tools/convert_checkpoint.py from-gguf` writes gives llama.cpp's ids
on the same strings (numbers, code, unicode, whitespace) without llama.cpp installed. The strings come
from a fixed seed, so the file is reproducible.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

WORDS = "the of and to in is was for on that with as by at from his her it an were are which this be".split()
NAMES = [
    "Zoë",
    "José",
    "Łódź",
    "München",
    "Ærøskøbing",
    "Dvořák",
    "Ngũgĩ",
    "Øresund",
    "İstanbul",
    "São Paulo",
]
SCRIPTS = [
    "Привет, мир",
    "Γειά σου κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "こんにちは世界",
    "你好，世界",
    "안녕하세요 세계",
    "สวัสดีชาวโลก",
    "Xin chào thế giới",
    "😀 🚀 👩‍💻 🇳🇴",
    "∑ᵢ xᵢ² ≤ ∞ → ∂f/∂x",
    "½ ¼ ¾ ‰ № ™ ©",
]
CODE = [
    "def f(x):\n    return x**2 + 1\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    '{"id": 12, "tags": ["a", "b"], "ok": true}',
    "SELECT name, COUNT(*) FROM t GROUP BY name;",
    "const add = (a, b) => a + b;\t// sum",
    "x = np.zeros((3, 4), dtype=np.float32)",
    '<div class="row">&nbsp;</div>',
    "if err != nil {\n\treturn err\n}",
    '#include <stdio.h>\nint main(void){puts("hi");}',
    "λx.λy.x y  -- K combinator",
]


def numbers(rng: random.Random) -> str:
    forms = [
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))),
        lambda: f"{rng.uniform(-1e4, 1e4):.{rng.randint(0, 6)}f}",
        lambda: f"{rng.randint(1, 999):,}{rng.randint(100, 999)},{rng.randint(100, 999)}",
        lambda: f"{rng.uniform(0, 10):.3e}",
        lambda: f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"+{rng.randint(1, 99)} ({rng.randint(100, 999)}) {rng.randint(1000000, 9999999)}",
        lambda: f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
        lambda: f"{rng.randint(0, 100)}%",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
        lambda: f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} pm",
    ]
    return rng.choice(forms)()


def sentence(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 12)):
        r = rng.random()
        if r < 0.45:
            parts.append(rng.choice(WORDS))
        elif r < 0.7:
            parts.append(numbers(rng))
        elif r < 0.8:
            parts.append(rng.choice(NAMES))
        elif r < 0.88:
            parts.append(rng.choice(["don't", "it's", "we're", "I'll", "they've", "O'Neil"]))
        else:
            parts.append(rng.choice(["(", ")", "--", "...", "?!", ";", '"quoted"', "'single'"]))
    sep = rng.choice([" ", " ", " ", "  ", "\t", "\n", " \n "])
    return sep.join(parts)


def strings(seed: int = 0, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    out = (
        list(SCRIPTS)
        + list(CODE)
        + ["", " ", "   leading", "trailing   ", "a\n\n\nb", "1234567890", "3.14159"]
    )
    while len(out) < n:
        r = rng.random()
        if r < 0.6:
            out.append(sentence(rng))
        elif r < 0.8:
            out.append(rng.choice(CODE).replace("1", numbers(rng)) + " " + sentence(rng))
        else:
            out.append(rng.choice(SCRIPTS) + " " + numbers(rng) + " " + rng.choice(NAMES))
    return out


def main() -> None:
    from llama_cpp import Llama, __version__  # only in the scratch venv

    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    cases = [[s, llm.tokenize(s.encode(), add_bos=False, special=False)] for s in strings()]
    doc = {
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "llama_cpp_python": __version__,
        "command": " ".join(["python", *sys.argv]),
        "cases": cases,
    }
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n")
    print(f"{len(cases)} strings, {sum(len(c[1]) for c in cases)} tokens -> {out}")


if __name__ == "__main__":
    main()
