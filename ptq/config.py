"""Configuration as validated dataclasses, loaded from `recipes/*.yaml` and overridden with `--set key=value`.

Every config checks itself on construction; unknown keys and bad values are rejected with the allowed set named.
A resolved recipe is saved next to every output (`recipe.yaml`), tagged with its type and format version.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from ptq.errors import PtqError

RECIPE_DIR = Path(__file__).parent / "recipes"
RECIPE_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
HIGH_BITS = 8  # first/last layers under the brecq and qdrop conventions
DEFAULT_RECIPE = "fast"  # what `ptq quantize` and `ptq.quantize` use without a recipe


class ConfigError(PtqError, ValueError):
    """A recipe, override or option is invalid; the message says what is allowed."""


class BitConvention(str, Enum):
    """Which layers keep 8 bits at low precision (README: What "W4A4" means here)."""

    ALL = "all"  # every conv/linear at the low width (the image is quantized only for export, at 8 bits)
    BRECQ = "brecq"  # first conv W8 and its output A8; last linear W8
    QDROP = "qdrop"  # first conv W8; last linear W8 with an A8 input


class ObserverKind(str, Enum):
    """How a quantizer's range is chosen (`ptq.quant.observers`)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    LP = "lp"


class WeightGranularity(str, Enum):
    CHANNEL = "channel"
    TENSOR = "tensor"


class CachePlacement(str, Enum):
    """Where reconstruction keeps a unit's cached inputs and targets (`recon.cache`)."""

    AUTO = "auto"  # on the device when the largest unit fits in half of its free memory, else in host memory
    CPU = "cpu"
    DEVICE = "device"


class Method(str, Enum):
    """How weights are rounded after calibration."""

    RTN = "rtn"  # round to nearest
    ADAROUND = "adaround"  # learned rounding, layer by layer
    BRECQ = "brecq"  # learned rounding, block by block
    QDROP = "qdrop"  # learned rounding, block by block, with activation-quantization dropping
    GPTQ = "gptq"  # second-order rounding, layer by layer (GPTQ / OBQ)

    @property
    def reconstructs(self) -> bool:
        return self in (Method.ADAROUND, Method.BRECQ, Method.QDROP)


class BiasCorrection(str, Enum):
    """How each layer's bias takes back the mean output shift its weight rounding causes (DFQ arXiv 1906.04721)."""

    OFF = "off"
    EMPIRICAL = "empirical"  # (W − Ŵ)·E[x], E[x] over the calibration inputs the quantized network gives the layer
    ANALYTIC = "analytic"  # E[x] from the BatchNorm statistics of the layer that makes x (no data needed)
    # analytic on a synthetic calibration set with activations at 8 bits or more (or not quantized), else empirical:
    # the synthetic images' means are what is off there, while at fewer activation bits only the empirical form sees
    # the shift the activation quantizers add (`resolve_bias_correction`)
    AUTO = "auto"


class SynthMethod(str, Enum):
    """Zero-shot data synthesis methods."""

    BNS = "bns"  # BN-statistic matching (ZeroQ / GDFQ)
    INTRAQ = "intraq"  # BNS + soft inception loss + marginal distance constraint + local object reinforcement
    FDDA = "fdda"  # per-class BN statistics from a few real images; centralized + distorted losses
    GENIE = "genie"  # generator + latents, BNS on mean/std, swing convolution


