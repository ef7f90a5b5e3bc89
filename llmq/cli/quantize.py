"""``llmq quantize``: float model → llmq checkpoint."""

from __future__ import annotations

import argparse
import json

from llmq.recipes import (
    DEFAULT_EXCLUDE, SUPPORTED_ACT_BITS, SUPPORTED_GROUP_SIZES, SUPPORTED_WEIGHT_BITS, ActivationRecipe, ActScheme,
    SCHEME_DEFAULT, ObserverKind, WeightMethod, WeightRecipe, ZeroPoint,
)


def _group(value: str) -> int | None:
    if value in ("channel", "-1", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group must be one of {SUPPORTED_GROUP_SIZES} or 'channel', got {value!r}") from None


def _memory(value: str) -> float:
    """``"4GB"``, ``"800MB"`` or a number of MB → MB."""
    v = value.strip().upper()
    for suffix, mult in (("GB", 1e3), ("G", 1e3), ("MB", 1.0), ("M", 1.0)):
        if v.endswith(suffix):
            v, scale = v[: -len(suffix)], mult
            break
    else:
        scale = 1.0
    try:
        mb = float(v) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"memory size must look like 4GB or 800MB, got {value!r}") from None
    if mb <= 0:
        raise argparse.ArgumentTypeError(f"memory size must be positive, got {value!r}")
    return mb


def parse_method_args(pairs: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` (``--method-arg``) as a dict; values are JSON where they parse, else strings."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--method-arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare word such as clip=mse
    return out


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
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric: a zero point per group (default)")
    p.set_defaults(symmetric=False)
    p.add_argument("--zero-point", choices=[z.value for z in ZeroPoint], default=None,
                   help="asymmetric zero points: int (uint8, GPTQ/AWQ-style) or float (a float per group, "
                   "--method hqq only); default float for hqq at 2-4 bits, int otherwise")
    p.add_argument("--method", choices=[m.value for m in WeightMethod if m is not WeightMethod.QAT], default="rtn",
                   help="quantization algorithm (default rtn = round to nearest)")
    p.add_argument("--calib", default="bbc", metavar="SOURCE",
                   help="calibration text for gptq/awq: 'bbc' (embedded corpus, calibration split; default), "
                   "a .txt or .jsonl file, or hf:NAME[:CONFIG[:SPLIT]] (needs `datasets`, online)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration windows (default 0)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm parameter, repeatable; VALUE is JSON (e.g. act_order=false, percdamp=0.05); "
                   "see docs/quality.md for each method's parameters")
    p.add_argument("--max-memory", type=_memory, default=None, metavar="SIZE",
                   help="memory budget, e.g. 4GB or 800MB: quantize one decoder layer at a time from disk and "
                   "refuse up front if the plan does not fit")
    p.add_argument("--device", default=None, help="where layers run: cuda or cpu (default: cuda when available)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help=f"fnmatch pattern of module names to keep in float, repeatable; added to the defaults "
                   f"{list(DEFAULT_EXCLUDE)}")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="only quantize Linears matching these patterns (default: all)")
    w8a8 = p.add_argument_group(
        "W8A8 (--method smoothquant)",
        "int8 weights per output channel and int8 activations; --bits/--group/--sym do not apply")
    w8a8.add_argument("--act-bits", type=int, choices=SUPPORTED_ACT_BITS, default=8, help="activation bits (8)")
    w8a8.add_argument("--act-scheme", choices=[s.value for s in ActScheme], default="dynamic",
                      help="dynamic: a scale per token at run time (default); static: one calibrated scale per tensor")
    w8a8.add_argument("--observer", choices=[o.value for o in ObserverKind], default=None,
                      help="calibration method for static scales (default percentile, at 99.9999: the best on held-out "
                      "text with the static default alpha 0.9, docs/w8a8.md; dynamic uses the row absmax)")
    w8a8.add_argument("--alpha", type=_alpha, default=SCHEME_DEFAULT,
                      help="SmoothQuant migration strength in [0, 1], or 'none' for no smoothing (default 0.5 with "
                      "dynamic, 0.9 with static scales: chosen on held-out text, docs/w8a8.md)")
    w8a8.add_argument("--percentile", type=float, default=99.9999, help="percentile observer: %% of |x| kept")
    w8a8.add_argument("--momentum", type=float, default=0.9, help="EMA observer momentum")
    w8a8.add_argument("--calib-samples", type=int, default=128,
                      help="calibration windows of 512 tokens from the BBC calibration split (default 128)")
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
        method_args=parse_method_args(args.method_arg),
        zero_point=args.zero_point,
    )


def _alpha(value: str) -> float | str | None:
    if value.lower() == "none":
        return None
    if value == SCHEME_DEFAULT:  # argparse passes string defaults through type= too
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1] or 'none', got {value!r}") from None


def build_activation_recipe(args: argparse.Namespace) -> ActivationRecipe:
    observer = args.observer or ("percentile" if args.act_scheme == "static" else "minmax")
    return ActivationRecipe(bits=args.act_bits, scheme=args.act_scheme, observer=observer, momentum=args.momentum,
                            percentile=args.percentile, smoothquant_alpha=args.alpha)


def run_w8a8(args: argparse.Namespace) -> int:
    from llmq.w8a8.quantize import quantize_w8a8, w8a8_weight_recipe

    if (args.bits not in (4, 8) or args.group not in (128, None) or args.symmetric or args.include
            or args.zero_point):
        raise ValueError("--bits/--group/--sym/--include/--zero-point do not apply to --method smoothquant "
                         "(W8A8 weights are int8, per output channel, symmetric); drop them")
    if args.calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    recipe = build_activation_recipe(args)
    result = quantize_w8a8(args.model, recipe, args.out, force=args.force, exclude=tuple(args.exclude),
                           n_samples=args.calib_samples, progress=not args.json,
                           trust_remote_code=args.trust_remote_code, device=args.device,
                           max_memory_mb=args.max_memory)
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "recipe": w8a8_weight_recipe().to_dict(),
                          "activation": recipe.to_dict(), **result.summary.to_dict()}))
    else:
        print(result.summary)
        print(f"saved to {result.out_dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    from llmq.api import quantize

    from llmq.calibration import CalibrationSpec

    if args.method == WeightMethod.SMOOTHQUANT.value:
        return run_w8a8(args)
    recipe = build_recipe(args)
    calibration = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
    result = quantize(args.model, recipe, args.out, force=args.force, progress=not args.json,
                      trust_remote_code=args.trust_remote_code, calibration=calibration,
                      max_memory_mb=args.max_memory, device=args.device)
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "recipe": recipe.to_dict(), **result.summary.to_dict()}))
    else:
        print(result.summary)
        print(f"saved to {result.out_dir}")
    return 0
