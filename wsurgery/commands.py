"""The commands of the ``wsurgery`` command line: a thin layer over the Python API.

``wsurgery.cli.main`` imports this module (and with it torch) only after installing its signal handlers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from . import __version__, api
from .checkpoint.output import atomic_output_file, check_output_file, check_output_path, check_written_file
from .describe import format_text, inspect
from .convert.convert import TARGETS
from .convert.combine import adapter_with_weight
from .convert.combine_methods import METHODS, methods_help
from .engine import Result
from .errors import InputError, NotExpressible, fail, one_line
from .hub import PushTarget, push_after, push_options, redacted_command, report_push
from .hub_inputs import looks_like_repo_id
from .merging.base import method_names as merge_method_names
from .methods import Option, not_mergeable, registered
from .support import support_markdown, support_rows


class _Option(click.Option):
    """An option whose old spellings (``hidden_aliases``) keep existing scripts working but are left out of
    --help, so that each concept is documented under one name."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = hidden_aliases

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts = self.opts
        self.opts = [o for o in opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


# The options several commands share, defined once: one name, one meaning, one help text.
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace OUT if it exists and holds only what wsurgery writes: weights, index, "
                                      "config, tokenizer and card files (or one regular .gguf file).")
quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="No progress bar and no summary line; results, notes and warnings are still printed.")
max_shard_size_option = click.option("--max-shard-size", default=None,
                                     help="Re-shard the output (e.g. 5GB). Default: the input's sharding.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="Where the computation runs (auto: CUDA when there is one).")
workers_option = click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                               help="Threads that read, compute and write different tensors at once. Default: one "
                                    "per core. The output is the same whatever N.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON on stdout instead of text.")


def dtype_option(default: str) -> Callable:
    return click.option("--dtype", default=None, metavar="DTYPE",
                        help=f"float32, float16 or bfloat16: the dtype of the floating-point tensors written. "
                             f"Default: {default}.")


def gguf_type_option(help: str, default: str | None = None) -> Callable:
    """``--gguf-type`` (once spelled ``--type`` in merge and convert, still accepted)."""
    return click.option("--gguf-type", "--type", "gguf_type", cls=_Option, hidden_aliases=("--type",),
                        default=default, show_default=default is not None, metavar="GGML_TYPE", help=help)


def report_option(what: str) -> Callable:
    return click.option("--report", "report_path", default=None, metavar="PATH",
                        help=f"Write {what} to this JSON file.")


def _method_option_specs() -> list[Option]:
    """Every registered method's options, once each, by name."""
    specs: dict[str, Option] = {}
    for method in registered().values():
        for option in method.options:
            specs.setdefault(option.name, option)
    return [specs[name] for name in sorted(specs)]


def _method_click_option(option: Option) -> Callable:
    flag = "--" + option.name.replace("_", "-")
    if option.type is bool and option.negative:
        return click.option(f"{flag}/--{option.negative}", option.name, default=None, help=option.help)
    if option.type is bool:
        return click.option(flag, option.name, is_flag=True, default=None, help=option.help)
    return click.option(flag, option.name, type=option.type, default=None, help=option.help)


def method_options(command: Callable) -> Callable:
    """Click decorator: one option per ``Option`` the registered methods declare (``--task-id``...), handed
    to ``command`` as one ``options`` dict for the API; nothing is kept by hand here."""
    specs = _method_option_specs()

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        return command(*args, options={o.name: kwargs.pop(o.name) for o in specs}, **kwargs)

    for option in reversed(specs):
        wrapper = _method_click_option(option)(wrapper)
    return wrapper


def _local(*specs: str | None) -> list[Path]:
    """The arguments that name local files or folders (the others are Hub repo ids)."""
    return [Path(s) for s in specs if s is not None and os.path.lexists(s)]


def _check_out(out: str, inputs: list[Path], overwrite: bool, one_file: bool = False) -> None:
    """Refuse a bad OUT before any work; the API checks it again against the inputs it resolved."""
    (check_output_file if one_file else check_output_path)(Path(out), inputs, overwrite, whole_folders=True)


def _write_side_file(path: str, write: Callable[[Path], object]) -> None:
    """Write a report beside the output whole or not at all (through a temporary sibling), or straight
    into a device such as /dev/stdout."""
    if os.path.exists(path) and not os.path.isfile(path):
        write(Path(path))
        return
    with atomic_output_file(Path(path), overwrite=True) as tmp:
        write(tmp)


@contextmanager
def _closing_progress_bars() -> Iterator[None]:
    """On any error (Ctrl-C included) close the progress bar it left open: else the error message
    would be printed on the bar's line, and the bar would linger until the process ends."""
    try:
        yield
    except BaseException:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        raise


def with_output_options(f):
    """The options of the commands that rewrite a checkpoint with adapters (merge, unmerge)."""
    for option in reversed((dtype_option("keep each tensor's dtype"), max_shard_size_option,
                            click.option("--scale", default=1.0, type=float, show_default=True,
                                         help="Merge scale·ΔW instead of ΔW."),
                            overwrite_option, quiet_option, workers_option)):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsurgery")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
def cli(debug: bool) -> None:
    """Surgery on model weight files: merge, unmerge and inspect adapters, tensor by tensor."""


@cli.command("inspect")
@click.argument("path")
@click.option("--base", default=None, help="With an adapter: the base checkpoint, to show the exact tensors changed "
                                          "(image models: each module's tensor and rows, and why any lands nowhere).")
@json_option
def inspect_cmd(path: str, base: str | None, as_json: bool) -> None:
    """Show what is in a checkpoint (PATH: folder, file or repo id) or an adapter: a PEFT folder, or a kohya /
    LyCORIS / diffusers .safetensors file (algorithms, ranks, alphas, metadata, the model family it is for)."""
    info = inspect(path, base=base)
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info))


