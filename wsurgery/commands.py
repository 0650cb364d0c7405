"""The commands of the ``wsurgery`` command line: a thin layer over the Python API.

``wsurgery.cli.main`` imports this module (and with it torch) only after installing its signal handlers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__, api
from .checkpoint.output import atomic_output_file, check_output_file, check_output_path, check_written_file
from .cli import _fail, _one_line
from .describe import format_text, inspect
from .convert.convert import TARGETS
from .convert.combine import adapter_with_weight
from .engine import Result
from .errors import InputError, NotExpressible
from .hub import PushTarget, push_after, push_options, redacted_command, report_push
from .methods import not_mergeable
from .support import support_markdown, support_rows


_OVERWRITE_HELP = ("Replace OUT if it exists and holds only what wsurgery writes: weights, index, config, tokenizer "
                   "and card files (or one regular .gguf file).")

common_output = [
    click.option("--dtype", default=None, help="Output dtype for floating-point tensors (float32, float16, bfloat16). "
                                               "Default: keep each tensor's dtype."),
    click.option("--max-shard-size", default=None, help="Re-shard the output (e.g. 5GB). Default: the base's sharding."),
    click.option("--scale", default=1.0, type=float, show_default=True, help="Merge scale·ΔW instead of ΔW."),
    click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    click.option("--task-id", type=int, default=None, help="Poly: merge the routed change for this task."),
    click.option("--mha-single-out-proj", is_flag=True, default=None,
                 help="LoRA on nn.MultiheadAttention: add the out_proj change once (PEFT adds it twice)."),
    click.option("--experts-transposed/--experts-not-transposed", default=None,
                 help="LoRA on square fused-expert stacks (PEFT >= 0.19): the stack is stored (E, in, out) / "
                      "(E, out, in); needed only where the files cannot tell."),
]


def _options(task_id: int | None, mha_single_out_proj: bool | None, experts_transposed: bool | None) -> dict:
    return {"task_id": task_id, "mha_single_out_proj": mha_single_out_proj, "experts_transposed": experts_transposed}


def _local(*specs: str | None) -> list[Path]:
    """The arguments that name local files or folders (the others are Hub repo ids)."""
    return [Path(s) for s in specs if s is not None and os.path.lexists(s)]


def _check_out(out: str, inputs: list[Path], overwrite: bool, one_file: bool = False) -> None:
    """Refuse a bad OUT before any work; the API checks it again against the inputs it resolved."""
    (check_output_file if one_file else check_output_path)(Path(out), inputs, overwrite, whole_folders=True)


def _write_side_file(path: str, write: Callable[[Path], None]) -> None:
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
    for option in reversed(common_output):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsurgery")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
def cli(debug: bool) -> None:
    """Surgery on model weight files: merge, unmerge and inspect adapters, tensor by tensor."""


@cli.command("inspect")
@click.argument("path")
@click.option("--base", default=None, help="With an adapter: the base checkpoint, to show the exact tensors changed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(path: str, base: str | None, as_json: bool) -> None:
    """Show what is in a checkpoint (PATH: folder, file or repo id) or a PEFT adapter."""
    info = inspect(path, base=base)
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a Markdown table.")
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
@click.option("--requantize", is_flag=True, help="4-bit base: store the changed weights in 4-bit again "
                                                  "(default: write the merge in 16 bit).")
@click.option("--through-nf4", is_flag=True, help="16-bit base: merge into dequant(quant(W)) in NF4, the weights "
                                                   "a QLoRA adapter was trained against.")
@click.option("--verify", "then_verify", is_flag=True, help="Run `wsurgery verify` on the result.")
@click.option("--type", "gguf_type", default=None, metavar="GGML_TYPE",
              help="GGUF output (OUT ends in .gguf): store the changed tensors in this type (f16, q8_0, q4_0...). "
                   "Default: each tensor's own type.")
@push_options
def merge(base: str, adapters: tuple[str, ...], out: str, dtype, max_shard_size, scale, overwrite, quiet,
          task_id, mha_single_out_proj, experts_transposed, requantize: bool, through_nf4: bool, then_verify: bool,
          gguf_type: str | None, push: PushTarget | None) -> None:
    """Merge the ADAPTERs into BASE, in order, and write the merged model to the new folder OUT.

    ADAPTER:WEIGHT merges W + WEIGHT·ΔW (e.g. style-lora:0.5); a trailing ':<number>' is a weight only
    where what comes before it is an existing path or a Hub repo id. BASE may be a llama.cpp .gguf file;
    an OUT ending in .gguf is then written as one GGUF file with BASE's metadata and tokenizer."""
    _folder_for_push(out, push)
    options = _options(task_id, mha_single_out_proj, experts_transposed)
    weighted = [adapter_with_weight(a) for a in adapters]
    _check_out(out, _local(base, *(a for a, _ in weighted)), overwrite, one_file=Path(out).suffix == ".gguf")
    if then_verify and (requantize or through_nf4):
        raise InputError("--verify compares the merge with the base's own weights; with --requantize or "
                         "--through-nf4 the output holds rounded weights on purpose: verify without them")
    with _closing_progress_bars():
        r = api.merge(base, weighted, out, scale=scale, dtype=dtype, max_shard_size=max_shard_size,
                      overwrite=overwrite, progress=not quiet, options=options, requantize=requantize,
                      through_nf4=through_nf4, command=_command_line(), gguf_type=gguf_type)
    _report("merged", r, quiet)
    if then_verify:
        with _closing_progress_bars():
            report = api.verify(base, weighted, out, scale=scale, progress=not quiet, options=options)
        _show_verify(report, None, False)
    push_after(r.out, push, progress=not quiet)  # the card reads config.json's "wsurgery" record


