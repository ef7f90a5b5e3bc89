"""``llmq quantize``: float model → llmq checkpoint."""

from __future__ import annotations

import argparse
import json

from llmq.recipes import (
    DEFAULT_EXCLUDE, LEVEL_BITS, SUPPORTED_ACT_BITS, SUPPORTED_GROUP_SIZES, SUPPORTED_WEIGHT_BITS, ActivationRecipe,
    ActScheme, SCHEME_DEFAULT, Levels, ObserverKind, WeightMethod, WeightRecipe, ZeroPoint,
)


CHANNEL = "channel"  # --group channel: one group per output channel (WeightRecipe.group_size None)
_GROUP_CHOICES = ", ".join(map(str, SUPPORTED_GROUP_SIZES)) + f" or '{CHANNEL}'"
_NOT_GIVEN = object()  # default of options whose None is a meaningful value (--alpha none)

# Options read by only some methods, by argparse dest: giving one to a method that does not read it
# is refused (it would be silently ignored), see refuse_unread_options.
CALIBRATION_OPTIONS = {"calib": "--calib", "nsamples": "--nsamples", "seqlen": "--seqlen", "seed": "--seed"}
WEIGHT_OPTIONS = {"bits": "--bits", "group": "--group", "symmetric": "--sym/--asym", "zero_point": "--zero-point",
                  "include": "--include", "method_arg": "--method-arg", "lm_head": "--lm-head", "levels": "--levels"}
LM_HEAD_CHOICES = ("float", "int8", "int4")  # llmq.model.lm_head.LmHead (not imported: --help stays torch-free)
W8A8_OPTIONS = {"act_bits": "--act-bits", "act_scheme": "--act-scheme", "observer": "--observer", "alpha": "--alpha",
                "percentile": "--percentile", "momentum": "--momentum", "calib_samples": "--calib-samples"}