@cli.command()
@json_option
def methods(as_json: bool) -> None:
    """List the supported methods: layers, merge, unmerge and the PEFT versions tested."""
    if as_json:
        rows = [dataclasses.asdict(r) for r in support_rows()]
        click.echo(json.dumps({"mergeable": rows, "refused": not_mergeable()}, indent=2))
    else:
        click.echo(support_markdown(), nl=False)


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.argument("out")
@with_output_options
@method_options
@click.option("--requantize", is_flag=True, help="4-bit base: store the changed weights in 4-bit again "
                                                  "(default: write the merge in 16 bit).")
@click.option("--through-nf4", is_flag=True, help="16-bit base: merge into dequant(quant(W)) in NF4, the weights "
                                                   "a QLoRA adapter was trained against.")
@click.option("--verify", "then_verify", is_flag=True, help="Run `wsurgery verify` on the result.")
@gguf_type_option("GGUF output (OUT ends in .gguf): store the changed tensors in this type (f16, q8_0, q4_0...). "
                  "Default: each tensor's own type.")
@click.option("--method", "merge_method", type=click.Choice(merge_method_names()), default=None,
              help="Combine the changes as mergekit does (as `wsurgery merge-models`): ADAPTERs may then be whole "
                   "fine-tunes of BASE too (their change is TUNED − BASE), each ADAPTER:WEIGHT a model's weight.")
@click.option("--density", type=float, default=None, help="With --method: share of each change kept (0 < d ≤ 1).")
@click.option("--seed", "merge_seed", type=int, default=None,
              help="With --method: seed of DARE's/DELLA's random masks (mergekit's --random-seed).")
@push_options
def merge(base: str, adapters: tuple[str, ...], out: str, dtype, max_shard_size, scale, overwrite, quiet,
          workers: int | None, options: dict, requantize: bool, through_nf4: bool, then_verify: bool,
          gguf_type: str | None, merge_method: str | None, density: float | None, merge_seed: int | None,
          push: PushTarget | None) -> None:
    """Merge the ADAPTERs into BASE, in order, and write the merged model to the new folder OUT.

    ADAPTER:WEIGHT merges W + WEIGHT·ΔW (e.g. style-lora:0.5); a trailing ':<number>' is a weight only
    where what comes before it is an existing path or a Hub repo id. BASE may be a llama.cpp .gguf file;
    an OUT ending in .gguf is then written as one GGUF file with BASE's metadata and tokenizer.

    Image models: BASE may be a single-file checkpoint (SD 1.x/2.x, SDXL, SD3, Flux) or a diffusers
    folder, and ADAPTER a kohya, LyCORIS or diffusers-style .safetensors file; its modules are placed by
    the model family's key conventions (q/k/v into rows of a fused qkv...). An OUT ending in .safetensors
    is written as one file."""
    if merge_method is not None:
        _merge_by_method(base, adapters, out, merge_method, density, merge_seed, dtype, max_shard_size, scale,
                         overwrite, quiet, workers, options, requantize or through_nf4 or then_verify or
                         gguf_type is not None)
        push_after(Path(out), push, progress=not quiet)
        return
    if density is not None or merge_seed is not None:
        raise click.UsageError("--density and --seed go with --method")
    one_file = Path(out).suffix in (".gguf", ".safetensors")
    _folder_for_push(out, push, one_file=one_file)
    weighted = [adapter_with_weight(a) for a in adapters]
    _check_out(out, _local(base, *(a for a, _ in weighted)), overwrite, one_file=one_file)
    if then_verify and (requantize or through_nf4):
        raise InputError("--verify compares the merge with the base's own weights; with --requantize or "
                         "--through-nf4 the output holds rounded weights on purpose: verify without them")
    with _closing_progress_bars():
        r = api.merge(base, weighted, out, scale=scale, dtype=dtype, max_shard_size=max_shard_size,
                      overwrite=overwrite, progress=not quiet, options=options, requantize=requantize,
                      through_nf4=through_nf4, command=_command_line(), gguf_type=gguf_type, workers=workers)
    _report("merged", r, quiet)
    if then_verify:
        with _closing_progress_bars():
            report = api.verify(base, weighted, out, scale=scale, progress=not quiet, options=options)
        _show_verify(report, None, False)
    push_after(r.out, push, progress=not quiet)  # the card reads config.json's "wsurgery" record


def _merge_by_method(base: str, inputs: tuple[str, ...], out: str, method: str, density: float | None,
                     seed: int | None, dtype: str | None, max_shard_size: str | None, scale: float, overwrite: bool,
                     quiet: bool, workers: int | None, options: dict, other_options: bool) -> None:
    """``merge --method``: the inputs (adapters and fine-tunes alike) combined as ``merge-models`` does."""
    if other_options or scale != 1.0 or any(v is not None for v in options.values()):
        raise click.UsageError("--method combines changes as mergekit does; --scale, method options, --requantize, "
                               "--through-nf4, --verify and --gguf-type do not apply to it")
    parameters = {"density": density} if density is not None else {}
    r = api.merge_models(out, base, list(inputs), method=method, parameters=parameters, seed=seed, dtype=dtype,
                         max_shard_size=max_shard_size, overwrite=overwrite, progress=not quiet, workers=workers)
    if not quiet:
        click.echo(f"merged {r.models} models with {r.method} into {r.out}: {r.tensors} tensors, "
                   f"{r.bytes_written / 1e6:.1f} MB")


@cli.command()
@click.argument("merged")
@click.argument("adapter")
@click.argument("out")
@with_output_options
@method_options
@push_options
def unmerge(merged: str, adapter: str, out: str, dtype, max_shard_size, scale, overwrite, quiet,
            workers: int | None, options: dict, push: PushTarget | None) -> None:
    """Subtract ADAPTER from the merged model MERGED and write the result to the new folder OUT."""
    _check_out(out, _local(merged, adapter), overwrite)
    with _closing_progress_bars():
        r = api.unmerge(merged, adapter, out, scale=scale, dtype=dtype, max_shard_size=max_shard_size,
                        overwrite=overwrite, progress=not quiet,
                        options=options, command=_command_line(), workers=workers)
    _report("unmerged", r, quiet)
    push_after(r.out, push, progress=not quiet)  # the card reads config.json's "wsurgery" record