def check_bits(bits: int, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def bit_values(
    bits: int | str | None = None,
    w_bits: int | str | None = None,
    a_bits: int | None = None,
    names: tuple[str, str, str] = ("bits", "w_bits", "a_bits"),
) -> dict[str, Any]:
    """Recipe values for the bit options (`names`: how the caller spells them in messages): `bits` N sets weights
    and activations; `auto` (as `bits` or `w_bits`) chooses the weight width per layer under a budget
    (`mixed.enabled`) and leaves activations at the recipe's; `w_bits`/`a_bits` win over `bits`. Numbers may come
    as strings (a command line's)."""
    values: dict[str, Any] = {}
    if a_bits is not None:
        check_bits(a_bits, names[2])
        values["quant.a_bits"] = a_bits
    for name, value in ((names[0], bits), (names[1], w_bits)):
        if value is None:
            continue
        if isinstance(value, str) and value.lower() == "auto":
            values |= {"mixed.enabled": True, "quant.w_bits": HIGH_BITS}  # each layer's width comes from the budget
            continue
        try:
            number = int(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if not isinstance(number, int) or isinstance(number, bool):
            raise ConfigError(f"{name} takes a bit width from {MIN_BITS} to {MAX_BITS} or auto, got {value!r}")
        check_bits(number, name)
        values["quant.w_bits"] = number
        if name == names[0] and a_bits is None:
            values["quant.a_bits"] = number
        if name == names[1]:
            values.pop("mixed.enabled", None)
    return values


def check_job_recipe(recipe: Recipe) -> None:
    """Checks that span sections, made once for every caller (command line or Python)."""
    if recipe.mixed.enabled and not recipe.mixed.has_budget:
        raise ConfigError(
            "automatic weight bits (--bits auto) needs a budget: a size (--size-budget 2.5MB; mixed_size_budget=) "
            "or average bits (--avg-bits 3.5; mixed_avg_bits=)"
        )


def resolve_bias_correction(recipe: Recipe, synthetic: bool) -> Recipe:
    """`recipe` with `quant.bias_correction=auto` made concrete for calibration images that are `synthetic` or not
    (see `BiasCorrection.AUTO`); any other recipe is returned as it is."""
    q = recipe.quant
    if q.bias_correction is not BiasCorrection.AUTO:
        return recipe
    high = not q.quantize_activations or q.a_bits >= 8
    choice = BiasCorrection.ANALYTIC if synthetic and high else BiasCorrection.EMPIRICAL
    return dataclasses.replace(recipe, quant=dataclasses.replace(q, bias_correction=choice))


def coerce_enums(obj) -> None:
    """Let Python callers pass enum values as plain strings; reject unknown ones naming the allowed set."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        if isinstance(tp, types.UnionType) and value is not None:  # an optional enum: `Kind | None`
            tp = next((t for t in typing.get_args(tp) if isinstance(t, type) and issubclass(t, Enum)), None)
        if isinstance(tp, type) and issubclass(tp, Enum) and not isinstance(value, tp):
            setattr(obj, name, coerce_value(tp, value, name))


@dataclass
class QuantConfig:
    w_bits: int = 8
    a_bits: int = 8
    w_granularity: WeightGranularity = WeightGranularity.CHANNEL
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_observer: ObserverKind = ObserverKind.LP
    a_observer: ObserverKind = ObserverKind.LP
    lp_p: float = 2.4
    lp_candidates: int = 100
    percentile: float = 99.99
    first_last_bits: BitConvention = BitConvention.QDROP
    quantize_weights: bool = True
    quantize_activations: bool = True
    fold_bn: bool = True
    equalize: bool = False  # cross-layer equalization of conv → ReLU/ReLU6 → conv pairs after folding
    bias_correction: BiasCorrection = BiasCorrection.OFF
    # quantize every conv/linear output (not only after activations and residual adds), as int8 runtimes compute:
    # and the image at 8 bits: an ONNX export then runs every conv in integer kernels (`--export onnx` turns it on)
    quantize_layer_outputs: bool = False

    def __post_init__(self):
        coerce_enums(self)
        check_bits(self.w_bits, "quant.w_bits")
        check_bits(self.a_bits, "quant.a_bits")
        if self.lp_p <= 0:
            raise ConfigError(f"quant.lp_p must be > 0, got {self.lp_p}")
        if self.lp_candidates < 1:
            raise ConfigError(f"quant.lp_candidates must be ≥ 1, got {self.lp_candidates}")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"quant.percentile must be in (50, 100], got {self.percentile}")


@dataclass
class CalibConfig:
    num_images: int = 256
    batch_size: int = 32
    seed: int = 0
    workers: int = 0

    def __post_init__(self):
        for name in ("num_images", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"calib.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"calib.workers must be ≥ 0, got {self.workers}")


# Published defaults per method, as differences from plain BN-statistic matching; a recipe or --set value
# overrides any of them (None in SynthConfig means "take the preset").
_PLAIN_BNS: dict[str, Any] = dict(
    w_bns=1.0, w_input=0.0, w_sil=0.0, w_mdc=0.0, w_ce=0.0, lor_prob=0.0, use_std=False, per_sample_stats=False,
    swing=False,
)  # fmt: skip
SYNTH_PRESETS: dict[SynthMethod, dict[str, Any]] = {
    SynthMethod.BNS: _PLAIN_BNS | dict(iters=500),
    SynthMethod.INTRAQ: _PLAIN_BNS | dict(iters=1000, w_sil=1.0, w_mdc=1.0, lor_prob=0.5),
    SynthMethod.FDDA: _PLAIN_BNS | dict(iters=500, w_bns=0.2, w_ce=0.5),
    SynthMethod.GENIE: _PLAIN_BNS | dict(iters=4000, use_std=True, swing=True),
}


@dataclass
class SynthConfig:
    method: SynthMethod = SynthMethod.INTRAQ
    num_images: int = 256
    batch_size: int = 32
    iters: int | None = None
    lr: float = 0.5  # Adam on pixels
    min_lr: float = 1e-4
    plateau_patience: int = 100  # iterations without improvement before the LR drops ×0.1
    plateau_window: int = 20  # the loss is read back from the device once per window, not every iteration
    divergence: float = 4.0  # a window's mean loss above this × the best window's: restore the best state, LR ×0.1
    seed: int = 0
    classes: list | None = None  # restrict labels to these class indices
    per_sample_stats: bool | None = None
    use_std: bool | None = None
    w_bns: float | None = None
    w_input: float | None = None
    w_sil: float | None = None
    w_mdc: float | None = None
    w_ce: float | None = None
    w_fdda_central: float = 0.01
    w_fdda_distorted: float = 0.9
    lor_prob: float | None = None  # probability of the batched random-resized-crop + flip per iteration
    crop_min_scale: float = 0.5
    sil_epsilon: float = 0.6
    mdc_lower: float = 0.02
    mdc_upper: float = 1.0
    fdda_mean_std: float = 0.5
    fdda_var_std: float = 1.0
    latent_dim: int = 256
    latent_lr: float = 0.1
    generator_lr: float = 0.01
    swing: bool | None = None

    def __post_init__(self):
        coerce_enums(self)
        for key, value in SYNTH_PRESETS[self.method].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for name in ("num_images", "batch_size", "iters", "plateau_patience", "plateau_window", "latent_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"synth.{name} must be an integer ≥ 1, got {value!r}")
        for name in ("lr", "min_lr", "latent_lr", "generator_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"synth.{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.divergence, bool) or not (self.divergence == 0 or self.divergence > 1):
            raise ConfigError(f"synth.divergence must be 0 (off) or > 1, got {self.divergence!r}")
        for name in (
            "w_bns",
            "w_input",
            "w_sil",
            "w_mdc",
            "w_ce",
            "w_fdda_central",
            "w_fdda_distorted",
            "fdda_mean_std",
            "fdda_var_std",
        ):
            if isinstance(getattr(self, name), bool) or not getattr(self, name) >= 0:
                raise ConfigError(f"synth.{name} must be a number ≥ 0, got {getattr(self, name)!r}")
        for name in ("lor_prob", "crop_min_scale", "sil_epsilon"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"synth.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.classes is not None and (
            not isinstance(self.classes, list) or not self.classes or not all(isinstance(c, int) for c in self.classes)
        ):
            raise ConfigError(f"synth.classes must be a non-empty list of class indices, got {self.classes!r}")


@dataclass
class GptqConfig:
    """Second-order rounding (`--method gptq`, and reconstruction's start with `recon.init=gptq`): dampening δ of
    H += δ·mean(diag H)·I, columns per lazy update block, and whether columns go in order of decreasing H_ii."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self):
        if isinstance(self.damp, bool) or not self.damp > 0:
            raise ConfigError(f"gptq.damp must be > 0, got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"gptq.block_size must be an integer ≥ 1, got {self.block_size!r}")


class RoundingInit(str, Enum):
    """Where reconstruction's learned rounding starts."""

    NEAREST = "nearest"  # AdaRound's start: the soft weight is W, hard rounding is to nearest
    GPTQ = "gptq"  # GPTQ's rounding and its error-compensated weights (a warm start)


class ActSteps(str, Enum):
    """How activation step sizes are treated during reconstruction."""

    FIXED = "fixed"  # kept from calibration (AdaRound)
    JOINT = "joint"  # learned with the rounding (QDrop: LSQ, Adam lr 4e-5, cosine)
    SECOND_PASS = "second_pass"  # learned after the rounding of the unit is fixed (BRECQ: lr 4e-4, p = 2.4 loss)


# Published reconstruction defaults per method, beside the synthesis presets; a None in ReconConfig takes them.
RECON_PRESETS: dict[Method, dict[str, Any]] = {
    Method.ADAROUND: dict(keep_prob=1.0, act_steps=ActSteps.FIXED),  # layer by layer, activation steps kept
    Method.BRECQ: dict(keep_prob=1.0, act_steps=ActSteps.SECOND_PASS),
    Method.QDROP: dict(keep_prob=0.5, act_steps=ActSteps.JOINT),
}
RECON_REG_WEIGHT = {False: 0.01, True: 0.1}  # λ by "the network has depthwise convs" (published for MobileNetV2)
RECON_ACT_LR = {ActSteps.FIXED: 4e-5, ActSteps.JOINT: 4e-5, ActSteps.SECOND_PASS: 4e-4}


class CacheDtype(str, Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass
class ReconConfig:
    """Reconstruction settings (published defaults: 20k iterations per unit, batch 32, Adam lr 1e-3, λ 0.01).

    Values left None take the method's published default: `reg_weight` 0.1 for MobileNetV2-like networks (any
    depthwise convolution), else 0.01; `keep_prob` 0.5 for qdrop, else 1; `act_steps` joint
    for qdrop, second_pass for brecq, fixed for adaround; `act_lr` 4e-5 (joint) or 4e-4 (second pass);
    `act_iters` (second pass) a quarter of `iters` (5,000 for 20,000). With `budget_gmacs`, a model whose
    reconstruction would cost more (3 × MACs per image × batch × iterations) is left as the layer-wise pass made it:
    the default recipe reconstructs small-input networks, where it is cheap, and not 224² ones."""

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3  # Adam on the rounding variables
    reg_weight: float | None = None  # λ of the rounding regulariser; None: 0.1 for nets with depthwise convs, else 0.01
    keep_prob: float | None = None  # QDrop's probability of keeping the quantized value
    act_steps: ActSteps | None = None
    act_lr: float | None = None
    act_iters: int | None = None
    learn_weight_scale: bool = False  # Genie-M: learn the weight scale jointly with the rounding
    weight_scale_lr: float = 1e-4
    fisher: bool = False  # weight the loss by the squared gradient of the task loss (FP model's own labels)
    cache: CachePlacement = CachePlacement.AUTO  # where unit inputs/targets are kept
    cache_dtype: CacheDtype = CacheDtype.FLOAT32
    init: RoundingInit = RoundingInit.NEAREST
    act_search: bool = False  # activation steps start from a search on each unit's output error
    # the most reconstruction work the recipe allows, in GMAC: 3 × (MACs per image) × batch_size × iters (forward and
    # backward); a model whose estimate exceeds it keeps the layer-wise rounding without reconstruction
    budget_gmacs: float | None = None
    seed: int = 0

    def __post_init__(self):
        coerce_enums(self)
        for name in ("iters", "batch_size", "act_iters"):
            value = getattr(self, name)
            if value is None and name == "act_iters":
                continue
            least = 0 if name == "iters" else 1  # 0 iterations: the start (e.g. GPTQ's rounding) as it is
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"recon.{name} must be an integer ≥ {least}, got {value!r}")
        for name in ("lr", "act_lr", "weight_scale_lr", "budget_gmacs"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not (number and value > 0):
                raise ConfigError(f"recon.{name} must be a number > 0, got {value!r}")
        if self.reg_weight is not None and not self.reg_weight >= 0:
            raise ConfigError(f"recon.reg_weight must be ≥ 0, got {self.reg_weight}")
        if self.keep_prob is not None and not 0 <= self.keep_prob <= 1:
            raise ConfigError(f"recon.keep_prob must be in [0, 1], got {self.keep_prob!r}")


class LayerKind(str, Enum):
    """Layer types that hardware limits on bit widths refer to (`mixed.kind_bits`)."""

    CONV = "conv"  # dense k×k convolution, k > 1
    POINTWISE = "pointwise"  # dense 1×1 convolution
    DEPTHWISE = "depthwise"  # one filter per input channel
    GROUPED = "grouped"  # other grouped convolutions
    LINEAR = "linear"


class TraceEstimator(str, Enum):
    """How the per-layer Hessian trace is estimated (`ptq.mixed.sensitivity`)."""

    HUTCHINSON = "hutchinson"  # Rademacher probes, Hessian-vector products by double backprop
    FISHER = "fisher"  # squared gradients with labels drawn from the FP prediction (equal in expectation at FP)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _parse_amount(value: Any, units: dict[str, int], key: str, example: str) -> int | None:
    if value is None:
        return None
    match = None if isinstance(value, bool) else re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    lookup = {u.upper(): factor for u, factor in units.items()}
    unit = match.group(2).upper() if match else ""
    try:
        number = float(match.group(1)) if match and unit in lookup else 0.0
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        allowed = ", ".join(u for u in units if u)
        raise ConfigError(f"{key} must be a positive amount such as {example} (units: {allowed}), got {value!r}")
    return int(number * lookup[unit])


def parse_size(value: Any, key: str = "size budget") -> int | None:
    """'2.5MB', '900KiB', '1.2e6' or a number → bytes (decimal MB = 10^6 bytes, MiB = 2^20)."""
    return _parse_amount(value, _SIZE_UNITS, key, "2.5MB")


def parse_count(value: Any, key: str = "BOPs budget") -> int | None:
    """'5G', '300M' or a number → a count."""
    return _parse_amount(value, _COUNT_UNITS, key, "5G")


@dataclass
class MixedConfig:
    """Mixed-precision weights chosen under a budget (HAWQ-v2 / LCPAQ; `--bits auto`).

    Sensitivity of layer i at b bits: Ω_i(b) = (Tr H_i / n_i)·||Q_b(W_i) − W_i||², the Hessian trace estimated with
    `probes` random draws per batch over the first `images` calibration images (`trace`: fisher, or hutchinson with
    Rademacher vectors and double backprop); bits per layer
    by integer linear programming under `size_budget` (bytes of the packed weights with their scales and zero
    points) or `avg_bits` (weight code bits per weight), and optionally `bops_budget` (bit operations per image).
    `kind_bits` limits the widths per layer kind; under the qdrop/brecq convention first and last layers stay 8-bit."""

    enabled: bool = False
    w_candidates: list = field(default_factory=lambda: [2, 3, 4, 6, 8])
    kind_bits: dict = field(default_factory=dict)
    size_budget: str | int | float | None = None
    avg_bits: float | None = None
    bops_budget: str | int | float | None = None
    trace: TraceEstimator = TraceEstimator.FISHER  # as good or better, 4.5× cheaper: docs/mixed-precision.md
    probes: int = 4
    images: int = 256
    seed: int = 0

    def __post_init__(self):
        coerce_enums(self)
        if not isinstance(self.w_candidates, list) or not self.w_candidates:
            raise ConfigError(f"mixed.w_candidates must be a non-empty list of bit widths, got {self.w_candidates!r}")
        for b in self.w_candidates:
            check_bits(b, "every bit width in mixed.w_candidates")
        self.w_candidates = sorted(set(self.w_candidates))
        if not isinstance(self.kind_bits, dict):
            raise ConfigError(f"mixed.kind_bits must map layer kinds to bit lists, got {self.kind_bits!r}")
        kinds = {k.value for k in LayerKind}
        for kind, allowed in self.kind_bits.items():
            if kind not in kinds:
                raise ConfigError(f"mixed.kind_bits: unknown layer kind {kind!r}; allowed: {', '.join(sorted(kinds))}")
            if not isinstance(allowed, list) or not allowed:
                raise ConfigError(f"mixed.kind_bits.{kind} must be a non-empty list of bit widths, got {allowed!r}")
            for b in allowed:
                check_bits(b, f"every bit width in mixed.kind_bits.{kind}")
            if not set(allowed) & set(self.w_candidates):
                raise ConfigError(
                    f"mixed.kind_bits.{kind} {allowed} shares no width with mixed.w_candidates {self.w_candidates}"
                )
        parse_size(self.size_budget, "mixed.size_budget")
        parse_count(self.bops_budget, "mixed.bops_budget")
        if self.avg_bits is not None and (
            isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)) or not self.avg_bits > 0
        ):
            raise ConfigError(f"mixed.avg_bits must be a number > 0, got {self.avg_bits!r}")
        for name in ("probes", "images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"mixed.{name} must be an integer ≥ 1, got {value!r}")

    @property
    def has_budget(self) -> bool:
        return self.size_budget is not None or self.avg_bits is not None or self.bops_budget is not None


@dataclass
class Recipe:
    method: Method = Method.RTN
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    mixed: MixedConfig = field(default_factory=MixedConfig)

    def __post_init__(self):
        coerce_enums(self)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "ptq.Recipe", "version": RECIPE_VERSION, **to_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = dict(data)
        data.pop("type", None)
        version = data.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"recipe format version {version} is not supported (this ptq reads {RECIPE_VERSION})")
        return build_config(cls, data, "")


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Enum):
        return obj.value
    return obj


def coerce_value(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return build_config(tp, value, key + ".")
    if isinstance(tp, type) and issubclass(tp, Enum):
        if isinstance(value, bool):  # YAML reads an unquoted off/on/no/yes as a boolean
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in {m.value for m in tp}), value)
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(m.value for m in tp)
            raise ConfigError(f"{key} must be one of: {allowed} (got {value!r})") from None
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str) and not (isinstance(value, tp) and not isinstance(value, bool)):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
    return value


