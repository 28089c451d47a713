"""Load any AutoModelForCausalLM with its tokenizer; dtype, gradient checkpointing, LoRA."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from tether.errors import TetherError

log = logging.getLogger("tether")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")


def check_local(name: str, what: str) -> None:
    """Fail at once, and say so plainly, when `name` is meant as a local directory that is not
    there (instead of trying the hub and blaming the network). A name of the form `owner/name`
    may be either: only a name that cannot be a hub id is checked."""
    from pathlib import Path

    from tether.data.io import looks_like_path

    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise TetherError(f"{what} {name} is a file; give the model's directory")
    if not path.exists() and looks_like_path(name):
        raise TetherError(f"{what} {name}: no such directory (a hub id would read owner/name)")


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """Load a tokenizer and make sure it has a pad token (saying which one was chosen)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    check_local(name, "tokenizer")
    local = Path(name).expanduser()
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        raise TetherError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...). "
                          "Save the tokenizer into it (tokenizer.save_pretrained) or copy those "
                          "files from the model it was trained from.")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise TetherError(f"could not load a tokenizer from {name!r}: {type(err).__name__}: {err}") from None
    tok.padding_side = padding_side
    if tok.pad_token_id is None:
        # unk is never produced by most byte-fallback tokenizers, so it makes a pad that cannot be
        # confused with a real token; eos is the usual fallback (attention masks keep it harmless).
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise TetherError(f"tokenizer {name!r} has no pad, unk or eos token; add a pad token "
                              "to it and save it before training")
        log.info("tokenizer has no pad token: using %r (id %d) as pad", tok.pad_token, tok.pad_token_id)
    return tok


def pad_id(tokenizer: Any, fallback: int = 0) -> int:
    """The tokenizer's pad id, or `fallback` when it has none. Only for padding that a mask
    hides: the id never reaches a loss or a logit that is read."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def eos_token_ids(tokenizer: Any, model: Optional[Any] = None) -> list[int]:
    """All ids that end a response: the tokenizer's eos plus the generation config's eos list."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if extra is not None:
        for i in extra if isinstance(extra, (list, tuple)) else [extra]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise TetherError("the tokenizer and model define no EOS token; set tokenizer.eos_token")
    return ids


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   gradient_checkpointing: bool = False) -> Any:
    """Load an AutoModelForCausalLM. SDPA attention is requested for block-diagonal packing masks."""
    from transformers import AutoModelForCausalLM

    check_local(name, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an architecture without SDPA support
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise TetherError(f"could not load a causal LM from {name!r}: {type(err).__name__}: {err}") from None
    prepare_for_training(model, gradient_checkpointing)
    return model


def prepare_for_training(model: Any, gradient_checkpointing: bool) -> None:
    model.config.use_cache = False  # the KV cache only costs memory in a training forward
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


def weights_not_in_place(module: torch.nn.Module) -> Optional[str]:
    """Why `module`'s weights cannot be read directly at forward time, or None when they can:
    code that calls a module's weights itself (rather than its forward) needs them whole and
    where they are."""
    if any(type(p.data) is not torch.Tensor or p.numel() == 0 for p in module.parameters()):
        return "parameters are sharded (FSDP / ZeRO-3)"
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        return "accelerate hooks move or offload weights at forward time"
    return None


DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RL logprobs must not be noisy): dropout modules,
    the config, and the probabilities that modules copied from the config when they were built
    (Llama, Mistral and Qwen2 attention keep `attention_dropout` as a float and apply it in
    train mode, whatever the config says afterwards)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for key in DROPOUT_KEYS:
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    for key in DROPOUT_KEYS:
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def apply_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: str,
               task_type: str = "CAUSAL_LM", modules_to_save: Optional[list[str]] = None) -> Any:
    """Wrap `model` with LoRA adapters through peft (the base weights are frozen)."""
    from peft import LoraConfig, get_peft_model

    targets: Any = "all-linear" if target_modules == "all-linear" else [
        t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type=task_type, modules_to_save=modules_to_save)
    model = get_peft_model(model, config)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d: training %d of %d parameters (%.2f%%)", r, n_train, n_all, 100 * n_train / n_all)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The config keys that state how many positions a model's position embedding has.
