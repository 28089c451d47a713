"""The built-in synthetic world: a stand-in for the pretraining corpus, the demonstrators and
the human raters, small enough to run the whole RLHF pipeline on a CPU with no downloads.

Because the world's judge is known, reward-model accuracy, win rate and over-optimisation can
be measured against the truth. docs/world.md describes the design and its limits.

The façade::

    from tether.world import World, score, label_pairs, export

    world = World(seed=0)
    world.prompts(n, split)          # prompt strings; split "train" or "eval" never overlap
    world.corpus(n)                  # pretraining documents
    world.demonstrations(n, split)   # SFT rows {"prompt", "completion"}
    world.pairs(n, split)            # preference rows, noisily labelled
    world.rankings(n, k, split)      # K-wise rows {"prompt", "responses", "ranks", "gold"}
    score(prompt, response)          # the gold judge -> float in [-2, 2]
    judge(prompt, response)          # the same, with each criterion (Verdict)
    label_pairs(prompts, a, b, seed) # label your own pairs (e.g. SFT samples) like a rater
    rank_responses(prompt, responses, rng)  # a K-wise ranking (Plackett-Luce)
    disagreement_rate(rows)          # how often labels contradict gold, overall and on close pairs
    export(output_dir, seed)         # every data set as JSONL -> {name: path}
    write_jsonl(path, rows)          # atomic JSONL writer
    build_tokenizer(out_dir)         # train + save the word-level tokenizer
    base_model_config(tokenizer_dir) # LlamaConfig of the tiny base model
    init_base_model(out_dir, tokenizer_dir, seed)  # untrained base model + tokenizer, HF format

Format: a prompt ends with the marker " answer :" and a completion is plain world text that
starts with its own first word, e.g. prompt "describe the small red fox in the forest . answer :"
and completion "the small red fox hunts in the forest . it is shy .".

Importing this package is cheap: torch, transformers and tokenizers are imported only inside
the functions that need them.
"""

from tether.world.base_model import base_model_config, init_base_model
from tether.world.export import export, read_jsonl, write_jsonl
from tether.world.generator import World
from tether.world.judge import Verdict, judge, score
from tether.world.labeler import (
    TEMPERATURE,
    disagreement_rate,
    label_pairs,
    prefer_probability,
    rank_responses,
)
from tether.world.prompts import PROMPT_MARKER, split_of
from tether.world.tokenizer import build_tokenizer, train_tokenizer

__all__ = [
    "PROMPT_MARKER",
    "TEMPERATURE",
    "Verdict",
    "World",
    "base_model_config",
    "build_tokenizer",
    "disagreement_rate",
    "export",
    "init_base_model",
    "judge",
    "label_pairs",
    "prefer_probability",
    "rank_responses",
    "read_jsonl",
    "score",
    "split_of",
    "train_tokenizer",
    "write_jsonl",
]