def _group(value: str) -> int | str:
    if value == CHANNEL:
        return CHANNEL
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group must be one of {_GROUP_CHOICES}, got {value!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{size} is not a group size: write --group {CHANNEL} for one group per "
                                         f"output channel, or one of {_GROUP_CHOICES}")
    if size not in SUPPORTED_GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"unsupported group size {size}: choose one of {_GROUP_CHOICES}")
    return size


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
    p.add_argument("--bits", type=int, choices=sorted({*SUPPORTED_WEIGHT_BITS, 1}), default=None,
                   help="weight bits (default 4; 1 with --levels binary only, which it defaults to)")
    p.add_argument("--levels", choices=[v.value for v in Levels], default=None,
                   help="where the 2**bits values lie: uniform (the integer grid, default), nf (normal-float "
                   "quantiles), kmeans (a learned table per output channel), log2 (signed powers of two) at "
                   "2-4 bits, binary (sign x scale) at 1 bit; non-uniform levels are symmetric and run with "
                   "--method rtn or gptq (docs/levels.md)")
    p.add_argument("--group", type=_group, default=None, metavar="{32,64,128,256,channel}",
                   help="input features per scale/zero group, or 'channel' for one group per output channel "
                   "(default 128; a last partial group is padded)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="symmetric: fixed zero point, no zeros stored")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric: a zero point per group (default)")
    p.set_defaults(symmetric=None)
    p.add_argument("--zero-point", choices=[z.value for z in ZeroPoint], default=None,
                   help="asymmetric zero points: int (uint8, GPTQ/AWQ-style) or float (a float per group, "
                   "--method hqq only); default float for hqq at 2-4 bits, int otherwise")
    p.add_argument("--method", choices=[m.value for m in WeightMethod if m is not WeightMethod.QAT], default="rtn",
                   help="quantization algorithm (default rtn = round to nearest)")
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help="calibration text for gptq/awq: 'bbc' (embedded corpus, calibration split; default), "
                   "a .txt or .jsonl file, or hf:NAME[:CONFIG[:SPLIT]] (needs `datasets`, online)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=None, help="seed for drawing the calibration windows (default 0)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm parameter, repeatable; VALUE is JSON (e.g. act_order=false, percdamp=0.05); "
                   "see docs/quality.md for each method's parameters")
    p.add_argument("--max-memory", type=_memory, default=None, metavar="SIZE",
                   help="memory budget, e.g. 4GB or 800MB: quantize one decoder layer at a time from disk and "
                   "refuse up front if the plan does not fit")
    p.add_argument("--device", default=None,
                   help="where layers run: 'cpu', 'cuda' or 'cuda:N' (default: CUDA when available, else CPU)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help=f"fnmatch pattern of module names to keep in float, repeatable; added to the defaults "
                   f"{list(DEFAULT_EXCLUDE)}")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="only quantize Linears matching these patterns (default: all)")
    p.add_argument("--lm-head", choices=LM_HEAD_CHOICES, default=None,
                   help="also quantize the output head, round-to-nearest: int8 (per output row, symmetric; "
                   "near-lossless) or int4 (groups of 64); a tied head is untied, the embedding stays float "
                   "(default float: the head is kept as it is; docs/cpu_backend.md gives speed and quality)")
    w8a8 = p.add_argument_group(
        "W8A8 (--method smoothquant)",
        "int8 weights per output channel and int8 activations; --bits/--group/--sym do not apply")
    w8a8.add_argument("--act-bits", type=int, choices=SUPPORTED_ACT_BITS, default=None, help="activation bits (8)")
    w8a8.add_argument("--act-scheme", choices=[s.value for s in ActScheme], default=None,
                      help="dynamic: a scale per token at run time (default); static: one calibrated scale per tensor")
    w8a8.add_argument("--observer", choices=[o.value for o in ObserverKind], default=None,
                      help="calibration method for static scales (default percentile, at 99.9999: the best on held-out "
                      "text with the static default alpha 0.9, docs/w8a8.md; dynamic uses the row absmax)")
    w8a8.add_argument("--alpha", type=_alpha, default=_NOT_GIVEN,
                      help="SmoothQuant migration strength in [0, 1], or 'none' for no smoothing (default 0.5 with "
                      "dynamic, 0.9 with static scales: chosen on held-out text, docs/w8a8.md)")
    w8a8.add_argument("--percentile", type=float, default=None,
                      help="percentile observer: %% of |x| kept (default 99.9999)")
    w8a8.add_argument("--momentum", type=float, default=None, help="EMA observer momentum (default 0.9)")
    w8a8.add_argument("--calib-samples", type=int, default=None,
                      help="calibration windows of 512 tokens from the BBC calibration split (default 128)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out model folder (a folder without config.json is never replaced)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder to run")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


def refuse_unread_options(args: argparse.Namespace) -> None:
    """Refuse options that ``args.method`` does not read, instead of silently ignoring them."""
    from llmq.pipeline import NEEDS_CALIBRATION

    method = WeightMethod(args.method)
    if method is WeightMethod.SMOOTHQUANT:
        unread = [(WEIGHT_OPTIONS, "W8A8 weights are int8, per output channel, symmetric"),
                  (CALIBRATION_OPTIONS, "it calibrates on --calib-samples windows of the BBC calibration split")]
    else:
        unread = [(W8A8_OPTIONS, "they configure --method smoothquant")]
        if method not in NEEDS_CALIBRATION:
            unread.append((CALIBRATION_OPTIONS, f"{method.value} uses no calibration data"))
    for options, why in unread:
        given = [flag for dest, flag in options.items() if getattr(args, dest) not in (None, [], _NOT_GIVEN)]
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise ValueError(f"{', '.join(given)} {verb} not apply to --method {method.value} ({why}); "
                             f"drop {'it' if len(given) == 1 else 'them'}")