@cli.command("push")
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Push to this branch (created if missing) or refs/pr/N.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", default=None, help="The commit's title.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN, else the stored login). Never printed.")
@quiet_option
def push_cmd(folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool,
             commit_message: str | None, token: str | None, quiet: bool) -> None:
    """Check FOLDER (a checkpoint or adapter) and upload it to the Hub repo REPO_ID, with a model card
    generated where FOLDER has no README.md. Re-running an interrupted push resumes it."""
    report_push(api.push(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, token=token, progress=not quiet))


def _command_line() -> str:
    """This invocation as it may be recorded in a model card: the token hidden."""
    ctx = click.get_current_context()
    argv = (ctx.find_root().obj or {}).get("argv", sys.argv[1:])
    return redacted_command(["wsurgery", *argv])


@cli.command("quantize")
@click.argument("src")
@click.argument("out")
@click.option("--nf4", "quant_type", flag_value="nf4", default=True, help="NF4 codes (QLoRA's; the default).")
@click.option("--fp4", "quant_type", flag_value="fp4", help="bitsandbytes' FP4 codes instead of NF4.")
@click.option("--no-double-quant", is_flag=True, help="Keep absmax in float32 instead of 8-bit codes.")
@click.option("--blocksize", type=int, default=64, show_default=True, help="Elements per absmax block (power of two).")
@click.option("--compute-dtype", default=None, help="bnb_4bit_compute_dtype to record. Default: the weights' dtype.")
@click.option("--skip-modules", multiple=True, metavar="REGEX",
              help="Keep modules matching this regex in full precision (repeatable).")
@click.option("--report", "report_path", default=None, metavar="PATH", is_flag=False, flag_value="-",
              help="Write each weight's quantization error (RMSE, SNR, max abs) and the bytes saved to this JSON file.")
@json_option
@dtype_option("each tensor's dtype (recorded as the compute dtype of the 4-bit weights)")
@max_shard_size_option
@gguf_type_option("Write the GGUF file OUT instead: a llama-quantize mix (q4_k_m, q5_k_m, q3_k_s/m/l, q4_k_s, "
                  "q5_k_s, q2_k, q6_k: each tensor's type as llama.cpp chooses it) or one ggml type for every "
                  "weight matrix (q8_0, q4_0, f16...). SRC is a .gguf file (requantized) or a Hugging Face model "
                  "folder (converted as llama.cpp's convert_hf_to_gguf.py does: f32, f16, bf16, q8_0, or a mix).")
@overwrite_option
@quiet_option
@workers_option
@push_options
def quantize_cmd(src: str, out: str, quant_type: str, no_double_quant: bool, blocksize: int, compute_dtype: str | None,
                 skip_modules: tuple[str, ...], report_path: str | None, as_json: bool, dtype: str | None,
                 max_shard_size: str | None, gguf_type: str | None, overwrite: bool, quiet: bool,
                 workers: int | None, push: PushTarget | None) -> None:
    """Store SRC's Linear weights in bitsandbytes 4-bit (loadable by transformers) in the new folder OUT;
    with --gguf-type, write the GGUF file OUT from SRC (a GGUF file, requantized, or a Hugging Face folder,
    converted)."""
    _folder_for_push(out, push)
    _check_out(out, _local(src), overwrite, one_file=gguf_type is not None)
    if gguf_type is not None and (report_path or as_json):
        raise click.UsageError("--report and --json measure bitsandbytes 4-bit quantization, not --gguf-type")
    if report_path not in (None, "-"):  # a bare --report (its old form) prints the table instead
        check_written_file(Path(report_path), "--report", _local(src), Path(out))
    if gguf_type is not None:
        with _closing_progress_bars():
            r, kept = api.quantize_gguf(src, out, gguf_type, overwrite=overwrite, progress=not quiet,
                                        workers=workers)
        if kept:
            _notes([f"{name}: kept as it was: its rows do not divide into {gguf_type} blocks" for name in kept])
        _report("quantized", r, quiet)
        return
    with _closing_progress_bars():
        r, errors = api.quantize(src, out, quant_type=quant_type, blocksize=blocksize, double_quant=not no_double_quant,
                                 compute_dtype=compute_dtype, skip_modules=skip_modules, dtype=dtype,
                                 max_shard_size=max_shard_size, overwrite=overwrite, progress=not quiet,
                                 report=bool(report_path or as_json), command=_command_line(), workers=workers)
    if errors is not None:
        report = _quant_report_dict(errors)
        if report_path not in (None, "-"):
            _write_side_file(report_path, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
        if as_json:
            click.echo(json.dumps(report, indent=2))
        elif report_path == "-":
            click.echo(errors.format())
    _report("quantized", r, quiet)
    push_after(r.out, push, progress=not quiet)


def _quant_report_dict(errors) -> dict:
    """``quantize --report``'s numbers as strict JSON (an error-free weight's infinite SNR becomes null)."""
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {"tensors": [{"name": t.name, "rmse": t.rmse, "snr_db": finite(t.snr_db), "max_abs": t.max_abs,
                         "numel": t.numel} for t in errors.tensors],
            "overall": {"rmse": errors.rmse, "snr_db": finite(errors.snr_db), "max_abs": errors.max_abs},
            "bytes_in": errors.bytes_in, "bytes_out": errors.bytes_out}


@cli.command("dequantize")
@click.argument("src")
@click.argument("out")
@dtype_option("each weight's recorded dtype")
@max_shard_size_option
@overwrite_option
@quiet_option
@workers_option
@push_options
def dequantize_cmd(src: str, out: str, dtype: str | None, max_shard_size: str | None, overwrite: bool,
                   quiet: bool, workers: int | None, push: PushTarget | None) -> None:
    """Write a bitsandbytes 4-bit checkpoint, or a llama.cpp .gguf file, SRC back as plain tensors (safetensors,
    Hugging Face names) in the new folder OUT."""
    _check_out(out, _local(src), overwrite)
    with _closing_progress_bars():
        r = api.dequantize(src, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                           progress=not quiet, command=_command_line(), workers=workers)
    _report("dequantized", r, quiet)
    push_after(r.out, push, progress=not quiet)


@cli.command("verify")
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER MERGED | ORIGINAL QUANTIZED --quantized")
@click.option("--quantized", is_flag=True, help="Check a 4-bit checkpoint against the one it was quantized from.")
@device_option
@click.option("--tokens", type=click.IntRange(1), default=64, show_default=True, help="Input rows per module.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs.")
@click.option("--rtol", type=float, default=None,
              help="Allowed error per output, relative to the layer run on magnitudes |W'|·|x|. Default by dtype.")
@click.option("--atol", type=float, default=0.0, show_default=True, help="Allowed absolute error per output.")
@click.option("--scale", default=1.0, type=float, show_default=True, help="The --scale the merge used.")
@report_option("the full report")
@json_option
@click.option("--all", "show_all", is_flag=True, help="List every module, not only failures.")
@quiet_option
@workers_option
@method_options
def verify_cmd(paths: tuple[str, ...], quantized: bool, device: str, tokens: int, seed: int, rtol: float | None,
               atol: float, scale: float, report_path: str | None, as_json: bool, show_all: bool, quiet: bool,
               workers: int | None, options: dict) -> None:
    """Check with forward passes that MERGED computes what BASE + ADAPTER compute, or (--quantized) that
    QUANTIZED stays within 4-bit quantization error of ORIGINAL. Exit 0 only if every check passes."""
    want = 2 if quantized else 3
    report_option_name = "--report"
    if as_json and len(paths) == want + 1 and report_path is None:
        old = _old_json_path(paths)  # ``--json PATH``, the old spelling of ``--report PATH``
        if old is not None:
            paths, report_path, as_json, report_option_name = tuple(p for p in paths if p != old), old, False, "--json"
    if len(paths) != want:
        raise click.UsageError(f"expected {'ORIGINAL QUANTIZED' if quantized else 'BASE ADAPTER MERGED'}, "
                               f"got {len(paths)} path(s)")
    if report_path:
        check_written_file(Path(report_path), report_option_name, _local(*paths))
    with _closing_progress_bars():
        if quantized:
            report = api.verify_quantized(*paths, device=device, tokens=tokens, seed=seed, progress=not quiet)
        else:
            report = api.verify(*paths, scale=scale, device=device, tokens=tokens, seed=seed, rtol=rtol,
                                atol=atol, progress=not quiet, options=options, workers=workers)
    _show_verify(report, report_path, show_all, as_json)


def _old_json_path(paths: tuple[str, ...]) -> str | None:
    """The path written right after ``--json`` on the command line, when it is one of ``paths``."""
    argv = list((click.get_current_context().find_root().obj or {}).get("argv", sys.argv[1:]))
    after = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--json"]
    return after[0] if len(after) == 1 and after[0] in paths and paths.count(after[0]) == 1 else None


def _show_verify(report, report_path: str | None, show_all: bool, as_json: bool = False) -> None:
    from .verify import format_report

    if report_path:
        _write_side_file(report_path, report.write_json)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else format_report(report, everything=show_all))
    if not report.passed:
        names = ", ".join(c.module for c in report.failures[:3])
        more = f" and {len(report.failures) - 3} more" if len(report.failures) > 3 else ""
        fail(f"verify failed: {names}{more} differ from the unmerged forward")


