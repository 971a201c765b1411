"""The `ptq` command line: the library logs, this module renders (rich progress bars and tables)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ptq import _world
from ptq._io import write_text
from ptq.config import (
    DEFAULT_RECIPE,
    Method,
    SynthMethod,
    bit_values,
    load_recipe,
    recipe_names,
    with_values,
)
from ptq.errors import PtqError

app = typer.Typer(
    name="ptq",
    help="Post-training and zero-shot quantization of pretrained timm image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
USER_ERRORS = (PtqError,)  # every error ptq explains in one line


def fail(message: str, shared: bool = False, code: int = 2) -> None:
    """One line on stderr and a non-zero exit. Under torchrun a rank other than 0 names itself, and keeps quiet
    about an error every rank shares (rank 0 reports it); torchrun's summary gets the message too."""
    w = _world.world()
    shared = shared or not _world.joined()  # before the ranks meet, every rank meets the same bad input
    if w.distributed:
        _record_for_torchrun(message)
        message = f"rank {w.rank}: {message}" if not w.main else message
    if not (shared and not w.main):
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _record_for_torchrun(message: str) -> None:
    """torchrun prints a failed rank's error file (`TORCHELASTIC_ERROR_FILE`) in its summary."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        data = {
            "message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
        }
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps(data))


@contextmanager
def user_errors(on_interrupt: str = "nothing was written to the output folder"):
    """Turn the library's input errors into a one-line message and a non-zero exit."""
    try:
        yield
    except USER_ERRORS as e:
        fail(str(e), shared=getattr(e, "shared", False))
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: {on_interrupt}")
        raise typer.Exit(code=130) from None


class PlainProgress:
    """Progress as plain lines, for output that is not a terminal: a line when a stage starts and when it ends,
    and in between one per step (unit, batch) but at most one per `every` seconds, with elapsed time and ETA."""

    def __init__(self, write, every: float = 10.0, clock=time.monotonic):
        self.write, self.every, self.clock = write, every, clock
        self.tasks: dict[str, dict[str, Any]] = {}

    def __call__(self, label: str, done: int, total: int | None, note: str | None = None) -> None:
        now = self.clock()
        task = self.tasks.get(label)
        if task is None:
            task = self.tasks[label] = {"start": now, "last": None, "done": None}
        if done == task["done"]:
            return
        task["done"] = done
        finished = total is not None and done >= total
        if not finished and task["last"] is not None and now - task["last"] < self.every:
            return
        task["last"] = now
        elapsed = now - task["start"]
        eta = elapsed / done * (total - done) if done and total and not finished and elapsed >= 1 else None
        parts = [f"{label}: {done}/{total if total is not None else '?'}", f"elapsed {_clock(elapsed)}"]
        parts += [f"eta {_clock(eta)}"] if eta is not None else []
        parts += [note] if note else []
        self.write(" ".join(parts) + (" done" if finished else ""))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextmanager
def progress_bars():
    """A rich progress display and the `progress(label, done, total, note=None)` callback that feeds it."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    if not _world.world().main:  # under torchrun, rank 0 shows its progress
        yield lambda *args, **kwargs: None
        return
    if not err_console.is_terminal:  # a log file, a batch job, CI: plain lines, not a redrawn display
        yield PlainProgress(lambda line: print(line, file=sys.stderr, flush=True))
        return
    with Progress(*columns, console=err_console, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int | None, note: str | None = None) -> None:
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total, note="")
            bars.update(tasks[label], completed=done, total=total, **({"note": note} if note is not None else {}))

        yield update


def check_device(device: str | None) -> str:
    import torch

    from ptq.api import default_device

    device = default_device(device)
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"device {device} requested but CUDA is not available; use --device cpu")
    return device


def start(device: str | None) -> str:
    """The device to run on, checked; under torchrun this rank's (`cuda` → `cuda:LOCAL_RANK`), with the process
    group joined. Ranks other than 0 print nothing but errors."""
    dev = check_device(device)
    from ptq import distributed

    w, dev = distributed.setup(dev)
    if not w.main:
        console.quiet = True
    return str(dev)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    from ptq._malloc import keep_freed_memory

    keep_freed_memory()  # large CPU tensors reuse freed heap instead of page-faulting fresh memory
    w = _world.world()
    logging.basicConfig(
        level=logging.INFO if verbose and w.main else logging.WARNING,
        format=f"rank {w.rank}: %(message)s" if w.distributed and not w.main else "%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )


def _resolve_recipe(recipe: str, overrides: list[str] | None, flags: dict[str, Any]) -> Any:
    """The recipe with --set overrides, then the explicit command-line flags (typed values, which win)."""
    return with_values(load_recipe(recipe, list(overrides or [])), flags)


def _bit_flags(bits: str | None, w_bits: str | None, a_bits: int | None) -> dict[str, Any]:
    """--bits N sets weights and activations; --bits auto (or --w-bits auto) chooses the weight width per layer and
    leaves activations at the recipe's (8 by default)."""
    return bit_values(bits, w_bits, a_bits, ("--bits", "--w-bits", "--a-bits"))


