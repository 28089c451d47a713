"""Shared fixtures: tiny random models of several architectures, built locally, and the real
pretrained stories260K from ../shared when it is there.

Every tiny model, and its tokenizer, is built here the same way whether or not ../shared exists:
a fixture never changes what a test means. The tiny Llama has a SentencePiece-style vocabulary
(byte fallback, "▁" for spaces, BOS added) and the GPT-2, Qwen2 and NeoX models a byte-level
BPE, so the tests that need two vocabularies always have them. Tests that need the real model
or the real data take the `stories` / `hh_rlhf` fixtures, which skip with a reason when ../shared
is out of reach."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# OpenMP threads that spin while waiting make a loaded 2-core machine crawl (seen: 50x slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
HH_RLHF = SHARED / "data" / "hh-rlhf"

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_WORDS = ("the a cat dog sat on mat ran to park and saw big red ball happy sad sun tree story "
          "once upon time there was little girl boy named lily tom she he played with friend "
          "answer question what is why how you i we they it good bad yes no please thank").split()


def _bpe_tokenizer(path: Path, chat: bool):
    """A byte-level BPE trained here: no BOS added, EOS <|endoftext|>, no pad (like GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import random

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


_NAMES = "Lily Tom Sue Ben Max Ann Tim Jack Amy Sam Mia Leo".split()
_THINGS = "ball cat dog tree cake bird toy box car hat sun park".split()
_MORE = ("apple garden window mother father little brother sister happy sunny rainy morning night "
         "flower butterfly rabbit turtle kitten puppy forest river mountain castle dragon princess "
         "cookie sandwich picnic balloon rainbow jumped laughed smiled shouted whispered looked "
         "found wanted needed decided helped shared wonderful beautiful scared brave curious "
         "together suddenly quickly slowly because always never friends family school teacher "
         "purple yellow orange green blue pink sparkly shiny fluffy tiny enormous gentle").split()
_STORY = ("Once upon a time, {n} saw a {t}.", "{n} liked the {t} and was happy.",
          "One day, {n} went to the park with a friend.", "{n} said: what is that big red {t}?",
          "The little {t} was sad, so {n} played with it.", "They ran and sang under the sun.")


def _llama_tokenizer(path: Path):
    """A Llama-style tokenizer trained here, laid out like stories260K's: 512 ids, <unk> <s> </s>
    first, then the 256 byte-fallback tokens <0x00>..<0xFF>, then the learned pieces; spaces
    become "▁", BOS is added, no pad."""
    import random

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_STORY).format(n=rng.choice(_NAMES), t=rng.choice(_THINGS))
                       for _ in range(3)) + " " + " ".join(rng.sample(_MORE + _WORDS, 8)) + "."
              for _ in range(600)]
    specials = ["<unk>", "<s>", "</s>"]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    learner.pre_tokenizer = pre_tokenizers.Sequence([  # no merge across words or punctuation
        pre_tokenizers.Metaspace(prepend_scheme="never"), pre_tokenizers.Punctuation()])
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512 - 256, special_tokens=specials))
    learned = json.loads(learner.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    spec = json.loads(learner.to_str())
    spec["pre_tokenizer"] = None  # as Llama's own: the normalizer alone places the spaces
    spec["model"] = {**learned, "vocab": vocab, "byte_fallback": True, "fuse_unk": True}
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, t in enumerate(specials)]
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(path)
    return fast


def _build(path: Path, arch: str) -> Path:
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(0)
    if arch == "llama":
        tok = _llama_tokenizer(path)
    else:
        tok = _bpe_tokenizer(path, chat=arch == "qwen2")
    vocab = len(tok)
    common = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, **common))
    elif arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=256, **common))
    else:
        raise ValueError(arch)
    model.save_pretrained(path)
    return path


ARCHS = ("llama", "gpt2", "qwen2", "neox")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: _build(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def chat_model(tiny_models) -> Path:
    """The tiny random Qwen2 whose tokenizer carries the ChatML template (`CHATML`:
    <|im_start|>role\\ncontent<|im_end|>, each marker one special token): a chat policy, and the
    LM judge of the conversational tests."""
    return tiny_models["qwen2"]


@pytest.fixture(scope="session")
def chat_reward_model(chat_model, tmp_path_factory) -> Path:
    """A reward model on the ChatML Qwen2 (its trunk, a seeded random head), saved with the
    ChatML tokenizer: it reads a conversation in that template."""
    from transformers import AutoTokenizer

    from tether.models.reward import init_reward_model

    path = tmp_path_factory.mktemp("chat_rm")
    tok = AutoTokenizer.from_pretrained(chat_model)
    init_reward_model(str(chat_model), pad_token_id=tok.eos_token_id, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and far faster when the machine is busy."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=ARCHS)
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def stories() -> Path:
    if not STORIES.exists():
        pytest.skip(f"{STORIES} is not available")
    return STORIES


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def story_rows(n: int, seed: int = 0) -> list[dict]:
    """A small prompt/completion task the stories model can learn within a few steps."""
    import random

    rng = random.Random(seed)
    names, things = ["Lily", "Tom", "Sue", "Ben", "Max"], ["ball", "cat", "dog", "tree", "cake"]
    rows = []
    for _ in range(n):
        name, thing = rng.choice(names), rng.choice(things)
        rows.append({"prompt": f"Once upon a time, {name} saw a",
                     "completion": f" {thing}. {name} liked the {thing}."})
    return rows


@pytest.fixture
def story_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", story_rows(64))


# A reward function file's source: the share of vowels in a completion, which a tiny model can
# learn to raise within a few iterations (the online tests' task).
VOWELS_REWARD = '''
def vowels(prompts, completions, **_):
    """The share of vowels among a completion's letters: a reward a tiny model can learn."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out
'''


def vowel_reward_outside(rewards_py: Path, model_dir: Path, n: int = 64) -> float:
    """The mean `vowels` reward (defined in rewards_py) of n samples of a saved policy, drawn
    with plain transformers from one fixed prompt: a policy's gain measured outside tether."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("rewards_outside", rewards_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok("Once upon a time, Tom saw a", return_tensors="pt").input_ids
    torch.manual_seed(0)
    sampled = model.generate(ids.repeat(n, 1), do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6,
                             pad_token_id=0)
    return sum(module.vowels([], tok.batch_decode(sampled[:, ids.shape[1]:], skip_special_tokens=True))) / n
