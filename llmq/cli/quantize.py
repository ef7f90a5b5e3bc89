"""``llmq quantize``: float model → llmq checkpoint."""

from __future__ import annotations

import argparse
import json

from llmq.recipes import DEFAULT_EXCLUDE, SUPPORTED_GROUP_SIZES, SUPPORTED_WEIGHT_BITS, WeightMethod, WeightRecipe


def _group(value: str) -> int | None:
    if value in ("channel", "-1", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group must be one of {SUPPORTED_GROUP_SIZES} or 'channel', got {value!r}") from None


def register(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a float model and save an llmq checkpoint",
        description="Quantize the Linear layers of a Hugging Face causal LM to low-bit integer weights "
        "(group-wise, packed into int32 words) and save a checkpoint that plain "
        "`transformers` loads after `import llmq`.",
    )
    p.add_argument("model", help="model folder, the embedded default 'smollm2-135m', or a hub id (online only)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--bits", type=int, choices=SUPPORTED_WEIGHT_BITS, default=4, help="weight bits (default 4)")
    p.add_argument("--group", type=_group, default=128, metavar="{32,64,128,256,channel}",
                   help="input features per scale/zero group, or 'channel' for one group per output channel "
                   "(default 128; a last partial group is padded)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="symmetric: fixed zero point, no zeros stored")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric: integer zero per group (default)")
    p.set_defaults(symmetric=False)
    p.add_argument("--method", choices=[m.value for m in WeightMethod], default="rtn",
                   help="quantization algorithm (default rtn = round to nearest)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help=f"fnmatch pattern of module names to keep in float, repeatable; added to the defaults "
                   f"{list(DEFAULT_EXCLUDE)}")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="only quantize Linears matching these patterns (default: all)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder to run")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


def build_recipe(args: argparse.Namespace) -> WeightRecipe:
    return WeightRecipe(
        bits=args.bits,
        group_size=args.group,
        symmetric=args.symmetric,
        method=args.method,
        include=tuple(args.include) if args.include else ("*",),
        exclude=DEFAULT_EXCLUDE + tuple(args.exclude),
    )


def run(args: argparse.Namespace) -> int:
    from llmq.api import quantize

    recipe = build_recipe(args)
    result = quantize(args.model, recipe, args.out, force=args.force, progress=not args.json,
                      trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "recipe": recipe.to_dict(), **result.summary.to_dict()}))
    else:
        print(result.summary)
        print(f"saved to {result.out_dir}")
    return 0