def _classes(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(c) for c in value.split(",") if c.strip()]
    except ValueError:
        fail(f"--classes expects comma-separated class indices, e.g. 1,207,980; got {value!r}")


SizeBudgetOpt = Annotated[
    str | None,
    typer.Option("--size-budget", help="Bytes of the packed weights with their scales, e.g. 2.5MB or 900KiB."),
]
AvgBitsOpt = Annotated[float | None, typer.Option("--avg-bits", help="Average weight bits, e.g. 3.5.")]
BopsBudgetOpt = Annotated[
    str | None, typer.Option("--bops-budget", help="Bit operations per image (MACs × w bits × a bits), e.g. 5G.")
]
MethodOpt = Annotated[
    str | None, typer.Option("--synth-method", help=f"Synthesis method: {', '.join(m.value for m in SynthMethod)}.")
]


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. tf_efficientnet_lite0 or resnet50.")],
    bits: Annotated[
        str | None,
        typer.Option(help="Weight and activation bits (4 means W4A4); auto: weight bits per layer under a budget."),
    ] = None,
    w_bits: Annotated[str | None, typer.Option("--w-bits", help="Weight bits or auto (overrides --bits).")] = None,
    a_bits: Annotated[int | None, typer.Option("--a-bits", help="Activation bits (overrides --bits).")] = None,
    calib_data: Annotated[
        Path | None, typer.Option("--calib-data", help="Folder of calibration images (read recursively).")
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Images for the FP-vs-quantized report (default: --calib-data).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/MODEL-wWaA).")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Local weights (.safetensors or .pth) instead of timm's pretrained ones.")
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help=f"Recipe name ({', '.join(recipe_names())}) or YAML file; fast: GPTQ with bias correction, "
            "zero-shot in minutes on a CPU."
        ),
    ] = DEFAULT_RECIPE,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value, e.g. --set quant.a_observer=minmax.")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help=f"Rounding: {', '.join(m.value for m in Method)} (default: the recipe's).")
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="Calibrate on images synthesized from the model's BN statistics.")
    ] = False,
    synth_method: MethodOpt = None,
    num_images: Annotated[int | None, typer.Option("--num-images", min=1, help="Synthetic images (zero-shot).")] = None,
    synth_data: Annotated[
        Path | None, typer.Option("--synth-data", help="Reuse (or make, resumably) the synthetic set in this folder.")
    ] = None,
    size_budget: SizeBudgetOpt = None,
    avg_bits: AvgBitsOpt = None,
    bops_budget: BopsBudgetOpt = None,
    sensitivity: Annotated[
        Path | None, typer.Option(help="With --bits auto: reuse the table of `ptq sensitivity` (folder or JSON).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty --out folder.")] = False,
    export: Annotated[
        str | None,
        typer.Option(
            help="Also export for deployment: onnx (as `ptq export OUT` does); quantizes every conv output and "
            "5-8-bit weights on symmetric grids, so that int8 runtimes run every conv in integer kernels."
        ),
    ] = None,
) -> None:
    """Quantize a pretrained timm model and write a packed low-bit checkpoint with a fidelity report."""
    if export is not None and export != "onnx":
        fail(f"--export {export!r}: the format ptq exports is onnx")
    if export is not None:
        _check_onnx_extra()

    if calib_data is None and not zero_shot:
        fail("no calibration data: pass --calib-data DIR (a folder of images), or --zero-shot to synthesize it")
    if not zero_shot and (synth_method or num_images or synth_data):
        fail("--synth-method, --num-images and --synth-data apply to --zero-shot runs only")
    with user_errors(
        "nothing was written to --out; rerun the same command to resume: a synthetic set keeps its finished "
        "batches and a reconstruction its finished units"
    ):
        flags = (
            _bit_flags(bits, w_bits, a_bits)
            | _budget_flags(size_budget, avg_bits, bops_budget)
            | {
                "method": method,
                "synth.method": synth_method,
                "synth.num_images": num_images,
            }
        )
        if export is not None:  # what integer kernels need: every conv output quantized; an explicit --set wins
            overrides = ["quant.quantize_layer_outputs=true", *(overrides or [])]
        resolved = _resolve_recipe(recipe, overrides, flags)
        q, mixed = resolved.quant, resolved.mixed
        if (
            export is not None
            and not mixed.enabled
            and q.w_bits >= 5
            and not any(o.startswith("quant.w_symmetric") for o in overrides)
        ):  # and weight grids with zero point 0: onnxruntime's int8 convs with per-channel weight zero points are
            # many times slower (≤ 4-bit weights have no integer kernels; their asymmetric grids measure better)
            resolved = with_values(resolved, {"quant.w_symmetric": True})
            q = resolved.quant
        if not mixed.enabled and (size_budget or avg_bits or bops_budget or sensitivity):
            fail("--size-budget, --avg-bits, --bops-budget and --sensitivity apply to --bits auto (or --w-bits auto)")
        out = out or Path("runs") / f"{model}-w{'auto' if mixed.enabled else q.w_bits}a{q.a_bits}"
        dev = start(device)
        from ptq.api import quantize as run_quantize  # torch and timm: once the arguments are known to be good

        with progress_bars() as progress:
            qmodel = run_quantize(
                model, calib="zero-shot" if zero_shot else calib_data, recipe=resolved,
                eval_data=eval_data or calib_data,
                checkpoint=checkpoint, out=out, overwrite=overwrite, device=dev, progress=progress,
                synth_data=synth_data, sensitivity=sensitivity, real_images=calib_data if zero_shot else None,
            )  # fmt: skip
            report = qmodel.report
    _print_quantize_report(report.to_dict(), out)
    if export is not None and _world.world().main:
        with user_errors(f"the checkpoint in {out} is complete; `ptq export {out}` retries the export"):
            from ptq.export.onnx import export_onnx

            facts = export_onnx(out, data=eval_data or calib_data, overwrite=True)
        _print_export(facts)


