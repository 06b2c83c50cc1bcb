"""Tokenizers: load an HF tokenizer directory, encode prompts, stop tokens, and train the tiny one.

    tok = load_tokenizer("runs/tiny/tokenizer")
    ids = encode_prompt(tok, render_prompt(tok, cfg.data.chat_template, prompt.text))
    SamplingParams(n=8, stop_token_ids=stop_token_ids(tok))

`train_sentencepiece_tokenizer` builds the embedded default's tokenizer from task text: sentencepiece
BPE with every digit its own piece (`split_digits` plus the digits as user-defined symbols, so "103" is
always "1", "0", "3" and arithmetic stays learnable), "\\n" as a symbol (templates use it), identity
normalisation (no NFKC, whitespace kept). The trained model is converted to a `tokenizers` BPE with the
same pieces and merges and saved as an HF tokenizer directory (`tokenizer.json` + config, plus the raw
`sentencepiece.model` for reference) that `AutoTokenizer.from_pretrained` loads without sentencepiece.
Unlike a converted Llama tokenizer it has no byte fallback (a 64-piece vocabulary has no room for 256
byte pieces): characters never seen in training become `<unk>`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["TokenizerError", "load_tokenizer", "encode_prompt", "stop_token_ids", "train_sentencepiece_tokenizer",
           "SPECIAL_TOKENS", "TOKENIZER_FILES", "has_tokenizer"]

# id order of the tiny tokenizer's special pieces
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}

# The files an HF tokenizer directory may hold (fast, sentencepiece, BPE vocab + merges, special tokens,
# chat template): the one list of what an HF export copies beside its weights (weights/hf_io.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
# Of those, the ones that define a vocabulary (or the config naming one): a directory holding any of them is a
# tokenizer directory; one with only special-token or chat-template files is not.
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether AutoTokenizer can load from `model_dir` (the engines decode texts only when it can)."""
    return any((Path(model_dir) / name).exists() for name in _VOCABULARY_FILES)


class TokenizerError(ValueError):
    """A model directory holds no usable tokenizer; the message names the directory and the fix."""


_COPY_TOKENIZER = ("copy the tokenizer files of the model it was trained from (tokenizer.json, "
                   "tokenizer_config.json, ...) into it")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """An HF tokenizer from a local directory (no hub access: local_files_only=True).

    A tokenizer without a pad token gets its EOS as pad (padding is masked everywhere it is used).
    Raises TokenizerError if the directory holds none: transformers may otherwise build an empty one
    from config.json alone (a Qwen2 directory without tokenizer files encodes every prompt to nothing).
    """
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise TokenizerError(f"tokenizer path {str(path)!r} does not exist (model.hf_path must be a local "
                             "directory holding tokenizer files)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        said = " ".join(str(err).split())[:300] or type(err).__name__  # one line: transformers' is several
        raise TokenizerError(f"{path} holds no tokenizer transformers can load ({said}): {_COPY_TOKENIZER}") from None
    if len(tok.get_vocab()) <= len(set(tok.all_special_tokens)):
        raise TokenizerError(f"{path} holds no tokenizer (transformers built an empty {type(tok).__name__} from its "
                             f"config.json): {_COPY_TOKENIZER}")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of an (already templated) prompt.

    No special tokens are added except BOS, and BOS only when the tokenizer adds it by default (Llama
    style; Qwen adds none) and the text does not already start with it (chat templates often write the
    BOS text themselves). EOS or other suffixes the tokenizer would add are never appended: the policy
    continues the prompt.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is None or ids[:1] == [bos]:
        return ids
    with_specials = tokenizer(text, add_special_tokens=True)["input_ids"]
    return [bos, *ids] if with_specials[:1] == [bos] else ids


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS id(s): the tokenizer's eos_token_id, plus any eos_token_id of a generation_config.json next to
    it (instruct models stop on several, e.g. Qwen's <|im_end|> and <|endoftext|>)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    gen = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    if gen.is_file():
        try:
            add(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, ValueError):
            pass
    if not ids:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token: the engine "
                         "could never stop a completion early")
    return tuple(ids)


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 64,
                                  model_type: str = "bpe", add_bos: bool = False,
                                  extra_symbols: Iterable[str] = ()) -> Any:
    """Train a tiny sentencepiece tokenizer on `texts`, save it as an HF tokenizer dir, return it loaded.

    Args:
        texts: training text (include the template text, e.g. "\\nAnswer:", and the answers).
        out_dir: directory to write (created; existing tokenizer files are overwritten).
        vocab_size: upper bound on pieces (sentencepiece may stop earlier on little text:
            hard_vocab_limit=False); specials take ids 0-3: <pad>, <unk>, <s>, </s>.
        model_type: "bpe" (default; merges carry over to the HF tokenizer exactly) or "char".
        add_bos: whether the HF tokenizer prepends <s> by default (`encode_prompt` follows this).
        extra_symbols: more strings to keep as single pieces (e.g. "<answer>").
    Returns:
        the saved tokenizer, loaded back with `load_tokenizer(out_dir)`.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if model_type not in ("bpe", "char"):
        raise ValueError(f"model_type={model_type!r} must be 'bpe' or 'char' (the HF conversion replays "
                         "BPE merges; a char model is BPE without merges)")
    lines = [t for t in texts if t]
    if not lines:
        raise ValueError("train_sentencepiece_tokenizer needs at least one non-empty text")
    symbols = list(dict.fromkeys([*"0123456789", "\n", *extra_symbols]))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, split_digits=True, user_defined_symbols=symbols,
        character_coverage=1.0, byte_fallback=False, hard_vocab_limit=False, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
        num_threads=1,  # deterministic
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp_path = out / "sentencepiece.model"
    sp_path.write_bytes(model.getvalue())

    # sentencepiece model -> tokenizers BPE with the same pieces and merges (transformers' own extractor).
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    vocab, _, merges = SentencePieceExtractor(str(sp_path)).extract()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=SPECIAL_TOKENS["unk"], fuse_unk=True,
                        byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    if add_bos:
        bos = SPECIAL_TOKENS["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL_TOKENS["pad"],
                                 unk_token=SPECIAL_TOKENS["unk"], bos_token=SPECIAL_TOKENS["bos"],
                                 eos_token=SPECIAL_TOKENS["eos"])
    # Multi-character symbols are whole pieces in sentencepiece but would need merges in BPE; matching
    # them as added tokens keeps them atomic (they keep their ids: they are in the vocabulary already).
    long_symbols = [s for s in symbols if len(s) > 1]
    if long_symbols:
        hf.add_tokens(long_symbols)
    hf.save_pretrained(str(out))
    return load_tokenizer(out)
