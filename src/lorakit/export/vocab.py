"""A transformers tokenizer as GGUF tokenizer metadata (llama.cpp's "gpt2" BPE model), as
convert_hf_to_gguf.py writes it: the token list with its types, the merges and special ids
(gguf-py's SpecialVocab, which also reads the chat template), and the pre-tokenizer's name.

llama.cpp splits text before BPE with a regex it picks by `tokenizer.ggml.pre`; the converter finds the
name by hashing the token ids of one check text. The hashes of the families lorakit exports are kept
here; another tokenizer is written with "default" and a notice, since its splitting is unknown."""

from __future__ import annotations

import os
from hashlib import sha256
from typing import Any

import gguf

from lorakit.errors import LorakitError

# convert_hf_to_gguf.py's check text (get_vocab_base_pre), byte for byte
CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's pre-tokenizer name (from the same function)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


def pre_tokenizer(tokenizer: Any) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, None where the hash is not in the table."""
    ids = tokenizer.encode(CHECK_TEXT)
    return PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())


def token_table(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and GGUF token type (convert_hf_to_gguf.py's get_vocab_base): ids the
    tokenizer lacks are unused padding, added special tokens control, other added tokens user-defined."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, tokenizer_dir: str | os.PathLike, vocab_size: int) -> list[str]:
    """Write the tokenizer's metadata; returns notices for the report.

    Raises:
        LorakitError: a tokenizer that is not byte-level BPE (a SentencePiece `tokenizer.model`), which
            llama.cpp reads as a different model lorakit does not write.
    """
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    # byte_fallback BPE is SentencePiece's kind (Llama 2), which llama.cpp reads as its "llama" model
    if type(backend).__name__ != "BPE" or getattr(backend, "byte_fallback", False):
        raise LorakitError("the base's tokenizer is not a byte-level BPE tokenizer (tokenizer.json); GGUF export writes that kind "
                           "only, so convert this model with llama.cpp's convert_hf_to_gguf.py")
    if max(tokenizer.get_vocab().values()) >= vocab_size:
        raise LorakitError(f"the tokenizer has ids past the model's vocab_size {vocab_size}; resize the embeddings before exporting")
    pre = pre_tokenizer(tokenizer)
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    # whether llama.cpp adds BOS / EOS is what the tokenizer itself does, not what its config may say
    ids = list(tokenizer.encode("a"))
    special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer)
    if pre is None:
        return ["the tokenizer's pre-tokenizer is not one lorakit knows llama.cpp's name for: written as 'default', "
                "so llama.cpp may split text differently (token ids given directly are unaffected)"]
    return []
