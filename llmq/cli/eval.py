"""``llmq eval``: perplexity of a model folder (quantized or float) on fixed windows."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from llmq.cli.common import add_runtime_arguments, load_for_inference


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate perplexity",
        description="Perplexity = exp(mean NLL) over non-overlapping windows of the first N tokens of a text "
        "(default: held-out BBC News articles, tech then politics). Works for float models too, for comparison.",
    )
    p.add_argument("model", help="llmq checkpoint folder, float model folder, or 'smollm2-135m'")
    p.add_argument("--ppl", action="store_true", required=True, help="compute perplexity (the only metric so far)")
    p.add_argument("--text", type=Path, default=None, help="UTF-8 text file to evaluate on (default: BBC eval split)")
    p.add_argument("--tokens", type=int, default=16384, help="evaluate the first N tokens (default 16384)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_runtime_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmq.eval.perplexity import perplexity

    text = None
    if args.text is not None:
        if not args.text.is_file():
            raise FileNotFoundError(f"--text {args.text} does not exist")
        try:
            text = args.text.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--text {args.text} is not UTF-8 text (byte {e.start}: {e.reason}); "
                             f"pass a plain-text file") from None
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2, got {args.tokens}")
    model, tokenizer, _ = load_for_inference(args)
    # progress goes to stderr: on with --json too (stdout stays one JSON object)
    result = perplexity(model, tokenizer, text=text, max_tokens=args.tokens, window=args.window, progress=True)
    if not math.isfinite(result.perplexity):
        raise ValueError(f"perplexity is {result.perplexity} over {result.tokens} tokens: the model produced "
                         f"non-finite logits (NaN/inf), so its weights or its dtype overflow; try --dtype float32, "
                         f"or re-create the checkpoint")
    if args.json:
        print(json.dumps({"model": str(args.model), **result.to_dict()}))
    else:
        print(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens "
              f"({result.window}-token windows, {result.seconds:.1f} s)")
    return 0