@cli.command()
@click.argument("merged")
@click.argument("adapter")
@click.argument("out")
@with_output_options
@push_options
def unmerge(merged: str, adapter: str, out: str, dtype, max_shard_size, scale, overwrite, quiet, task_id,
            mha_single_out_proj, experts_transposed, push: PushTarget | None) -> None:
    """Subtract ADAPTER from the merged model MERGED and write the result to the new folder OUT."""
    _check_out(out, _local(merged, adapter), overwrite)
    with _closing_progress_bars():
        r = api.unmerge(merged, adapter, out, scale=scale, dtype=dtype, max_shard_size=max_shard_size,
                        overwrite=overwrite, progress=not quiet,
                        options=_options(task_id, mha_single_out_proj, experts_transposed), command=_command_line())
    _report("unmerged", r, quiet)
    push_after(r.out, push, progress=not quiet)  # the card reads config.json's "wsurgery" record


@cli.command("push")
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it does not exist yet).")
@click.option("--revision", metavar="BRANCH", default=None, help="Push to this branch (created if missing) or refs/pr/N.")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", default=None, help="The commit's title.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN, else the stored login). Never printed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
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
@click.option("--report", is_flag=True, help="Print each weight's quantization error (RMSE, SNR, max abs) and bytes saved.")
@click.option("--dtype", default=None, help="dtype of the tensors left unquantized (and recorded for the 4-bit ones).")
@click.option("--max-shard-size", default=None, help="Re-shard the output (e.g. 5GB). Default: the source's sharding.")
@click.option("--gguf-type", default=None, metavar="GGML_TYPE",
              help="SRC is a .gguf file: requantize its weight matrices to this type (q8_0, q4_0, f16...) in the "
                   "GGUF file OUT instead.")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@push_options
def quantize_cmd(src: str, out: str, quant_type: str, no_double_quant: bool, blocksize: int, compute_dtype: str | None,
                 skip_modules: tuple[str, ...], report: bool, dtype: str | None, max_shard_size: str | None,
                 gguf_type: str | None, overwrite: bool, quiet: bool, push: PushTarget | None) -> None:
    """Store SRC's Linear weights in bitsandbytes 4-bit (loadable by transformers) in the new folder OUT;
    with --gguf-type, requantize the GGUF file SRC into the GGUF file OUT."""
    _folder_for_push(out, push)
    _check_out(out, _local(src), overwrite, one_file=gguf_type is not None)
    if gguf_type is not None:
        with _closing_progress_bars():
            r, kept = api.quantize_gguf(src, out, gguf_type, overwrite=overwrite, progress=not quiet)
        if kept:
            _notes([f"{name}: kept as it was: its rows do not divide into {gguf_type} blocks" for name in kept])
        _report("quantized", r, quiet)
        return
    with _closing_progress_bars():
        r, errors = api.quantize(src, out, quant_type=quant_type, blocksize=blocksize, double_quant=not no_double_quant,
                                 compute_dtype=compute_dtype, skip_modules=skip_modules, dtype=dtype,
                                 max_shard_size=max_shard_size, overwrite=overwrite, progress=not quiet,
                                 report=report, command=_command_line())
    if errors is not None:
        click.echo(errors.format())
    _report("quantized", r, quiet)
    push_after(r.out, push, progress=not quiet)


