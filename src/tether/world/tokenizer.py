"""The world tokenizer: word-level, trained locally with `tokenizers`, saved for `transformers`.

World text is words and punctuation separated by single spaces, so one token per word is the
smallest and clearest choice: about 240 tokens, every one a whole word. Text is split on
whitespace and decoded by joining tokens with one space, so `decode(encode(text)) == text` for
all world text (single spaces, no leading or trailing space). A word outside the world becomes
`<unk>`.

Special tokens: `<pad>` (id 0), `<s>` (bos, id 1), `</s>` (eos, id 2), `<unk>` (id 3); pad is
distinct from eos so padding never teaches the model to stop. The tokenizer adds NO special
tokens by itself: tether's data code prepends bos when `bos_token_id` is set and the tokenizer
did not add it, and appends eos after each completion. This also keeps the prompt and the
completion tokenizing the same whether they are encoded apart or together.

The saved directory loads with `transformers.AutoTokenizer.from_pretrained(dir)` as a
`PreTrainedTokenizerFast`.
"""

import json
import os
from collections.abc import Iterable

from tether.world import vocab

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
MODEL_MAX_LENGTH = 128  # the base model's context (base_model.MAX_POSITIONS)


def train_tokenizer(texts: Iterable[str]):
    """World texts -> a `transformers.PreTrainedTokenizerFast` (word-level, see module doc).

    Every world word is in the vocabulary even if `texts` misses some; word ids follow the
    frequency in `texts`, so the same texts always give the same ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    # One line listing every world word, so that no word is missing from the vocabulary.
    backend.train_from_iterator(_with_all_words(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # keep " ." as written: exact round trips
    )


def _with_all_words(texts: Iterable[str]) -> Iterable[str]:
    yield " ".join(vocab.WORDS)
    yield from texts


def build_tokenizer(out_dir: str, texts: Iterable[str] | None = None, seed: int = 0,
                    n_documents: int = 5000) -> str:
    """Train the world tokenizer and save it to out_dir -> out_dir.

    texts: the corpus to train on; by default `n_documents` documents of `World(seed).corpus`.
    """
    if texts is None:
        from tether.world.generator import World

        texts = World(seed).corpus(n_documents)
    return save_tokenizer(train_tokenizer(texts), out_dir)


def save_tokenizer(tokenizer, out_dir: str) -> str:
    """save_pretrained, recording the class as "PreTrainedTokenizerFast" -> out_dir.

    That is the name every transformers release (4.x and 5.x) resolves; 5.x would otherwise
    write its new alias "TokenizersBackend", which 4.x cannot load.
    """
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return out_dir