@cli.command()
@click.argument("base")
@click.argument("tuned")
@click.argument("out")
@click.option("--rank", type=int, default=None, help="The same LoRA rank for every module.")
@click.option("--energy", type=float, default=None,
              help="Per module, the smallest rank that keeps this fraction of ||ΔW||² (e.g. 0.99).")
@click.option("--max-error", type=float, default=None,
              help="Per module, the smallest rank whose relative error ||ΔW − BA||/||ΔW|| is at most this.")
@click.option("--targets", default=None, metavar="REGEX",
              help="Only modules whose name matches (re.search); other changes are left out and listed.")
@device_option
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="auto: randomized (torch.svd_lowrank) for --rank on large matrices, exact otherwise.")
@click.option("--plot", default=None, metavar="PNG", help="Draw the singular-value spectra of a few modules "
                                                          "(needs matplotlib: pip install 'wsurgery[plot]').")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "diffusers"]), default="peft", show_default=True,
              help="kohya/diffusers: BASE and TUNED are single-file SD 1.x/2.x/SDXL checkpoints and OUT one "
                   ".safetensors LoRA made as kohya's extract_lora_from_models.py makes it (its modules, SVD, "
                   "clamp, alpha = rank; --rank default 4).")
@click.option("--conv-rank", type=int, default=None,
              help="--format kohya/diffusers: also the 3x3 convolutions of the ResNet blocks (LoCon), at this rank.")
@click.option("--clamp-quantile", type=float, default=0.99, show_default=True,
              help="--format kohya/diffusers: clamp the factors at this quantile of their values, as kohya does.")