@cli.command("dequantize")
@click.argument("src")
@click.argument("out")
@click.option("--dtype", default=None, help="Output dtype. Default: each weight's recorded dtype.")
@click.option("--max-shard-size", default=None, help="Re-shard the output (e.g. 5GB). Default: the source's sharding.")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@push_options
def dequantize_cmd(src: str, out: str, dtype: str | None, max_shard_size: str | None, overwrite: bool,
                   quiet: bool, push: PushTarget | None) -> None:
    """Write a bitsandbytes 4-bit checkpoint, or a llama.cpp .gguf file, SRC back as plain tensors (safetensors,
    Hugging Face names) in the new folder OUT."""
    _check_out(out, _local(src), overwrite)
    with _closing_progress_bars():
        r = api.dequantize(src, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                           progress=not quiet, command=_command_line())
    _report("dequantized", r, quiet)
    push_after(r.out, push, progress=not quiet)


@cli.command("verify")
@click.argument("paths", nargs=-1, required=True, metavar="BASE ADAPTER MERGED | ORIGINAL QUANTIZED --quantized")
@click.option("--quantized", is_flag=True, help="Check a 4-bit checkpoint against the one it was quantized from.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the forward passes run (auto: CUDA when there is one).")
@click.option("--tokens", type=click.IntRange(1), default=64, show_default=True, help="Input rows per module.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs.")
@click.option("--rtol", type=float, default=None,
              help="Allowed error per output, relative to the layer run on magnitudes |W'|·|x|. Default by dtype.")
@click.option("--atol", type=float, default=0.0, show_default=True, help="Allowed absolute error per output.")
@click.option("--scale", default=1.0, type=float, show_default=True, help="The --scale the merge used.")
@click.option("--json", "json_path", default=None, help="Write the full report to this JSON file.")
@click.option("--all", "show_all", is_flag=True, help="List every module, not only failures.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--task-id", type=int, default=None, help="Poly: the task the merge used.")
@click.option("--mha-single-out-proj", is_flag=True, default=None, help="As given to merge.")
@click.option("--experts-transposed/--experts-not-transposed", default=None, help="As given to merge.")
def verify_cmd(paths: tuple[str, ...], quantized: bool, device: str, tokens: int, seed: int, rtol: float | None,
               atol: float, scale: float, json_path: str | None, show_all: bool, quiet: bool, task_id,
               mha_single_out_proj, experts_transposed) -> None:
    """Check with forward passes that MERGED computes what BASE + ADAPTER compute, or (--quantized) that
    QUANTIZED stays within 4-bit quantization error of ORIGINAL. Exit 0 only if every check passes."""
    want = 2 if quantized else 3
    if len(paths) != want:
        raise click.UsageError(f"expected {'ORIGINAL QUANTIZED' if quantized else 'BASE ADAPTER MERGED'}, "
                               f"got {len(paths)} path(s)")
    if json_path:
        check_written_file(Path(json_path), "--json", _local(*paths))
    with _closing_progress_bars():
        if quantized:
            report = api.verify_quantized(*paths, device=device, tokens=tokens, seed=seed, progress=not quiet)
        else:
            report = api.verify(*paths, scale=scale, device=device, tokens=tokens, seed=seed, rtol=rtol,
                                atol=atol, progress=not quiet,
                                options=_options(task_id, mha_single_out_proj, experts_transposed))
    _show_verify(report, json_path, show_all)


