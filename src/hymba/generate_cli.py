"""`hymba generate` and `hymba chat`: text from a checkpoint (the small model shipped in the package by default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hymba.errors import HymbaError


def default_model_dir() -> Path:
    """The small Hymba trained with `hymba train` and shipped inside the package (see its README)."""
    return Path(__file__).parent / "assets" / "default-model"


def load_model_and_tokenizer(model: str | None, device: str | None, dtype: str | None):
    """(model, tokenizer) for a path or hub id; the tokenizer comes from the checkpoint or the packaged default."""
    from hymba.checkpoint import resolve_device
    from hymba.model import HymbaForCausalLM
    from hymba.tokenizer import HymbaTokenizer, default_tokenizer_dir

    path = model or default_model_dir()
    # dtype None: from_pretrained's default (float32 on CPU, the checkpoint's own on GPU), so API and CLI agree.
    lm = HymbaForCausalLM.from_pretrained(str(path), dtype=dtype, device=resolve_device(device))
    tok_dir = lm.checkpoint_dir if (lm.checkpoint_dir / "tokenizer.json").is_file() else default_tokenizer_dir()
    return lm, HymbaTokenizer.from_pretrained(tok_dir)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the small model in the package)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: float32 on CPU, the checkpoint's own on GPU)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="on CUDA, capture the eager decode step instead of compiling it first (starts faster; "
                             "compiling takes about a minute the first time, seconds once cached)")


def _sampling(args) -> dict:
    from hymba.generate import SamplingParams, check_seed

    params = SamplingParams(do_sample=args.temperature > 0, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    if args.max_new_tokens < 1:
        raise HymbaError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_seed(args.seed)
    return vars(params)


def _utf8(text: str, what: str) -> str:
    """`text`, if it came from UTF-8: Python reads other bytes in argv and stdin as lone surrogates
    (surrogateescape), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HymbaError(f"{what} is not UTF-8 text (character {exc.start}); give UTF-8 text") from None
    return text


def _read_batch_file(path: Path) -> list[str]:
    """The prompts of a batch file: its non-blank lines."""
    if path.is_dir():
        raise HymbaError(f"--batch-file {path} is a directory; give a text file with one prompt per line")
    if not path.is_file():
        raise HymbaError(f"--batch-file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a BOM is no part of the first prompt
    except UnicodeDecodeError as exc:
        raise HymbaError(f"--batch-file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise HymbaError(f"--batch-file {path} has no prompts; put one prompt on each line")
    return prompts


def run_generate(args) -> int:
    from hymba.generate import complete, stream

    sampling = _sampling(args)  # validate before loading anything
    if args.batch_file and args.prompt is not None:
        raise HymbaError("give a prompt or --batch-file, not both (the prompts of a batch file are its lines)")
    if args.batch_file:
        prompts = _read_batch_file(Path(args.batch_file))
    elif args.prompt is not None:
        prompts = [_utf8(args.prompt, "the prompt")]
    else:
        raise HymbaError('give a prompt (hymba generate "Once upon a time") or --batch-file FILE')
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    if len(prompts) == 1:
        pieces = stream(model, tokenizer, prompts[0], max_new_tokens=args.max_new_tokens, seed=args.seed,
                        compile=args.compile, **sampling)
        first = next(pieces, "")  # bad input surfaces here, before anything is printed
        sys.stdout.write(prompts[0] + first)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    completions = complete(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
                           compile=args.compile, **sampling)
    for prompt, completion in zip(prompts, completions):
        print(prompt + completion)
        print("---")
    return 0


def run_chat(args) -> int:
    """Multi-turn chat through the model's chat template; the whole conversation is re-encoded each turn."""
    from hymba.generate import stream

    sampling = _sampling(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    if not tokenizer.chat_template:
        raise HymbaError("this checkpoint's tokenizer has no chat template; use `hymba generate` instead")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    stop = ["<extra_id_1>", "</s>"]
    print("Chat with Hymba. An empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            user = _utf8(input("you> "), "the input")
        except EOFError:
            break
        except UnicodeDecodeError:  # a stdin that decodes strictly
            raise HymbaError("the input is not UTF-8 text; type or pipe UTF-8 text") from None
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        limit = model.config.max_position_embeddings - model.config.num_memory_tokens - args.max_new_tokens
        if len(ids) > limit:
            raise HymbaError(f"the conversation is {len(ids)} tokens, over this model's limit of {limit}; "
                             "start a new chat or lower --max-new-tokens")
        sys.stdout.write("hymba> ")
        reply = ""
        for piece in stream(model, tokenizer, ids, stop_strings=stop, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, compile=args.compile, **sampling):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def add_parser(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="continue a prompt (streams to stdout)",
                                description="Generate text from a Hymba checkpoint. With no --model, uses the small "
                                            "model shipped in the package (no download).")
    gen.add_argument("prompt", nargs="?", help="the text to continue")
    gen.add_argument("--batch-file", help="a file with one prompt per line, generated as one padded batch")
    _add_model_args(gen)
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="interactive multi-turn chat with the model's chat template",
                                 description="Chat with an instruction-tuned Hymba checkpoint (e.g. "
                                             "nvidia/Hymba-1.5B-Instruct) using its chat template.")
    chat.add_argument("--system", help="a system message to start the conversation with")
    _add_model_args(chat)
    chat.set_defaults(func=run_chat)