def build_config(cls, data: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{sorted(unknown)[0]}; allowed under {prefix or 'the top level'}: {', '.join(hints)}"
        )
    kwargs = {k: coerce_value(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'recipe'}: {e}") from None


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_file: str) -> Path:
    """A bare name resolves to the shipped `recipes/NAME.yaml`; anything else is a path to a YAML file."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist; shipped recipes: {', '.join(recipe_names())}")
        return path
    shipped = RECIPE_DIR / f"{name_or_file}.yaml"
    if not shipped.is_file():
        raise ConfigError(
            f"unknown recipe {name_or_file!r}; shipped recipes: {', '.join(recipe_names())}, or pass a .yaml file"
        )
    return shipped


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. quant.w_bits=4), got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML scalars) to a nested dict, in order."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {part} is not a section")
        node[path[-1]] = value
    return data


def with_values(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """A copy of `recipe` with typed values set by dotted key (`{"quant.w_bits": 4}`; None leaves a value as it is),
    validated like a recipe file: no string is parsed."""
    data = recipe.to_dict()
    for key, value in values.items():
        if value is None:
            continue
        *sections, name = key.split(".")
        node = data
        for part in sections:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown recipe section {part!r} in {key}; sections: {', '.join(SECTIONS)}")
            node = node[part]
        node[name] = to_plain(value)
    return Recipe.from_dict(data)


SECTIONS = ("quant", "calib", "synth", "recon", "gptq", "mixed")


def keyword_names() -> dict[str, str]:
    """Python keyword → dotted recipe key: `method`, every quantization field by its own name (`w_bits`,
    `bias_correction`) and every other field as `section_field` (`synth_iters`, `recon_lr`, `mixed_avg_bits`)."""
    hints = typing.get_type_hints(Recipe)
    names = {"method": "method"}
    for section in SECTIONS:
        for f in dataclasses.fields(hints[section]):
            names[f"{section}_{f.name}"] = f"{section}.{f.name}"
            if section == "quant":
                names[f.name] = f"quant.{f.name}"
    return names


def load_recipe(name_or_file: str = "rtn", overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(name_or_file)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    return Recipe.from_dict(apply_overrides(data, overrides or []))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