def _show_verify(report, json_path: str | None, show_all: bool) -> None:
    from .verify import format_report

    if json_path:
        _write_side_file(json_path, report.write_json)
    click.echo(format_report(report, everything=show_all))
    if not report.passed:
        names = ", ".join(c.module for c in report.failures[:3])
        more = f" and {len(report.failures) - 3} more" if len(report.failures) > 3 else ""
        _fail(f"verify failed: {names}{more} differ from the unmerged forward")


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
@click.option("--device", default="auto", show_default=True, help="Where the SVDs run: auto (CUDA if any), cpu, cuda.")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="auto: randomized (torch.svd_lowrank) for --rank on large matrices, exact otherwise.")
@click.option("--plot", default=None, metavar="PNG", help="Draw the singular-value spectra of a few modules "
                                                          "(needs matplotlib: pip install 'wsurgery[plot]').")
@click.option("--report", "report_path", default=None, metavar="JSON", help="Write the per-module report as JSON.")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no per-module table.")
@push_options
def extract(base: str, tuned: str, out: str, rank: int | None, energy: float | None, max_error: float | None,
            targets: str | None, device: str, svd: str, plot: str | None, report_path: str | None, overwrite: bool,
            quiet: bool, push: PushTarget | None) -> None:
    """Extract the PEFT LoRA closest to TUNED − BASE (truncated SVD per weight) into the new folder OUT."""
    inputs = _local(base, tuned)
    _check_out(out, inputs, overwrite)
    for path, option in ((plot, "--plot"), (report_path, "--report")):
        if path:
            check_written_file(Path(path), option, inputs, Path(out))
    with _closing_progress_bars():
        r = api.extract(base, tuned, out, rank=rank, energy=energy, max_error=max_error, targets=targets,
                        device=device, svd=svd, overwrite=overwrite, progress=not quiet, plot=plot,
                        command=_command_line())
    if report_path:
        _write_side_file(report_path, lambda p: p.write_text(json.dumps(r.to_dict(), indent=2)))
    if not quiet:
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


@cli.command()
@click.argument("out")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("--rank", type=int, default=None, help="Re-compress each module to at most this rank (best "
                                                     "approximation); needed for adapters that are not LoRAs.")
@click.option("--base", default=None, help="The base checkpoint: needed where a change depends on W; also maps "
                                           "differently named modules onto the base's names.")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no per-module table.")
@push_options
def combine(out: str, adapters: tuple[str, ...], rank: int | None, base: str | None, overwrite: bool,
            quiet: bool, push: PushTarget | None) -> None:
    """Write one LoRA whose change is the weighted sum of the ADAPTERs' changes to the new folder OUT.

    ADAPTER:WEIGHT scales that adapter's change (e.g. style-lora:0.5)."""
    weighted = [adapter_with_weight(a) for a in adapters]
    _check_out(out, _local(base, *(a for a, _ in weighted)), overwrite)
    with _closing_progress_bars():
        r = api.combine(out, weighted, rank=rank, base=base, overwrite=overwrite,
                        progress=not quiet, command=_command_line())
    if not quiet:
        click.echo(_table(["module", "kind", "rank", "how", "rel_error"],
                          [[m.module, m.kind, m.rank or "-", m.how, f"{m.rel_error:.3e}"] for m in r.modules]))
    _notes(r.notes)
    if not quiet:
        click.echo(f"combined {len(adapters)} adapter(s) into {len(r.modules)} module(s); wrote {r.out}", err=True)
    push_after(r.out, push, progress=not quiet)


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


@cli.command("convert")
@click.argument("adapter")
@click.argument("out")
@click.option("--to", "to", required=True, type=click.Choice(sorted([*TARGETS, "gguf-lora"])),
              help="The PEFT method to write, or gguf-lora: a llama.cpp LoRA adapter (.gguf) for --base (the .gguf "
                   "file it will run on, or the Hugging Face checkpoint that file was converted from).")
@click.option("--base", default=None,
              help="The base checkpoint: needed where the change depends on W (DoRA, OFT, BOFT, HRA, IA3, MiSS bat...), "
                   "for --to oft/boft, and for adapters that do not record their layers' shapes (all but LoRA, VB-LoRA).")
@click.option("--rank", type=int, default=None,
              help="LoRA/LoHa/LoKr rank (default: each module's exact rank); MiSS/Bone's r (required).")
