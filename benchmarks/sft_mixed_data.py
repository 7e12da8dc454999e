"""SFT data of very different lengths, from the Python standard library on this machine: for measuring
`moeforge sft --pack` against padding.

    python benchmarks/sft_mixed_data.py --out FILE [--n 2000] [--seed 0]

Each example is a documented function of a standard-library module: the prompt is its signature and
docstring, the response the rest of its source (functions whose docstring is under 400 characters
and whose body is 1 to 1,999 characters). The examples are shuffled with --seed and the first --n
written (moeforge.posttrain.sft.write_examples: whole or not at all).
"""

from __future__ import annotations

import argparse
import ast
import random
import sysconfig
from pathlib import Path

from moeforge.posttrain.sft import write_examples


def function_examples(root: Path) -> list[tuple[str, str]]:
    """(signature + docstring, body) of every documented function in the .py files directly in root."""
    pairs = []
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.FunctionDef) and ast.get_docstring(node)):
                continue
            text = ast.get_source_segment(source, node)
            if not text:
                continue
            lines = text.splitlines(keepends=True)
            split = node.body[0].end_lineno - node.lineno + 1  # the lines up to the docstring's end
            head, body = "".join(lines[:split]), "".join(lines[split:])
            if body.strip() and len(head) < 400 and len(body) < 2000:
                pairs.append((head, body))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs = function_examples(Path(sysconfig.get_paths()["stdlib"]))
    random.Random(args.seed).shuffle(pairs)
    write_examples(args.out, pairs[:args.n])
    print(f"{min(args.n, len(pairs))} of {len(pairs)} functions written to {args.out}")


if __name__ == "__main__":
    main()