@report_option("the per-module report")
@json_option
@overwrite_option
@quiet_option
@workers_option
@push_options
def extract(base: str, tuned: str, out: str, rank: int | None, energy: float | None, max_error: float | None,
            targets: str | None, device: str, svd: str, plot: str | None, fmt: str, conv_rank: int | None,
            clamp_quantile: float, report_path: str | None, as_json: bool, overwrite: bool, quiet: bool,
            workers: int | None, push: PushTarget | None) -> None:
    """Extract the PEFT LoRA closest to TUNED − BASE (truncated SVD per weight) into the new folder OUT.

    With --format kohya or diffusers: a kohya LoRA/LoCon of two single-file diffusion checkpoints, one file."""
    if fmt != "peft":
        _extract_diffusion(base, tuned, out, fmt, rank, conv_rank, clamp_quantile, as_json, overwrite, quiet,
                           {"--energy": energy, "--max-error": max_error, "--targets": targets, "--plot": plot,
                            "--report": report_path, "--push-to": push})
        return
    if conv_rank is not None:
        raise click.UsageError("--conv-rank goes with --format kohya or diffusers")
    inputs = _local(base, tuned)
    _check_out(out, inputs, overwrite)
    for path, option in ((plot, "--plot"), (report_path, "--report")):
        if path:
            check_written_file(Path(path), option, inputs, Path(out))
    with _closing_progress_bars():
        r = api.extract(base, tuned, out, rank=rank, energy=energy, max_error=max_error, targets=targets,
                        device=device, svd=svd, overwrite=overwrite, progress=not quiet, plot=plot,
                        command=_command_line(), workers=workers)
    if report_path:
        _write_side_file(report_path, lambda p: p.write_text(json.dumps(r.to_dict(), indent=2)))
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    else:
        click.echo(_table(["module", "kind", "shape", "rank", "rel_error", "energy"],
                          [[m.module, m.kind, "x".join(map(str, m.shape)), m.rank or "-", f"{m.rel_error:.3e}",
                            f"{m.energy:.5f}"] for m in r.modules]))
    _notes([*r.notes, *(f"{m.module}: stored whole (modules_to_save): {m.reason}" for m in r.saved_whole)])
    by_reason: dict[str, list[str]] = {}
    for name, reason in r.left_out.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        click.echo(f"wsurgery: warning: left out {', '.join(names[:3])}{more}: {reason}", err=True)
    if not quiet:
        errors = [m.rel_error for m in r.lora]
        click.echo(f"extracted {len(r.lora)} LoRA module(s) ({r.rule}; ranks {min(m.rank for m in r.lora)}-"
                   f"{max(m.rank for m in r.lora)}, largest relative error {max(errors):.3g}), "
                   f"{len(r.saved_whole)} stored whole; wrote {r.out}", err=True)
    push_after(r.out, push, progress=not quiet)


def _extract_diffusion(base: str, tuned: str, out: str, fmt: str, rank: int | None, conv_rank: int | None,
                       clamp_quantile: float, as_json: bool, overwrite: bool, quiet: bool,
                       unused: dict[str, object]) -> None:
    from .convert.diffusion import extract_diffusion

    given = [k for k, v in unused.items() if v is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} go(es) with --format peft, not --format {fmt}")
    _check_out(out, _local(base, tuned), overwrite, one_file=True)
    r = extract_diffusion(base, tuned, out, rank=rank or 4, conv_rank=conv_rank, format=fmt,
                          clamp_quantile=clamp_quantile, overwrite=overwrite, command=_command_line())
    rows = [{"module": m.module, "rank": m.rank, "rel_error": m.error} for m in r.modules]
    if as_json:
        click.echo(json.dumps({"out": str(r.out), "text_encoders": r.text_encoders, "modules": rows}, indent=2))
    else:
        click.echo(_table(["module", "rank", "rel_error"], [[m.module, m.rank, f"{m.error:.3e}"] for m in r.modules]))
    if not r.text_encoders:
        click.echo("wsurgery: note: the text encoders differ by at most 0.01 (kohya's min_diff): the UNet only",
                   err=True)
    if not quiet:
        click.echo(f"extracted {len(r.modules)} LoRA module(s); wrote {r.out}", err=True)


@cli.command()
@click.argument("adapter")
@click.argument("out")
@click.option("--rank", type=int, default=None,
              help="The new rank of every module; with --energy/--fro/--ratio the largest rank (default: each "
                   "module's own).")
@click.option("--conv-rank", type=int, default=None, help="The rank of Conv2d modules (default: --rank).")
@click.option("--energy", type=float, default=None,
              help="Per module, the fewest singular values whose sum keeps this share of the total (kohya's "
                   "sv_cumulative).")
@click.option("--fro", type=float, default=None,
              help="Per module, the fewest singular values that keep this share of the Frobenius norm (sv_fro).")
@click.option("--ratio", type=float, default=None,
              help="Per module, the singular values above the largest over RATIO (sv_ratio).")
@click.option("--dtype", "dtype", type=click.Choice(["float", "fp16", "bf16"]), default=None,
              help="The dtype written (default: the file's own).")
@json_option
@overwrite_option
@quiet_option
def resize(adapter: str, out: str, rank: int | None, conv_rank: int | None, energy: float | None, fro: float | None,
           ratio: float | None, dtype: str | None, as_json: bool, overwrite: bool, quiet: bool) -> None:
    """Resize the LoRA modules of a kohya / diffusers-style file ADAPTER into the new file OUT, per module, as
    kohya's resize_lora.py does (its ranks, alphas and report); other modules are copied."""
    from .convert.resize import resize as resize_file

    _check_out(out, _local(adapter), overwrite, one_file=True)
    r = resize_file(adapter, out, rank=rank, conv_rank=conv_rank, energy=energy, fro=fro, ratio=ratio, dtype=dtype,
                    overwrite=overwrite, command=_command_line())
    if as_json:
        click.echo(json.dumps({"out": str(r.out), "method": r.method, "kept": r.kept,
                               "modules": [dataclasses.asdict(m) for m in r.modules]}, indent=2))
    else:
        for m in r.modules:
            click.echo(m.line(r.method != "fixed"))
        click.echo(f"Average Frobenius norm retention: {r.fro_mean:.2%} | std: {r.fro_std:0.3f}")
    if r.kept:
        click.echo(f"wsurgery: note: {len(r.kept)} module(s) are not plain LoRA and were copied as they are "
                   f"({', '.join(r.kept[:3])}{' ...' if len(r.kept) > 3 else ''})", err=True)
    if not quiet:
        click.echo(f"resized {len(r.modules)} module(s); wrote {r.out}", err=True)


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]... OUT")
@click.option("--method", type=click.Choice(list(METHODS)), default="cat", show_default=True,
              help=f"How to combine: PEFT's add_weighted_adapter combination_type. {methods_help()}.")
@click.option("--rank", type=int, default=None, help="cat: re-compress each module to at most this rank (best "
                                                     "approximation); needed for adapters that are not LoRAs. SVD "
                                                     "methods: PEFT's svd_rank (default: the largest adapter rank).")
