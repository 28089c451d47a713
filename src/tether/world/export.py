"""Export the world as JSONL files in exactly the formats the stages read.

    export("world/", seed=0) -> {"corpus": "world/corpus.jsonl", "sft": ..., ...}

Files (one JSON object per line):

    corpus.jsonl                  {"text"}                                   pretraining
    sft.jsonl, sft_eval.jsonl     {"prompt", "completion"}                   SFT
    pairs.jsonl, pairs_eval.jsonl {"prompt", "chosen", "rejected",
                                   "gold_chosen", "gold_rejected"}           reward model, DPO
    rankings.jsonl                {"prompt", "responses", "ranks", "gold"}   K-wise reward model
    prompts.jsonl, prompts_eval.jsonl {"prompt"}                             PPO, best-of-N, eval

Every *_eval file uses held-out prompts only (`prompts.split_of`), which no training file and
no corpus document contains. Each file is written atomically.
"""

import json
import os
import tempfile
from collections.abc import Iterable

from tether.world.generator import World


def write_jsonl(path: str, rows: Iterable[dict]) -> str:
    """Write rows as JSON lines to path, atomically (temp file, then os.replace) -> path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_jsonl(path: str) -> list[dict]:
    """JSONL file -> list of rows."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def export(
    output_dir: str,
    seed: int = 0,
    *,
    n_corpus: int = 20000,
    n_sft: int = 2000,
    n_sft_eval: int = 200,
    n_pairs: int = 4000,
    n_pairs_eval: int = 500,
    n_rankings: int = 1000,
    k: int = 4,
    n_prompts: int = 2000,
    n_prompts_eval: int = 200,
) -> dict[str, str]:
    """Write the world's data sets under output_dir -> {name: path} (names as in the module doc).

    The defaults make the built-in demo's data; every size can be changed, and the same
    (seed, sizes) always writes the same files.
    """
    world = World(seed)
    tables = {
        "corpus": lambda: ({"text": t} for t in world.corpus(n_corpus)),
        "sft": lambda: world.demonstrations(n_sft, "train"),
        "sft_eval": lambda: world.demonstrations(n_sft_eval, "eval"),
        "pairs": lambda: world.pairs(n_pairs, "train"),
        "pairs_eval": lambda: world.pairs(n_pairs_eval, "eval"),
        "rankings": lambda: world.rankings(n_rankings, k, "train"),
        "prompts": lambda: ({"prompt": p} for p in world.prompts(n_prompts, "train")),
        "prompts_eval": lambda: ({"prompt": p} for p in world.prompts(n_prompts_eval, "eval")),
    }
    return {
        name: write_jsonl(os.path.join(output_dir, f"{name}.jsonl"), rows())
        for name, rows in tables.items()
    }