POSITION_KEYS = ("n_positions", "max_position_embeddings")


def stated_positions(config: Any, keys: Sequence[str] = POSITION_KEYS) -> Optional[tuple[int, str]]:
    """(positions, key) from the first of `keys` that `config` sets to a positive int, else None."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def position_limit(model: Any) -> Optional[tuple[int, str]]:
    """(positions, config key) when the model's positions come from a learned embedding table
    (GPT-2, GPT-BigCode, GPT-Neo, OPT, BioGPT): no input may be longer, or its forward fails
    with an index error. None when positions are computed (rotary, ALiBi): a longer input runs,
    if less well than within the length the model was trained on."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = stated_positions(getattr(inner, "config", None))
    if found is None:
        return None
    limit, key = found
    tokens = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    for name, module in inner.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        # OPT's table has 2 extra rows (its positions start at 2)
        named_for_positions = "pos" in leaf or leaf == "wpe"
        if (isinstance(module, torch.nn.Embedding) and module is not tokens and named_for_positions
                and limit <= module.num_embeddings <= limit + 2):
            return limit, key
    return None


def check_positions(model: Any, longest: int, what: str, fix: str, name: str = "the model") -> None:
    """Refuse, before any work, inputs longer than a learned position table (`position_limit`):
    `longest` tokens of `what`, and `fix` says which option to lower."""
    from tether.errors import ConfigError

    found = position_limit(model)
    if found is None or longest <= found[0]:
        return
    limit, key = found
    raise ConfigError(f"{what} reach {longest} tokens, but {name} has learned position embeddings for "
                      f"{limit} positions only ({key} in its config), and its forward cannot take a longer "
                      f"input: {fix} so that no input is longer than {limit} tokens")


def within_positions(model: Any, length: Optional[int]) -> Optional[int]:
    """The length to cut inputs to: `length` (None: no cut), lowered to the model's learned
    position table (`position_limit`), past which its forward cannot run."""
    found = position_limit(model)
    if found is None or (length is not None and length <= found[0]):
        return length
    return found[0]


def declared_position_limit(name: str, trust_remote_code: bool = False,
                            longest: Optional[int] = None) -> Optional[tuple[int, str]]:
    """`position_limit` of the model at `name`, from its config alone: the model is built on the
    meta device, so no weight is read or allocated. None when it cannot be told. With `longest`,
    only a table shorter than `longest` tokens is looked for: when the config states no position
    count below it, the answer is None without building anything."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        stated = stated_positions(config)
        if longest is not None and (stated is None or stated[0] >= longest):
            return None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an unknown layout: the check after loading still applies
        return None
    return position_limit(model)


def fit_default_length(cfg: Any, field_name: str, model_name: str, reserve: int = 0,
                       reserved_for: str = "", table: Optional[tuple[int, str]] = None) -> Any:
    """`cfg` with `field_name` (a length option left at its default) lowered so that it plus
    `reserve` tokens (`reserved_for`, as the warning says it) fits the learned position table of
    the model at `model_name` (`table`, when the loaded model's is known already: nothing is
    built then); a warning says so. A value the user chose is left as it is: `check_positions`
    refuses it later if the data actually reach past the table."""
    import dataclasses

    default = {f.name: f.default for f in dataclasses.fields(cfg)}[field_name]
    value = getattr(cfg, field_name)
    if value != default:
        return cfg
    found = table if table is not None else declared_position_limit(
        model_name, getattr(cfg, "trust_remote_code", False), longest=value + reserve)
    if found is None or value + reserve <= found[0] or found[0] - reserve < 1:
        return cfg
    limit, key = found
    fitted = limit - reserve
    flag = "--" + field_name.replace("_", "-")
    log.warning("%s %d (the default)%s is more than %s's learned position table holds (%d positions, "
                "%s in its config): using %s %d", flag, value,
                f" plus {reserve} tokens for {reserved_for}" if reserve else "", model_name, limit, key,
                flag, fitted)
    return dataclasses.replace(cfg, **{field_name: fitted})