@click.option("--density", type=float, default=None,
              help="ties, dare_*, magnitude_prune*: the fraction of values kept, in (0, 1].")
@click.option("--majority-sign-method", type=click.Choice(["total", "frequency"]), default="total",
              show_default=True, help="ties, dare_ties(_svd): elect each entry's sign by the summed values or by "
                                      "the count of signs.")
@click.option("--seed", type=int, default=None, help="dare_*: the seed of the masks; with the model's module order "
                                                     "(--module-order) they are PEFT's under torch.manual_seed(SEED). "
                                                     "Default 0.")
@click.option("--module-order", type=click.Path(dir_okay=False), default=None,
              help="dare_*: a text file of the model's named_modules() names, one a line: the order PEFT draws "
                   "the masks in, which no file records (default: by name, layer numbers as numbers).")
@click.option("--svd-clamp", type=float, default=None, help="SVD methods: clamp the factors to this quantile of "
                                                            "their entries (PEFT's svd_clamp).")
@click.option("--svd-full-matrices/--no-svd-full-matrices", default=True, show_default=True,
              help="SVD methods: the full or the reduced SVD (PEFT's svd_full_matrices).")
@click.option("--svd-driver", type=click.Choice(["gesvd", "gesvdj", "gesvda"]), default=None,
              help="PEFT's svd_driver: a cuSOLVER method, for CUDA only; refused here, as wsurgery computes on the "
                   "CPU.")
@click.option("--base", default=None, help="The base checkpoint: needed where a change depends on W; also maps "
                                           "differently named modules onto the base's names.")
@overwrite_option
@quiet_option
@push_options
def combine(paths: tuple[str, ...], method: str, rank: int | None, density: float | None,
            majority_sign_method: str, seed: int | None, module_order: str | None, svd_clamp: float | None,
            svd_full_matrices: bool, svd_driver: str | None, base: str | None, overwrite: bool, quiet: bool,
            push: PushTarget | None) -> None:
    """Write one LoRA combining the ADAPTERs to the new folder OUT; by default (cat) its change is the
    weighted sum of their changes.

    ADAPTER:WEIGHT weights that adapter (e.g. style-lora:0.5). The other methods are those of PEFT's
    add_weighted_adapter, for LoRAs, computed as PEFT computes them; linear, ties, dare_linear, dare_ties
    and magnitude_prune merge the A and B factors separately, which is not a sum of changes. OUT may also
    come first (the former order); it is then the end that is not an adapter, and a case that cannot be
    told apart is refused."""
    out, adapters = _combine_out(paths)
    weighted = [adapter_with_weight(a) for a in adapters]
    _check_out(out, _local(base, *(a for a, _ in weighted)), overwrite)
    with _closing_progress_bars():
        r = api.combine(out, weighted, rank=rank, base=base, method=method, density=density,
                        majority_sign_method=majority_sign_method, seed=seed, module_order=module_order,
                        svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                        overwrite=overwrite, progress=not quiet, command=_command_line())
    click.echo(_table(["module", "kind", "rank", "how", "rel_error"],
                      [[m.module, m.kind, m.rank or "-", m.how, "-" if m.rel_error is None else f"{m.rel_error:.3e}"]
                       for m in r.modules]))
    _notes(r.notes)
    if not quiet:
        click.echo(f"combined {len(adapters)} adapter(s) into {len(r.modules)} module(s); wrote {r.out}", err=True)
    push_after(r.out, push, progress=not quiet)


def _combine_kind(spec: str) -> str:
    """``adapter`` (an existing adapter folder or file, or a weighted spec), ``folder`` (an existing folder
    that is no adapter: only an OUT to overwrite), ``repo`` (no such path, but a Hub repo id could be
    meant) or ``new`` (no such path; not a repo id)."""
    if adapter_with_weight(spec)[0] != spec:
        return "adapter"
    path = Path(spec)
    if os.path.lexists(spec):
        return "folder" if path.is_dir() and not (path / "adapter_config.json").exists() else "adapter"
    return "repo" if looks_like_repo_id(spec) else "new"


