"""The commands' options (argparse). One name per concept, the same in every command
(docs/CONTRIBUTING.md, "Vocabulary"); old spellings stay accepted as hidden aliases."""

from __future__ import annotations

import argparse
import logging
import math
import typing
from collections.abc import Collection, Sequence
from dataclasses import asdict, fields

from .lattice import SOUND_MODES
from .perf import AMP
from .sequential.radii import FUTILITY

AMP_HELP = f"autocast dtype: {', '.join(AMP)} or none (float32)"
TRAIN_HELP = {
    "objective": "training objective (see `smoothcert objectives`; `train --objective NAME "
                 "--help` lists its options)",
    "eps_warmup": "epochs over which eps grows linearly to its value",
    "batch": "GLOBAL batch in examples (split over torchrun processes; k noisy copies each)",
    "schedule": "step (lr * gamma every lr_step epochs), cosine (after warmup_epochs), constant",
    "train_subset": "train on the first N examples only (0: all)",
    "eval_subset": "examples of the test split evaluated after each epoch (0: none)",
    "out": "run directory: config.json, checkpoint.pt, log.jsonl",
    "amp": AMP_HELP,
    "model": "a registry name (`smoothcert models`), torchvision:NAME, timm:NAME, "
             "module:callable or file.py:callable",
    "dataset": "mnist, cifar10, imagenet, imagefolder (--data-dir) or npz (--data-file)",
}
# train's options that are not TrainConfig fields: they steer the command, not the run.
TRAIN_COMMAND_OPTIONS = {"resume"}
# Old spellings of train's options, kept for one release: {old flag: new flag}.
TRAIN_DEPRECATED_FLAGS = {"--method": "--objective"}