@click.option("--block-size", type=int, default=None, help="OFT/BOFT block size (default 32 / 4).")
@click.option("--butterfly-factors", type=int, default=None,
              help="BOFT butterfly factors (default 1; PEFT keeps more only where its CUDA extension builds).")
@click.option("--force", is_flag=True, help="Write even where a module's relative error reaches 0.99.")
@click.option("--type", "gguf_type", default="f32", show_default=True,
              help="--to gguf-lora: the tensor type of the adapter (f32, f16, bf16, q8_0).")
@click.option("--merge-into", default=None, metavar="MERGED",
              help="--to gguf-lora: where llama.cpp's LoRA format cannot carry the adapter (DoRA, modules_to_save, "
                   "biases...), merge it into --base and write the model MERGED (a .gguf file) instead of OUT.")
@click.option("--overwrite", is_flag=True, help=_OVERWRITE_HELP)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary (the error table is still printed).")
@push_options
def convert_cmd(adapter: str, out: str, to: str, base: str | None, rank: int | None, block_size: int | None,
                butterfly_factors: int | None, force: bool, gguf_type: str, merge_into: str | None, overwrite: bool,
                quiet: bool, push: PushTarget | None) -> None:
    """Rewrite ADAPTER as another PEFT method in the new folder OUT: exact where the method can express the
    change, its best approximation otherwise. Prints every module's relative error.

    --to gguf-lora writes a PEFT LoRA as the llama.cpp LoRA adapter file OUT (.gguf) for --base."""
    _folder_for_push(out, push, one_file=to == "gguf-lora")
    if to == "gguf-lora" and base is None:
        raise click.UsageError("--to gguf-lora needs --base: the .gguf file the adapter will run on, or the "
                               "Hugging Face checkpoint it was converted from")
    if to != "gguf-lora" and merge_into is not None:
        raise click.UsageError("--merge-into goes with --to gguf-lora")
    inputs = _local(adapter, base)
    _check_out(out, inputs, overwrite, one_file=to == "gguf-lora")
    if merge_into is not None:
        _check_out(merge_into, inputs, overwrite, one_file=Path(merge_into).suffix == ".gguf")
    if to == "gguf-lora":
        _gguf_lora(adapter, out, base, gguf_type, merge_into, overwrite, quiet)
        return
    with _closing_progress_bars():
        c = api.convert(adapter, out, to=to, base=base, rank=rank, block_size=block_size,
                        butterfly_factors=butterfly_factors, force=force, overwrite=overwrite, progress=not quiet,
                        command=_command_line())
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


def _gguf_lora(adapter: str, out: str, base: str, gguf_type: str, merge_into: str | None, overwrite: bool,
               quiet: bool) -> None:
    try:
        r = api.export_gguf_lora(adapter, out, base, gguf_type=gguf_type, overwrite=overwrite)
    except NotExpressible as e:
        if merge_into is None:
            raise
        click.echo(f"wsurgery: note: {_one_line(e.problem)}; merging it into {base} instead (--merge-into)", err=True)
        with _closing_progress_bars():
            result = api.merge(base, adapter, merge_into, overwrite=overwrite, progress=not quiet,
                               command=_command_line())
        _report("merged", result, quiet)
        return
    if not quiet:
        click.echo(_table(["module", "tensor", "rank", "scale", "scale baked into B"],
                          [[m.module, m.tensor, m.rank, f"{m.scale:.6g}", "-" if m.baked == 1.0 else f"{m.baked:.6g}"]
                           for m in r.modules]))
        click.echo(f"wrote {len(r.modules)} LoRA pair(s), adapter.lora.alpha {r.alpha:.6g}, to {r.out} "
                   f"({r.bytes_written:,} bytes)", err=True)


def _folder_for_push(out: str, push: PushTarget | None, one_file: bool = False) -> None:
    """--push-to uploads a folder: refuse it, before any work, for an output that is one .gguf file."""
    if push is not None and (one_file or str(out).endswith(".gguf")):
        raise click.UsageError(f"--push-to uploads a folder; {out} is one .gguf file (upload it with "
                               "huggingface-cli upload)")