@app.command("sensitivity")
def sensitivity_command(
    model: Annotated[str, typer.Argument(help="timm model name.")],
    out: Annotated[Path, typer.Option(help="Folder for sensitivity.json, sensitivity.csv and sensitivity.png.")],
    calib_data: Annotated[Path | None, typer.Option("--calib-data", help="Folder of calibration images.")] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="Measure on images synthesized from the model's BN statistics.")
    ] = False,
    synth_method: MethodOpt = None,
    num_images: Annotated[int | None, typer.Option("--num-images", min=1, help="Calibration images to use.")] = None,
    synth_data: Annotated[Path | None, typer.Option("--synth-data", help="Reuse (or make) this synthetic set.")] = None,
    size_budget: SizeBudgetOpt = None,
    avg_bits: AvgBitsOpt = None,
    bops_budget: BopsBudgetOpt = None,
    a_bits: Annotated[int | None, typer.Option("--a-bits", help="Activation bits (for BOPs; default 8).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Local weights (.safetensors or .pth).")] = None,
    recipe: Annotated[str, typer.Option(help="Recipe name or YAML file (its quant and mixed sections).")] = "rtn",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty --out folder.")] = False,
) -> None:
    """Per-layer Hessian sensitivity to weight bits, the Pareto front of size vs predicted loss, and the best
    allocation under a budget (default: 4 bits per weight on average)."""
    if calib_data is None and not zero_shot:
        fail("no calibration data: pass --calib-data DIR (a folder of images), or --zero-shot to synthesize it")
    with user_errors():
        flags = _budget_flags(size_budget, avg_bits, bops_budget) | {
            "quant.a_bits": a_bits,
            "synth.method": synth_method,
            "synth.num_images": num_images if zero_shot else None,
            "calib.num_images": num_images if not zero_shot else None,
            "mixed.images": num_images,
        }
        resolved = _resolve_recipe(recipe, overrides, flags)
        dev = start(device)
        from ptq.api import sensitivity as run_sensitivity

        with progress_bars() as progress:
            result = run_sensitivity(
                model, "zero-shot" if zero_shot else calib_data, out=out, recipe=resolved, checkpoint=checkpoint,
                synth_data=synth_data, real_images=calib_data if zero_shot else None, overwrite=overwrite,
                device=dev, progress=progress,
            )  # fmt: skip
    _print_sensitivity(result, out)