def build_recipe(args: argparse.Namespace) -> WeightRecipe:
    levels = Levels(args.levels or Levels.UNIFORM)
    bits = args.bits
    if bits is None:
        bits = 1 if levels is Levels.BINARY else 4
    if levels is not Levels.UNIFORM and args.symmetric is False:
        raise ValueError(f"--levels {levels.value} is symmetric (a codebook times a scale, no zero point): drop --asym")
    if bits == 1 and levels is not Levels.BINARY:
        raise ValueError("--bits 1 is binary weights: add --levels binary")
    if levels is not Levels.UNIFORM and bits not in LEVEL_BITS[levels]:
        raise ValueError(f"--levels {levels.value} takes --bits {' or '.join(map(str, LEVEL_BITS[levels]))}, "
                         f"got --bits {bits}")
    return WeightRecipe(
        bits=bits,
        group_size=None if args.group == CHANNEL else (128 if args.group is None else args.group),
        symmetric=bool(args.symmetric) or levels is not Levels.UNIFORM,
        levels=levels,
        method=args.method,
        include=tuple(args.include) if args.include else ("*",),
        exclude=DEFAULT_EXCLUDE + tuple(args.exclude),
        method_args=parse_method_args(args.method_arg),
        zero_point=args.zero_point,
    )


def _alpha(value: str) -> float | str | None:
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1] or 'none', got {value!r}") from None


def build_activation_recipe(args: argparse.Namespace) -> ActivationRecipe:
    scheme = args.act_scheme or ActScheme.DYNAMIC.value
    observer = args.observer or ("percentile" if scheme == "static" else "minmax")
    defaults = ActivationRecipe()
    return ActivationRecipe(
        bits=args.act_bits or defaults.bits, scheme=scheme, observer=observer,
        momentum=defaults.momentum if args.momentum is None else args.momentum,
        percentile=defaults.percentile if args.percentile is None else args.percentile,
        smoothquant_alpha=SCHEME_DEFAULT if args.alpha is _NOT_GIVEN else args.alpha)


def run_w8a8(args: argparse.Namespace) -> int:
    from llmq.api import quantize
    from llmq.calibration import CalibrationSpec

    calib_samples = 128 if args.calib_samples is None else args.calib_samples
    if calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {calib_samples}")
    recipe = build_activation_recipe(args)
    result = quantize(args.model, recipe, args.out, force=args.force, progress=True,
                      trust_remote_code=args.trust_remote_code, calibration=CalibrationSpec(nsamples=calib_samples),
                      max_memory_mb=args.max_memory, device=args.device, exclude=tuple(args.exclude))
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "recipe": result.recipe.to_dict(),
                          "activation": recipe.to_dict(), **result.summary.to_dict()}))
    else:
        print(result.summary)
        print(f"saved to {result.out_dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    from llmq.api import quantize
    from llmq.calibration import CalibrationSpec

    refuse_unread_options(args)
    if args.method == WeightMethod.SMOOTHQUANT.value:
        return run_w8a8(args)
    recipe = build_recipe(args)
    spec = {k: getattr(args, k) for k in CALIBRATION_OPTIONS if getattr(args, k) is not None}
    calibration = CalibrationSpec(**{"source" if k == "calib" else k: v for k, v in spec.items()})
    # progress goes to stderr, so it stays on with --json (stdout is the one JSON object)
    result = quantize(args.model, recipe, args.out, force=args.force, progress=True,
                      trust_remote_code=args.trust_remote_code, calibration=calibration,
                      max_memory_mb=args.max_memory, device=args.device, lm_head=args.lm_head or "float")
    if args.json:  # the recipe as run: method_args resolved to the method's full arguments
        print(json.dumps({"out": str(result.out_dir), "recipe": result.recipe.to_dict(),
                          "lm_head": args.lm_head or "float", **result.summary.to_dict()}))
    else:
        print(result.summary)
        print(f"saved to {result.out_dir}")
    return 0
