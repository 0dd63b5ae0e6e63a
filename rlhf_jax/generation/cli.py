"""`rlhf-jax generate`: sample completions from a Hugging Face-format checkpoint directory.

    rlhf-jax generate --model runs/demo/ppo/export --prompt "3 1 2 ->" --max-new-tokens 32 --temperature 0.7
    rlhf-jax generate --model DIR --tokenizer TOKDIR --prompts-file prompts.jsonl --out samples.jsonl --greedy
    rlhf-jax generate --model DIR --chat --prompt "What is 2+2?"     # through the chat template

A prompts file is JSONL with a "prompt" field per line, or plain text (one prompt per line).
Each completion is printed (and written as JSONL with --out: prompt, completion, n_tokens, stopped).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from rlhf_jax.generation.errors import GenerationArgumentError
from rlhf_jax.generation.text import generate_text
from rlhf_jax.models import check_tokenizer_compat, from_pretrained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-format model directory (config.json + safetensors)")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: the model directory)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="JSONL with a 'prompt' field, or one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 disables")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    parser.add_argument("--no-stop", action="store_true", help="do not stop at the tokenizer's EOS")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message in the tokenizer's chat template")
    parser.add_argument("--out", default=None, help="write completions as JSONL here")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise SystemExit(f"rlhf-jax generate: --prompts-file {args.prompts_file!r} does not exist")
        with open(args.prompts_file, encoding="utf-8-sig") as f:  # a Windows byte-order mark is fine
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{args.prompts_file}:{lineno}: invalid JSON ({e.msg})") from e
                    if not isinstance(rec.get("prompt"), str):
                        raise SystemExit(f"{args.prompts_file}:{lineno}: expected a string field 'prompt'")
                    prompts.append(rec["prompt"])
                else:
                    prompts.append(line.rstrip("\r\n"))
    if not prompts:
        raise SystemExit("rlhf-jax generate: give at least one --prompt or a --prompts-file")
    return prompts


def _chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn rendered by the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationArgumentError("rlhf-jax generate: --chat needs a tokenizer with a chat template "
                                      f"(tokenizer_config.json 'chat_template'); {type(tokenizer).__name__} "
                                      "has none: drop --chat or pass --tokenizer DIR of a chat model")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def run(args) -> int:
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise SystemExit(f"rlhf-jax generate: {flag} must be >= 1, got {value}")
    if args.temperature <= 0 and not args.greedy:
        raise SystemExit(f"rlhf-jax generate: --temperature must be > 0 (or use --greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"rlhf-jax generate: --top-p must be in (0, 1], got {args.top_p}")
    for flag, path in (("--model", args.model), ("--tokenizer", args.tokenizer or args.model)):
        if not os.path.isdir(path):
            raise SystemExit(f"rlhf-jax generate: {flag} {path!r} is not a directory")
    prompts = _read_prompts(args)

    import transformers  # heavy (~1.7 s); only this command needs it

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model, params = from_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    check_tokenizer_compat(model.config, tokenizer)
    shown = prompts
    if args.chat:
        prompts = [_chat_prompt(tokenizer, p) for p in prompts]
    # greedy decoding ignores the temperature (it only scales log-probs, which are not shown here)
    temperature = 1.0 if args.greedy and args.temperature <= 0 else args.temperature
    key = jax.random.key(args.seed)
    out_f = open(args.out, "w", encoding="utf-8") if args.out else None
    t0, n_tokens = time.perf_counter(), 0
    try:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            texts, out, _, _ = generate_text(
                model, params, tokenizer, chunk, max_new_tokens=args.max_new_tokens,
                rng=jax.random.fold_in(key, start), temperature=temperature, top_k=args.top_k,
                top_p=args.top_p, greedy=args.greedy, stop_token_ids=() if args.no_stop else None,
                add_special_tokens=not args.chat, return_output=True,
            )
            lengths, stopped = out.lengths.tolist(), out.stopped.tolist()
            n_tokens += sum(lengths)
            for prompt, text, n, s in zip(shown[start:start + args.batch_size], texts, lengths, stopped):
                print(f">>> {prompt}\n{text}\n")
                if out_f:
                    out_f.write(json.dumps({"prompt": prompt, "completion": text, "n_tokens": n,
                                            "stopped": bool(s)}) + "\n")
    finally:
        if out_f:
            out_f.close()
    dt = time.perf_counter() - t0
    print(f"{len(prompts)} prompts, {n_tokens} new tokens in {dt:.1f}s (incl. compilation)", file=sys.stderr)
    return 0