def _budget_flags(size_budget: str | None, avg_bits: float | None, bops_budget: str | None) -> dict[str, Any]:
    return {
        "mixed.size_budget": size_budget,
        "mixed.avg_bits": avg_bits,
        "mixed.bops_budget": bops_budget,
    }


def _print_sensitivity(result: dict[str, Any], out: Path) -> None:
    table, chosen = result["table"], result["chosen"]
    counts = _bit_counts(chosen["bits"])
    view = Table(title=f"{table['model']}: weight-bit allocation ({table['images']} images, {table['probes']} probes)")
    for name in ("allocation", "weight size (MB)", "average bits", "predicted KL", "GBOPs/image"):
        view.add_column(name, justify="left" if name == "allocation" else "right")
    rows = [(f"W{b} uniform", u) for b, u in result["uniform"].items()] + [("chosen (" + counts + ")", chosen)]
    for label, a in rows:
        view.add_row(
            label, f"{a['weight_bytes'] / 1e6:.3f}", f"{a['avg_bits']:.2f}", f"{a['predicted_kl']:.3g}",
            f"{a['bops'] / 1e9:.2f}",
        )  # fmt: skip
    console.print(view)
    seconds = result["timings_s"]["sensitivity"]
    console.print(f"budget: {_budget_text(result['budget'])}; sensitivity pass {seconds:.1f}s")
    console.print(f"wrote {out}/ (sensitivity.json, sensitivity.csv, sensitivity.png, recipe.yaml)")


def _budget_text(budget: dict[str, Any]) -> str:
    parts = [f"{budget['size_bytes'] / 1e6:.3f} MB"] if budget["size_bytes"] else []
    parts += [f"{budget['avg_bits']:g} bits/weight"] if budget["avg_bits"] else []
    parts += [f"{budget['bops'] / 1e9:.3g} GBOPs"] if budget["bops"] else []
    return ", ".join(parts)


def _bit_counts(bits: dict[str, int]) -> str:
    return ", ".join(f"{n}×W{b}" for b, n in sorted(Counter(bits.values()).items()))