def _combine_out(paths: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(OUT, ADAPTERs) from ``ADAPTER... OUT`` or ``OUT ADAPTER...``: OUT is the end that cannot be an adapter;
    where both ends could be OUT, or neither, it is refused rather than guessed (a wrong guess would
    write over an adapter)."""
    if len(paths) < 2:
        raise click.UsageError("expected ADAPTER[:WEIGHT]... OUT")
    first, last = paths[0], paths[-1]
    kinds = _combine_kind(first), _combine_kind(last)
    can_be_out, can_be_adapter = ("new", "folder", "repo"), ("adapter", "repo")
    last_out = kinds[1] in can_be_out and kinds[0] in can_be_adapter
    first_out = kinds[0] in can_be_out and kinds[1] in can_be_adapter
    if last_out and first_out:  # both Hub repo ids, or new folders named like one
        raise click.UsageError(f"cannot tell whether OUT is {first} or {last}: neither exists here and both could be "
                               f"Hub repo ids; write OUT last as a local path (e.g. ./{last})")
    if kinds == ("adapter", "adapter"):
        raise click.UsageError(f"cannot tell whether OUT is {first} or {last}: both are existing adapters; write OUT "
                               "last, as a folder that is not an adapter yet")
    if first_out:
        return first, paths[1:]
    return last, paths[:-1]  # the documented order; an adapter that does not exist is reported as such


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _notes(notes: list[str]) -> None:
    """Notes that differ only in module and numbers are told once, with how many modules they concern."""
    groups: dict[str, list[str]] = {}
    for note in notes:
        groups.setdefault(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", note.split(": ", 1)[-1]), []).append(note)
    for lines in groups.values():
        shown = lines[0] if len(lines) == 1 else f"{len(lines)} modules, e.g. {lines[0]}"
        click.echo(f"wsurgery: note: {shown}", err=True)


def _report(verb: str, r: Result, quiet: bool) -> None:
    """Notes always (they can matter, e.g. an approximate inverse); the summary unless --quiet.

    Notes that differ only in module and numbers are told once, with how many modules they concern
    (the full list is in the API's ``Result.notes``).
    """
    _notes(r.notes)
    if not quiet:
        what = (f"{r.changed_tensors} weight(s) of {r.tensors} tensors" if verb in ("quantized", "dequantized")
                else f"{r.modules} module(s), {r.changed_tensors} tensor(s) changed of {r.tensors}")
        click.echo(f"{verb} {what}; wrote {r.out} ({len(r.shards)} shard(s), {r.bytes_written:,} bytes)", err=True)


#: convert's targets for image-model adapters: one-file formats first.
_FILE_TARGETS = ("kohya", "diffusers", "peft")


@cli.command("convert")
@click.argument("adapter")
@click.argument("out")
@click.option("--to", "to", required=True, type=click.Choice(sorted([*TARGETS, "gguf-lora", *_FILE_TARGETS])),
              help="The PEFT method to write, or gguf-lora: a llama.cpp LoRA adapter (.gguf) for --base (the .gguf "
                   "file it will run on, or the Hugging Face checkpoint that file was converted from), or for an "
                   "image-model adapter (kohya/LyCORIS/diffusers file, PEFT folder of one pipeline component): "
                   "kohya or diffusers (one .safetensors file) or peft (a folder), named after --base's family.")
@click.option("--base", default=None,
              help="The base checkpoint: needed where the change depends on W (DoRA, OFT, BOFT, HRA, IA3, MiSS "
                   "bat...), for --to oft/boft, and for adapters that do not record their layers' shapes (all but "
                   "LoRA, VB-LoRA).")
@click.option("--rank", type=int, default=None,
              help="LoRA/LoHa/LoKr rank (default: each module's exact rank); MiSS/Bone's r (required).")
@click.option("--block-size", type=int, default=None, help="OFT/BOFT block size (default 32 / 4).")
@click.option("--butterfly-factors", type=int, default=None,
              help="BOFT butterfly factors (default 1; PEFT keeps more only where its CUDA extension builds).")
@click.option("--force", is_flag=True, help="Write even where a module's relative error reaches 0.99.")
@gguf_type_option("--to gguf-lora: the tensor type of the adapter (f32, f16, bf16, q8_0).", default="f32")
@click.option("--component", default=None, help="A PEFT folder converted to kohya/diffusers: the pipeline component "
                                                "it adapts (unet, transformer, text_encoder...; default: the one "
                                                "whose modules it names).")
@click.option("--merge-into", default=None, metavar="MERGED",
              help="--to gguf-lora: where llama.cpp's LoRA format cannot carry the adapter (DoRA, modules_to_save, "
                   "biases...), merge it into --base and write the model MERGED (a .gguf file) instead of OUT.")
@overwrite_option
@quiet_option
@workers_option
@push_options
def convert_cmd(adapter: str, out: str, to: str, base: str | None, rank: int | None, block_size: int | None,
                butterfly_factors: int | None, force: bool, gguf_type: str, component: str | None,
                merge_into: str | None, overwrite: bool, quiet: bool, workers: int | None,
                push: PushTarget | None) -> None:
    """Rewrite ADAPTER as another PEFT method in the new folder OUT: exact where the method can express the
    change, its best approximation otherwise. Prints every module's relative error.

    --to gguf-lora writes a PEFT LoRA as the llama.cpp LoRA adapter file OUT (.gguf) for --base.

    --to kohya|diffusers|peft renames an image-model adapter into that ecosystem's convention for --base's family
    (fused kohya modules split or joined exactly; LyCORIS changes factored into LoRA where the target has no form
    for them)."""
    one_file = to == "gguf-lora" or to in _FILE_TARGETS[:2]
    _folder_for_push(out, push, one_file=one_file)
    if to == "gguf-lora" and base is None:
        raise click.UsageError("--to gguf-lora needs --base: the .gguf file the adapter will run on, or the "
                               "Hugging Face checkpoint it was converted from")
    if to != "gguf-lora" and merge_into is not None:
        raise click.UsageError("--merge-into goes with --to gguf-lora")
    inputs = _local(adapter, base)
    _check_out(out, inputs, overwrite, one_file=one_file)
    if component is not None and to not in _FILE_TARGETS:
        raise click.UsageError("--component goes with --to kohya, diffusers or peft")
    if to in _FILE_TARGETS:
        _convert_adapter_file(adapter, out, to, base, rank, component, overwrite, quiet)
        push_after(Path(out), push, progress=not quiet)
        return
    if merge_into is not None:
        _check_out(merge_into, inputs, overwrite, one_file=Path(merge_into).suffix == ".gguf")
    if to == "gguf-lora":
        assert base is not None, "refused above"
        _gguf_lora(adapter, out, base, gguf_type, merge_into, overwrite, quiet)
        return
    with _closing_progress_bars():
        c = api.convert(adapter, out, to=to, base=base, rank=rank, block_size=block_size,
                        butterfly_factors=butterfly_factors, force=force, overwrite=overwrite, progress=not quiet,
                        command=_command_line(), workers=workers)
    width = max((len(m.module) for m in c.modules), default=6)
    click.echo(f"{'module':<{width}}  {c.size_name:>5}  relative error")
    for m in c.modules:
        click.echo(f"{m.module:<{width}}  {m.rank:>5}  {m.error:.3g}{' (exact)' if m.exact else ''}")
    for note in c.notes:
        click.echo(f"wsurgery: note: {note}", err=True)
    if not quiet:
        exact = sum(m.exact for m in c.modules)
        click.echo(f"converted {len(c.modules)} module(s) from {c.source} to {c.method}, {exact} exactly; max relative "
                   f"error {c.max_error:.3g}; wrote {c.out}", err=True)
    push_after(c.out, push, progress=not quiet)


def _convert_adapter_file(adapter: str, out: str, to: str, base: str | None, rank: int | None,
                          component: str | None, overwrite: bool, quiet: bool) -> None:
    from .convert.diffusion import convert_adapter_file

    c = convert_adapter_file(adapter, out, to=to, base=base, rank=rank, component=component, overwrite=overwrite,
                             command=_command_line())
    click.echo(_table(["module", "rank", "relative error"],
                      [[m.module, m.rank, f"{m.error:.3g}{' (exact)' if m.exact else ''}"] for m in c.modules]))
    _notes(c.notes)
    if not quiet:
        exact = sum(m.exact for m in c.modules)
        click.echo(f"converted {len(c.modules)} module(s) from {c.source} to {c.target}, {exact} exactly; max "
                   f"relative error {c.max_error:.3g}; wrote {c.out}", err=True)


def _gguf_lora(adapter: str, out: str, base: str, gguf_type: str, merge_into: str | None, overwrite: bool,
               quiet: bool) -> None:
    try:
        r = api.export_gguf_lora(adapter, out, base, gguf_type=gguf_type, overwrite=overwrite)
    except NotExpressible as e:
        if merge_into is None:
            raise
        click.echo(f"wsurgery: note: {one_line(e.problem)}; merging it into {base} instead (--merge-into)", err=True)
        with _closing_progress_bars():
            result = api.merge(base, adapter, merge_into, overwrite=overwrite, progress=not quiet,
                               command=_command_line())
        _report("merged", result, quiet)
        return
    click.echo(_table(["module", "tensor", "rank", "scale", "scale baked into B"],
                      [[m.module, m.tensor, m.rank, f"{m.scale:.6g}", "-" if m.baked == 1.0 else f"{m.baked:.6g}"]
                       for m in r.modules]))
    if not quiet:
        click.echo(f"wrote {len(r.modules)} LoRA pair(s), adapter.lora.alpha {r.alpha:.6g}, to {r.out} "
                   f"({r.bytes_written:,} bytes)", err=True)


def _folder_for_push(out: str, push: PushTarget | None, one_file: bool = False) -> None:
    """--push-to uploads a folder: refuse it, before any work, for an output that is one file (.gguf,
    .safetensors)."""
    if push is not None and (one_file or str(out).endswith(".gguf")):
        raise click.UsageError(f"--push-to uploads a folder; {out} is one file (upload it with "
                               "huggingface-cli upload)")


_MERGE_PARAMETERS = ("density", "epsilon", "gamma", "lambda_", "t", "normalize", "rescale", "int8_mask", "filter_wise")


@cli.command("merge-models")
@click.argument("args", nargs=-1, required=True, metavar="[BASE MODEL[:WEIGHT]...] OUT")
@click.option("--config", "config", default=None, metavar="YAML",
              help="A mergekit YAML file (merge_method, base_model, models, parameters, dtype, out_dtype), read "
                   "as mergekit reads it; then give only OUT.")
@click.option("--method", type=click.Choice(merge_method_names()), default="task_arithmetic", show_default=True,
              help="mergekit's merge method.")
@click.option("--density", type=float, default=None, help="Share of each change kept (0 < density ≤ 1).")
@click.option("--epsilon", type=float, default=None, help="DELLA: spread of keep probabilities around density.")
@click.option("--gamma", type=float, default=None, help="Breadcrumbs: share of largest changes dropped.")
@click.option("--lambda", "lambda_", type=float, default=None, help="Scale of the merged change.")
@click.option("--t", "t", type=float, default=None, help="slerp: position from BASE (0) to the model (1); "
                                                          "nearswap: the distance threshold.")
@click.option("--normalize/--no-normalize", default=None, help="Divide by the sum of weights (method's default).")
@click.option("--rescale/--no-rescale", default=None, help="Rescale what DARE/DELLA keep to the change's L1 norm.")
@click.option("--int8-mask", is_flag=True, default=None, help="Accepted as in mergekit (changes no number).")
@click.option("--filter-wise", is_flag=True, default=None, help="model_stock: one angle per row.")
@click.option("--seed", type=int, default=None, help="Seed of DARE's/DELLA's random masks (mergekit's "
                                                    "--random-seed): the same seed gives mergekit's masks.")
@dtype_option("the dtype the merge is computed in (the models' own, or the YAML's dtype); --dtype is "
              "mergekit's out_dtype")
@max_shard_size_option
@overwrite_option
@quiet_option
@workers_option
def merge_models(args: tuple[str, ...], config: str | None, method: str, seed: int | None, dtype: str | None,
                 max_shard_size: str | None, overwrite: bool, quiet: bool, workers: int | None,
                 **values: Any) -> None:
    """Merge whole models that share BASE (fine-tunes, or LoRA adapters of BASE, which contribute their
    change) into the new folder OUT, exactly as mergekit 0.1.5 does: each MODEL:WEIGHT's change from BASE
    combined by --method. `linear` averages the MODELs themselves (BASE only lends config and tokenizer);
    slerp and nearswap take one MODEL. Each output tensor is computed from the matching tensors of every
    input, one at a time."""
    parameters = {k.rstrip("_"): v for k, v in values.items() if k in _MERGE_PARAMETERS and v is not None}
    *inputs, out = args
    if config is not None:
        if inputs or parameters or method != "task_arithmetic":
            raise InputError("with --config, give only OUT: the YAML names the models, method and parameters")
        r = api.merge_models(out, config=config, seed=seed, dtype=dtype, max_shard_size=max_shard_size,
                         overwrite=overwrite, progress=not quiet, workers=workers)
    else:
        if len(inputs) < 2:
            raise InputError("give BASE, at least one MODEL and OUT (or --config mergekit.yml OUT)")
        r = api.merge_models(out, inputs[0], inputs[1:], method=method, parameters=parameters, seed=seed, dtype=dtype,
                         max_shard_size=max_shard_size, overwrite=overwrite, progress=not quiet, workers=workers)
    if not quiet:
        seed_note = f", seed {r.seed}" if r.seed is not None else ""
        click.echo(f"merged {r.models} models with {r.method} into {r.out}: {r.tensors} tensors, "
                   f"{r.bytes_written / 1e6:.1f} MB{seed_note}")
