"""`lorakit combine a=DIR:0.7 b=DIR:0.3 --method cat -o OUT`: one adapter from weighted adapters, from files alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorakit.commands.specs import WEIGHTED, parse_adapter_specs
from lorakit.errors import LorakitError

DESCRIPTION = """\
Combine peft-format adapters into a new one with peft's add_weighted_adapter semantics, working on the
adapter files alone (no base model needed). Each input is NAME=DIR:WEIGHT; weights may be negative.

methods (the combined adapter gets lora_alpha = r, so its scaling is 1):
  cat      exact: sum_i w_i s_i B_i A_i, by stacking the factors; r = sum of the inputs' ranks
  linear   peft's linear mixes the factors, A = sum sqrt(w_i s_i) A_i and B = sum sqrt(w_i s_i) B_i,
           so B A also holds the cross terms B_i A_j (i != j): only an approximation of the weighted
           sum. Use cat to get exactly sum_i w_i (s_i B_i A_i). Needs equal ranks; r stays
  svd      the exact weighted sum, truncated to --svd-rank (default: the largest input rank)
  ties, dare_linear, dare_ties, magnitude_prune
           prune (by magnitude, or at random with DARE) and merge A and B separately, like linear
           (equal ranks, cross terms); need --density
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
           the same merges on the full deltas, then svd; need --density

s_i is each input's lora_alpha / r. DARE's random drops come from --seed and follow the file's module
order, so they are not the draws peft makes on a model (the Python API add_weighted_adapter is).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lorakit.lora.arithmetic import COMBINATION_TYPES, SIGN_METHODS

    parser = sub.add_parser("combine", help="combine weighted adapters into one (cat, linear, svd, ties, dare_*, magnitude_prune)",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", metavar="NAME=DIR:WEIGHT", help="an input adapter directory and its weight, e.g. a=out/math:0.7")
    parser.add_argument("--method", default="cat", choices=COMBINATION_TYPES, metavar="METHOD",
                        help="combination type, peft's name (default: cat, the exact weighted sum); one of " + ", ".join(COMBINATION_TYPES))
    parser.add_argument("--output", "-o", required=True, help="adapter directory to write (atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it already holds files")
    parser.add_argument("--svd-rank", type=int, default=None, help="rank of the result for the svd methods (default: the largest input rank)")
    parser.add_argument("--svd-clamp", type=float, default=None, help="clamp the svd factors at this quantile of their values (default: no clamping)")
    parser.add_argument("--density", type=float, default=None, help="fraction of values kept, in (0, 1], for ties, dare_* and magnitude_prune")
    parser.add_argument("--majority-sign-method", default="total", choices=SIGN_METHODS, help="how ties / dare_ties elect each value's sign (default: total)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default 0)")
    parser.set_defaults(run=run)


def read_factors(name: str, directory: Path):
    """An adapter directory as AdapterFactors, keyed by module path (peft's key prefix and suffix removed)."""
    from lorakit.lora.arithmetic import AdapterFactors
    from lorakit.lora.peft_format import WEIGHTS_NAME, read_adapter_config, read_adapter_weights, split_factors

    if not directory.is_dir():
        raise LorakitError(f"adapter {name}: {directory} is not a directory; give the directory save_pretrained wrote")
    config = read_adapter_config(directory)
    factors, others = split_factors(read_adapter_weights(directory), directory / WEIGHTS_NAME)
    if others:
        raise LorakitError(f"adapter {name} holds {others[0]}, which is not a LoRA factor (a trained bias or a modules_to_save copy); "
                           "such weights cannot be weighted without the base model: load the adapters and use add_weighted_adapter")
    if not factors:
        raise LorakitError(f"adapter {name} in {directory} holds no LoRA factors; re-save the adapter")
    return AdapterFactors(config, factors, name=name)


def _check_inputs(sources: list) -> None:
    excludes = {json.dumps(s.config.exclude_modules) for s in sources}
    if len(excludes) > 1:
        raise LorakitError("the adapters have different exclude_modules, which one combined config cannot express; combine them on the base model with add_weighted_adapter")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise LorakitError(f"--output {output} is a file; give a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LorakitError(f"--output {output} already holds files; choose a new directory or pass --overwrite")


def write_adapter(combined, output: Path) -> None:
    """The combined adapter as peft's two files; --overwrite replaces whatever the directory held."""
    from lorakit.lora.peft_format import factors_state_dict, write_adapter_files

    write_adapter_files(output, combined.config, factors_state_dict(combined.factors), keep_other_files=False)


def run(args: argparse.Namespace) -> int:
    from lorakit.lora.arithmetic import combine

    specs = parse_adapter_specs(args.adapters, WEIGHTED, label="adapter")
    output = Path(args.output)
    _check_output(output, args.overwrite)
    sources = [read_factors(name, Path(directory)) for name, directory, _ in specs]
    _check_inputs(sources)
    weights = [weight for _, _, weight in specs]
    combined = combine(sources, weights, args.method, svd_rank=args.svd_rank, svd_clamp=args.svd_clamp,
                       density=args.density, majority_sign_method=args.majority_sign_method,
                       generator=torch.Generator().manual_seed(args.seed))
    write_adapter(combined, output)
    inputs = ", ".join(f"{name}:{weight:g}" for name, _, weight in specs)
    method = "linear (one input)" if len(sources) == 1 else args.method
    print(f"combined {inputs} with {method}: r={combined.config.r}, lora_alpha={combined.config.lora_alpha}, "
          f"{len(combined.factors)} layers -> {output}")
    if method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        print("note: this method mixes A and B factor-wise, so the result holds cross terms B_i A_j; --method cat is the exact weighted sum")
    return 0