@app.command()
def synthesize(
    model: Annotated[str, typer.Argument(help="timm model name (a CNN with BatchNorm layers).")],
    out: Annotated[Path, typer.Option(help="Folder for the shards, synth.json and preview.png (resumable).")],
    method: Annotated[
        str | None, typer.Option(help=f"{', '.join(m.value for m in SynthMethod)} (default: the recipe's, intraq).")
    ] = None,
    num_images: Annotated[int | None, typer.Option("--num-images", min=1, help="Images to synthesize.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per batch.")] = None,
    iters: Annotated[int | None, typer.Option(min=1, help="Iterations per batch (default: the method's).")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class indices to draw labels from.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (the set is a function of it).")] = None,
    calib_data: Annotated[
        Path | None, typer.Option("--calib-data", help="Real images (fdda: one per class is enough).")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Local weights (.safetensors or .pth).")] = None,
    recipe: Annotated[str, typer.Option(help="Recipe name or YAML file (its synth section).")] = "rtn",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a set made with other settings in --out.")] = False,
) -> None:
    """Synthesize calibration images from a pretrained model's BatchNorm statistics (rerun to resume)."""
    flags = {
        "synth.method": method,
        "synth.num_images": num_images,
        "synth.batch_size": batch_size,
        "synth.iters": iters,
        "synth.classes": _classes(classes),
        "synth.seed": seed,
    }
    with user_errors("finished batches are kept; rerun the same command to resume"):
        resolved = _resolve_recipe(recipe, overrides, flags)
        dev = start(device)
        from ptq.api import synthesize_folder

        with progress_bars() as progress:
            _, meta = synthesize_folder(model, recipe=resolved, checkpoint=checkpoint, real_images=calib_data,
                                        out=out, overwrite=overwrite, device=dev, progress=progress)  # fmt: skip
    last = meta["batch_losses"][-1] if meta["batch_losses"] else {}
    console.print(
        f"wrote {meta['num_images']} {meta['method']} images for {model} to {out}/ in {meta['seconds']:.1f}s "
        f"({meta['resumed_batches']} of {meta['num_batches']} batches resumed); final loss of the last batch: "
        + ", ".join(f"{k} {v:.4f}" for k, v in last.items())
    )


def _check_onnx_extra() -> None:
    with user_errors():
        from ptq.export.onnx import _require_onnx

        _require_onnx()


@app.command("export")
def export_command(
    folder: Annotated[Path, typer.Argument(help="A `ptq quantize` output folder.")],
    format: Annotated[str, typer.Option("--format", help="Deployment format: onnx (QDQ).")] = "onnx",  # noqa: A002
    opset: Annotated[int, typer.Option(help="ONNX opset; 4-bit weights are INT4/UINT4 from 21 on, 8-bit below.")] = 21,
    batch: Annotated[str, typer.Option(help="Batch dimension: dynamic, or a fixed size N.")] = "dynamic",
    out: Annotated[Path | None, typer.Option(help="The .onnx file (default: FOLDER/model.onnx).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Images to verify the export on (default: seeded random inputs).")
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="Weight codes: auto (signed int8 where the grid is symmetric and ≤ 7 bits: fast and exact on every "
            "CPU; unsigned elsewhere), unsigned (exact in every runtime), signed (zero point 0, symmetric grids "
            "only: TensorRT)."
        ),
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Export a quantized model to ONNX QDQ (int weights, per-channel scales) and verify it in onnxruntime."""
    if format != "onnx":
        fail(f"--format {format!r}: the format ptq exports is onnx")
    if batch == "dynamic":
        fixed = None
    else:
        try:
            fixed = int(batch)
        except ValueError:
            fail(f"--batch takes dynamic or a positive integer, got {batch!r}")
    with user_errors("no file was written"):
        from ptq.export.onnx import export_onnx

        facts = export_onnx(folder, out, opset, fixed, data, overwrite, weights)
    _print_export(facts)


def _print_export(facts: dict[str, Any]) -> None:
    check = facts["verification"]
    types = ", ".join(f"{n} {t}" for t, n in facts["weights"].items())
    console.print(
        f"wrote {facts['file']} ({facts['bytes'] / 1e6:.2f} MB, opset {facts['opset']}, batch {facts['batch']}; "
        f"weights: {types})\nverified in onnxruntime on {check['images']} images ({check['data']}): logit SQNR "
        f"{check['sqnr_db']:.1f} dB and top-1 agreement {check['agreement']:.1f}% with ptq's model; against the "
        f"network with FP activations {check['fidelity_db']:.1f} dB (ptq's model: {check['ptq_fidelity_db']:.1f} dB)",
        highlight=False,
    )
    blockers = facts.get("integer_kernel_blockers", {})
    if blockers.get("asymmetric_weights") or blockers.get("unquantized_outputs"):
        console.print(
            f"note: {blockers['asymmetric_weights']} layers with asymmetric weight grids and "
            f"{blockers['unquantized_outputs']} whose output no quantizer reads run outside onnxruntime's fast int8 "
            "kernels; `ptq quantize ... --export onnx` quantizes for them (symmetric weights, every conv output)",
            highlight=False,
        )


def _print_quantize_report(report: dict[str, Any], out: Path) -> None:
    ev, size, fp = report["evaluation"], report["size"], report["fp_evaluation"]
    calib = report["calibration"]
    source = f"{calib['images']} synthetic images" if calib["data"] == "synthetic" else f"{calib['images']} images"
    title = f"{report['model']} W{report['w_bits']}A{report['a_bits']} ({report['method']}, {report['bit_convention']} "
    title += f"convention, calibrated on {source})"
    table = Table(title=title + (f" vs FP on {ev['images']} images" if ev else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    if ev is not None:
        if ev["top1"] is not None:
            table.add_row("top-1 FP → quantized (%)", f"{_fmt(fp['top1'])} → {_fmt(ev['top1'])}")
            table.add_row("top-5 FP → quantized (%)", f"{_fmt(fp['top5'])} → {_fmt(ev['top5'])}")
        table.add_row("top-1 agreement with FP (%)", _fmt(ev["agreement"]))
        table.add_row("KL(FP ‖ Q) (nats/image)", _fmt(ev["kl"], 4))
        table.add_row("logit SQNR (dB)", _fmt(ev["sqnr_db"]))
    table.add_row("FP32 weights (MB)", _fmt(size["fp32_bytes"] / 1e6))
    table.add_row("packed checkpoint (MB)", _fmt(size["checkpoint_bytes"] / 1e6))
    table.add_row("size ratio", _fmt(size["ratio"], 3))
    mixed = report.get("mixed")
    if mixed:
        table.add_row("weight bits per layer", _bit_counts(mixed["bits"]))
        table.add_row(
            "weights: MB / bits per weight (budget)",
            f"{mixed['weight_bytes'] / 1e6:.3f} / {mixed['avg_bits']:.2f} ({_budget_text(mixed['budget'])})",
        )
    recon = report.get("reconstruction")
    if recon and recon.get("skipped"):
        table.add_row("reconstruction", f"skipped: {recon['reason']}")
    elif recon:
        cache = recon["cache"]
        table.add_row(
            "reconstruction cache",
            f"{cache['placement']} {cache['dtype']}, {cache['peak_unit_mb']} MiB (all units: {cache['all_units_mb']})",
        )
    stages = ("load", "synthesize", "sensitivity", "calibrate", "round", "reconstruct", "evaluate")
    stages = [k for k in stages if k in report["timings_s"]]
    table.add_row(f"time: {' / '.join(stages)} (s)", " / ".join(_fmt(report["timings_s"][k]) for k in stages))
    console.print(table)
    if ev is None:
        console.print("no fidelity report: pass --eval-data DIR (real images) to compare with the FP model")
    if report["method"] == "rtn" and (report["mixed"] or report["w_bits"] < 8):
        console.print(
            "note: round-to-nearest below 8-bit weights loses much accuracy on most networks; "
            "--method gptq (minutes) or qdrop (longer) recovers it"
        )
    extra = ", sensitivity.json" if mixed else ""
    console.print(f"wrote {out}/ (model.safetensors, quant_config.json, recipe.yaml, report.json{extra})")


@app.command()
def evaluate(
    models: Annotated[
        list[str], typer.Argument(help="timm names (wildcards allowed) and/or `ptq quantize` output folders.")
    ],
    data: Annotated[Path, typer.Option(help="Image folder; class folders named by synset id or index give labels.")],
    out: Annotated[Path | None, typer.Option(help="Write one row per model to a .csv or .json file.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch (halved on out-of-memory).")] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Data-loading worker processes.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Evaluate FP models and quantized outputs side by side (top-1/5 with labels; agreement, KL, SQNR vs FP)."""
    if out is not None:
        if out.suffix not in (".csv", ".json"):
            fail(f"--out {out} must end in .csv or .json")
        if out.exists() and not overwrite:
            fail(f"--out {out} already exists; choose another file or pass --overwrite")
    with user_errors():
        dev = start(device)
        from ptq.eval.harness import FIELDS
        from ptq.eval.harness import evaluate as run_evaluate

        with progress_bars() as progress:
            rows = run_evaluate(models, data, batch_size, dev, workers, progress)
        if out is not None and _world.world().main:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text(out, _serialise(rows, out.suffix, FIELDS))
    columns = ("model", "kind", "top1", "top5", "agreement", "kl", "sqnr_db", "images", "seconds")
    table = Table(title=f"evaluation on {data}")
    for name in columns:
        table.add_column(name, justify="left" if name in ("model", "kind") else "right")
    for row in rows:
        if row["images"] is None:  # the model could not be evaluated at all
            table.add_row(row["model"], row["kind"], "[red]failed[/]", *[""] * (len(columns) - 3))
        else:
            table.add_row(*[_fmt(row[k], 4 if k == "kl" else 2) for k in columns])
    console.print(table)
    for row in rows:
        if row["error"]:
            console.print(f"[red]{row['model']}[/]: {row['error']}", highlight=False, soft_wrap=True)
    if out is not None:
        console.print(f"wrote {out}")
    if rows and all(row["images"] is None for row in rows):
        raise typer.Exit(code=1)


def _serialise(rows: list[dict[str, Any]], suffix: str, fields: tuple[str, ...]) -> str:
    if suffix == ".json":
        return json.dumps(rows, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main() -> None:
    try:
        app(prog_name="ptq")
    finally:
        if _world.joined():
            from ptq import distributed

            distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