logger = logging.getLogger(__name__)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help names one already (train's,
    with a --preset's value) or there is none to show (None, False, a flag's absence: the
    True of a --no-X flag is not its own default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        is_flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if (not action.option_strings or "default" in text or default is None
                or default is False or is_flag or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _DeprecatedFlag(argparse.Action):
    """An option's old spelling: stores into the new option's field and logs a warning."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        new = TRAIN_DEPRECATED_FLAGS[option_string]
        logger.warning("smoothcert: %s is deprecated and will be removed in the next release; "
                       "use %s", option_string, new)
        setattr(namespace, self.dest, values)


def _value_in(argv: Sequence[str], flag: str, accepted: Collection[str]) -> str | None:
    """The valid value of `flag` named last in `argv`, if any."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value if value in accepted else None


def add_train_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """One option per TrainConfig field; each help shows the value the run would take, the
    field's default or the --preset's value (when `argv` names a preset). The options of
    objectives other than the one the run would train are accepted but not shown."""
    from .objectives import CommonConfig, objective_config_class, option_fields
    from .presets import PRESETS, TrainConfig, choices, resolve_config

    preset = _value_in(argv, "--preset", PRESETS)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    shown = asdict(resolve_config(preset)) if preset else defaults
    accepted = choices()
    objective = _value_in(argv, "--objective", accepted["objective"]) or shown["objective"]
    own = {f.name for f in fields(objective_config_class(objective))}
    common = {f.name for f in fields(CommonConfig)}
    options = {f.name for f in option_fields()}
    group = parser.add_argument_group(f"options of objective {objective}")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="the paper's recipes (see `smoothcert presets`)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (refused if it holds no checkpoint)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        value = "none" if shown[f.name] is None else shown[f.name]
        where = f", preset {preset}" if preset and shown[f.name] != defaults[f.name] else ""
        about = TRAIN_HELP.get(f.name) or f.metadata.get("help", "")
        text = f"{about} (default {value}{where})".lstrip()
        if f.name in own - common:
            _add_train_option(group, f.name, hints[f.name], accepted, text)
        else:
            other_objectives = f.name in options - common
            _add_train_option(parser, f.name, hints[f.name], accepted,
                              argparse.SUPPRESS if other_objectives else text)
    for old, new in TRAIN_DEPRECATED_FLAGS.items():
        parser.add_argument(old, dest=new[2:].replace("-", "_"), action=_DeprecatedFlag,
                            choices=accepted.get(new[2:]), default=None, help=argparse.SUPPRESS)


def _add_train_option(parser, name: str, kind, accepted: dict, text: str) -> None:
    """--name (with underscores as dashes) for TrainConfig field `name` of type `kind`."""
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif name == "amp":
        parser.add_argument(flag, type=_amp, metavar="{none,bf16,fp16}", default=None, help=text)
    elif name in accepted:
        parser.add_argument(flag, choices=accepted[name], default=None, help=text)
    else:
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        parser.add_argument(flag, type=scalar, default=None, help=text)


def _add_aliased(parser: argparse.ArgumentParser, flag: str, *aliases: str, help: str,
                 **options) -> None:
    """`flag`, the one name of its concept (docs/CONTRIBUTING.md, "Vocabulary"), shown with its
    old spellings noted; each alias is accepted for scripts written before, hidden from --help."""
    dest = options.pop("dest", flag[2:].replace("-", "_"))
    if "choices" not in options:
        options.setdefault("metavar", flag[2:].upper().replace("-", "_"))
    note = ", ".join(aliases)
    parser.add_argument(flag, dest=dest, help=f"{help} (alias: {note})", **options)
    hidden = {**options, "default": argparse.SUPPRESS}
    for alias in aliases:
        parser.add_argument(alias, dest=dest, help=argparse.SUPPRESS, **hidden)


MAX_PROCS = 1024


def _process_count(text: str) -> int | str:
    """--procs: 'auto' or a number of processes in [1, MAX_PROCS]."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PROCS:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a number of processes from 1 to {MAX_PROCS}, got {text!r}")
    return value


def _amp(text: str) -> str | None:
    """--amp: an autocast dtype, or none (float32)."""
    if text == "none":
        return None
    if text not in AMP:
        accepted = ", ".join(map(repr, ("none", *AMP)))
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {accepted})")
    return text


def _example_count(text: str) -> int:
    """--max-examples: a count of examples, or -1 for no limit (Cohen's spelling)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count of examples, got {text!r}") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be a count >= 0 (or -1: no limit), got {value}")
    return value


def _dataset_name(name: str) -> str:
    """--dataset of certify/predict, checked as argparse checks choices; smoothcert.data (which
    imports torch) is read only when the option is given, so `certify --help` never imports it."""
    from .data import DATASETS, USER_DATASETS

    if name not in DATASETS and name not in USER_DATASETS:
        accepted = ", ".join(map(repr, (*DATASETS, *USER_DATASETS)))
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {accepted})")
    return name


def _sample_count(text: str) -> int:
    """--n0, --N, --max-n: a number of samples, refused above stats.MAX_SAMPLES (the counts the
    statistics are validated for) while parsing, before torch or the model is loaded."""
    from .stats import MAX_SAMPLES, check_sample_count

    try:
        return check_sample_count(int(text), "samples")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [1, {MAX_SAMPLES}], got {text!r}") from None


def _grid_size(text: str) -> int:
    """--grid, checked while parsing, before torch is imported."""
    from .stats import MAX_GRID, check_grid_size

    try:
        return check_grid_size(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [1, {MAX_GRID}], got {text!r}") from None


def _noise_level(text: str) -> float:
    """--sigma of certify/predict: a positive finite number, checked before torch is imported."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def run_argument_problem(args: argparse.Namespace) -> str | None:
    """What certify/predict's arguments alone show to be wrong, before torch or the model is
    loaded: the published checkpoint formats record no noise level; a missing checkpoint."""
    if getattr(args, "format", None) in {"cohen", "macer"} and args.sigma is None:
        return (f"sigma: a {args.format} checkpoint does not record the noise level its model "
                "was trained with; give --sigma, e.g. 0.25, 0.5 or 1.0 for Cohen et al.'s "
                "released models")
    from .io import CheckpointError, require_checkpoint_file

    try:
        require_checkpoint_file(args.checkpoint)
    except CheckpointError as err:
        return str(err)
    return None


def add_run_options(parser: argparse.ArgumentParser, certify: bool) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pt of `smoothcert train`, a Cohen "
                        "et al./SmoothAdv/Consistency/SmoothMix or MACER checkpoint, a "
                        "state_dict (plain or under a common key), or a TorchScript archive")
    _add_aliased(parser, "--checkpoint-format", "--format", dest="format", default="auto",
                 choices=["auto", "smoothcert", "cohen", "macer", "state_dict", "torchscript"],
                 help="the checkpoint's format (default: from its content)")
    _add_model_options(parser)
    parser.add_argument("--out", required=True, help="result TSV (re-running resumes it)")
    parser.add_argument("--split", default="test", help="the dataset's split")
    # --N / --max-examples: torchrun swallows --n and --max as abbreviations of its own
    # options (pytorch/pytorch#120601), so every option needs a spelling it passes through.
    _add_aliased(parser, "--N", "--n", dest="n", type=_sample_count, default=100_000,
                 help="estimation samples")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument("--batch", type=int, default=1000, help="noisy samples per forward")
    parser.add_argument("--skip", type=int, default=1, help="certify every skip-th example")
    _add_aliased(parser, "--max-examples", "--max", dest="max", type=_example_count,
                 default=None, help="at most this many examples (a COUNT; Cohen's --max is an "
                 "index)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    parser.add_argument("--sigma", type=_noise_level, help="noise level: required for Cohen/MACER "
                        "checkpoints, overrides a smoothcert checkpoint's")
    parser.add_argument("--dataset", type=_dataset_name, metavar="NAME",
                        help="the data: mnist, cifar10, imagenet, imagefolder (--data-dir) or "
                        "npz (--data-file); default: the checkpoint's")
    _add_data_options(parser)
    parser.add_argument("--device", default="auto", help="auto (a GPU if any), cpu, cuda, "
                        "cuda:N or mps")
    parser.add_argument("--amp", type=_amp, metavar="{none,bf16,fp16}", help=AMP_HELP)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="run the model in channels_last memory format (default on)")
    parser.add_argument("--sound", nargs="?", const="exact", choices=SOUND_MODES,
                        help="sound sampling on the 8-bit lattice (Voracek & Hein): certificates "
                        "no float rounding can break; --sound (exact) refuses inputs off the "
                        "lattice a/255, --sound round rounds them onto it")
    compilers = parser.add_mutually_exclusive_group()
    compilers.add_argument("--compile", action="store_true",
                           help="torch.compile the model (inductor, frozen weights, static "
                           "shapes; compiles once, seconds to minutes); eager with a warning "
                           "where that fails. Recorded in the sidecar: a result file is "
                           "compiled or eager")
    compilers.add_argument("--openvino", dest="compile", action="store_const", const="openvino",
                           help="run the model by OpenVINO instead (CPU; pip install "
                           "'smoothcert[openvino]'): exported and compiled once, static shapes, "
                           "at --amp's precision; the fastest CPU path measured "
                           "(docs/benchmarks.md). Recorded in the sidecar like --compile")
    parser.add_argument("--procs", type=_process_count, metavar="{auto,N}",
                        help="N single-thread processes (auto: one per physical core) through "
                        "torchrun with gloo: the fastest use of a multi-core CPU "
                        "(docs/benchmarks.md); default: one process, one thread per core")
    parser.add_argument("--denoiser", metavar="SPEC", help="denoised smoothing: a denoiser in "
                        "front of the classifier, a denoiser checkpoint of `smoothcert train` "
                        "or diffusers:FOLDER (a local UNet2DModel + DDPMScheduler)")
    parser.add_argument("--restart-stale", dest="restart_if_stale", action="store_true",
                        help="discard rows in --out that another run wrote (other settings or "
                        "checkpoint content) and recompute them, instead of refusing")
    if certify:
        parser.add_argument("--n0", type=_sample_count, default=100, help="selection samples")
        _add_aliased(parser, "--layout", "--method", dest="method",
                     choices=["certify", "tcertify", "both"],
                     help="the methods in the result's columns, the main one first: both "
                     "(default: CERTIFY, T-CERTIFY, strict T-CERTIFY), tcertify, certify; with "
                     "--radii certify (default) or tcertify")
        parser.add_argument("--grid", type=_grid_size, default=10,
                            help="T-CERTIFY alpha' grid size")
        _add_sequential_options(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model a checkpoint's weights belong to and the input it expects (certify/predict)."""
    _add_aliased(parser, "--model", "--arch", dest="arch", metavar="SPEC",
                 help="the architecture of a state_dict: a registry name (`smoothcert "
                 "models`), torchvision:NAME, timm:NAME, module:callable or file.py:callable; "
                 "a MACER checkpoint's: resnet110 or lenet")
    parser.add_argument("--model-kwargs", metavar="JSON",
                        help="keyword arguments of --model's builder, a JSON object")
    parser.add_argument("--state-dict-key", metavar="KEY",
                        help="the key holding the state_dict (default: the file itself or "
                        "state_dict, model, net, model_state_dict)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="accept a whole pickled model: loading it RUNS THE CODE stored in "
                        "the file; only for files from a source you trust")
    parser.add_argument("--mean", type=_channel_values, metavar="M1,M2,...",
                        help="per-channel mean a user's model expects its input standardised "
                        "with (with --std)")
    parser.add_argument("--std", type=_channel_values, metavar="S1,S2,...",
                        help="per-channel std of the standardisation (with --mean)")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="a user's model reads [0, 1] pixels: no standardisation")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="dataset folder (or set SMOOTHCERT_DATA); "
                        "imagefolder: the folder holding train/ and val/ or test/")
    parser.add_argument("--data-file", metavar="FILE.npz", help="--dataset npz: arrays "
                        "x_train, y_train, x_test, y_test")
    parser.add_argument("--image-size", type=_positive_int, metavar="PIXELS",
                        help="imagefolder/npz: resize (and centre-crop) images to this size")


def _channel_values(text: str) -> tuple[float, ...]:
    """--mean/--std: one number per channel, comma-separated."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number per channel like "
                                         f"0.485,0.456,0.406, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _futility(text: str) -> float | str:
    """--futility: a level in (0, 1), or none (no futility rule)."""
    if text == "none":
        return text
    try:
        level = float(text)
    except ValueError:
        level = math.nan
    if not 0.0 < level < 1.0:
        raise argparse.ArgumentTypeError(f"expected a level in (0, 1) or none, got {text!r}")
    return level


def _radii(text: str) -> tuple[float, ...]:
    """--radii: comma-separated radii."""
    try:
        return tuple(float(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected radii like 0.25,0.5,1.0, got {text!r}"
                                         ) from None


def _add_sequential_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--radii", type=_radii, help="certify at these radii only, sampling "
                        "sequentially until each is decided (default with --max-n: the "
                        "Table-1 radii max-n can reach)")
    parser.add_argument("--max-n", type=_sample_count, help="at most this many estimation "
                        "samples per input, with --radii or --adaptive-n (default: --N)")
    parser.add_argument("--confidence-sequence", choices=["mixture", "bonferroni"],
                        help="anytime-valid bound of sequential certification (default mixture)")
    parser.add_argument("--final-share", type=float, metavar="SHARE",
                        help="sequential: the share of --alpha, in [0, 1), kept for a final "
                        "Clopper-Pearson look at --max-n (default "
                        "0.5; 0: none)")
    parser.add_argument("--precision", type=float, metavar="RADIUS",
                        help="sequential: stop an input once its undecided radii lie within "
                        "this of its largest certified radius (default: decide every radius)")
    parser.add_argument("--futility", type=_futility, metavar="LEVEL",
                        help="sequential: give up a radius once the remaining samples could "
                        "not certify it even at this level's upper bound on pA (default "
                        f"{FUTILITY:g}; none: only once no remaining samples could)")
    parser.add_argument("--adaptive-n", action="store_true", help="choose each input's n from "
                        "its selection samples, radius loss against --max-n <= --tolerance")
    parser.add_argument("--tolerance", type=float, help="--adaptive-n: radius loss (0.02)")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's settings (read by demo.run_demo)."""
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise level (default 1.0)")
    parser.add_argument("--lam", type=float, default=0.2, help="ADREREG lambda (default 0.2)")
    parser.add_argument("--k", type=int, default=8,
                        help="ADREREG's noise draws per training example (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    parser.add_argument("--train-subset", type=int, default=0,
                        help="train on the first N MNIST images (default 0: all 60,000)")
    _add_aliased(parser, "--max-examples", "--certify", type=int, default=250,
                 dest="num_certify", help="number of test images certified (default 250)")
    parser.add_argument("--skip", type=int, default=40,
                        help="certify every skip-th test image (default 40)")
    parser.add_argument("--n0", type=_sample_count, default=100,
                        help="selection samples (default 100)")
    _add_aliased(parser, "--N", "--n", dest="n", type=_sample_count, default=5_000,
                 help="estimation samples (default 5,000)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument("--batch", type=int, default=1_000, help="certification batch")
    parser.add_argument("--amp", type=_amp, metavar="{none,bf16,fp16}", default="bf16",
                        help=f"{AMP_HELP}, for training and certification (default bf16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and noise draws")


def _methods(text: str) -> tuple[str, ...]:
    """--methods: comma-separated certification methods."""
    return tuple(m.strip() for m in text.split(","))


class _Labels(argparse.Action):
    """--label FILE=NAME, repeatable: {file: row name}."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        file, sep, name = values.partition("=")
        if not (sep and file and name):
            raise argparse.ArgumentError(self, f"expected FILE=NAME, got {values!r}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), file: name})


def add_analyze_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--radii", type=_radii, help="the table's radii, comma-separated "
                        "(default: the Table-1 radii 0, 0.25, ..., 3 that some file can reach)")
    parser.add_argument("--methods", type=_methods, metavar="M,...", help="the rows' methods: "
                        "certify, tcertify, strict (default: each file's all)")
    parser.add_argument("--label", action=_Labels, metavar="FILE=NAME",
                        help="name FILE's rows NAME (repeatable; default: the file's label)")
    parser.add_argument("--plot", help="write a PNG of certified accuracy against radius")
    parser.add_argument("--vary-sigma", metavar="PNG", help="write a PNG of one curve per file "
                        "(its main method, or its first of --methods), labelled by its sigma")
