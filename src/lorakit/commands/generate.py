"""`lorakit generate`: complete a prompt or answer a chat message, with or without an adapter."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="generate text from the base model or base + adapter")
    parser.add_argument("--model", default="default", help="'default' or a local model directory")
    parser.add_argument("--adapter", default=None, help="adapter directory to apply (peft format)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="raw text to continue")
    what.add_argument("--chat", help="a user message, rendered with the tokenizer's chat template")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.errors import LorakitError
    from lorakit.lora.model import PeftModel
    from lorakit.models.load import load_model, load_tokenizer

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise LorakitError("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    text = args.prompt if args.prompt is not None else _chat_text(tokenizer, args.chat, args.system)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=args.prompt is not None)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0


def _chat_text(tokenizer, message: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
