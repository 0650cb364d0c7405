"""The ``wsurgery`` command line: a thin layer over the Python API."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from . import __version__, api
from .describe import format_text, inspect
from .engine import Result
from .errors import WsurgeryError
from .methods import not_mergeable
from .support import support_markdown, support_rows



common_output = [
    click.option("--dtype", default=None, help="Output dtype for floating-point tensors (float32, float16, bfloat16). "
                                               "Default: keep each tensor's dtype."),
    click.option("--max-shard-size", default=None, help="Re-shard the output (e.g. 5GB). Default: the base's sharding."),
    click.option("--scale", default=1.0, type=float, show_default=True, help="Merge scale·ΔW instead of ΔW."),
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
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
@click.argument("adapter")
@click.argument("out")
@with_output_options
def merge(base: str, adapter: str, out: str, dtype, max_shard_size, scale, overwrite, quiet, task_id,
          mha_single_out_proj, experts_transposed) -> None:
    """Merge ADAPTER into BASE and write the merged model to the new folder OUT."""
    with _closing_progress_bars():
        r = api.merge(base, adapter, out, scale=scale, dtype=dtype, max_shard_size=max_shard_size,
                      overwrite=overwrite, progress=not quiet, options=_options(task_id, mha_single_out_proj, experts_transposed))
    _report("merged", r, quiet)


@cli.command()
@click.argument("merged")
@click.argument("adapter")
@click.argument("out")
@with_output_options
def unmerge(merged: str, adapter: str, out: str, dtype, max_shard_size, scale, overwrite, quiet, task_id,
            mha_single_out_proj, experts_transposed) -> None:
    """Subtract ADAPTER from the merged model MERGED and write the result to the new folder OUT."""
    with _closing_progress_bars():
        r = api.unmerge(merged, adapter, out, scale=scale, dtype=dtype, max_shard_size=max_shard_size,
                        overwrite=overwrite, progress=not quiet, options=_options(task_id, mha_single_out_proj, experts_transposed))
    _report("unmerged", r, quiet)


@cli.command("verify")
@click.argument("base")
@click.argument("adapter")
@click.argument("merged")
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
def verify_cmd(base: str, adapter: str, merged: str, device: str, tokens: int, seed: int, rtol: float | None,
               atol: float, scale: float, json_path: str | None, show_all: bool, quiet: bool, task_id,
               mha_single_out_proj, experts_transposed) -> None:
    """Check with forward passes that MERGED computes what BASE + ADAPTER compute (exit 0 only if so)."""
    with _closing_progress_bars():
        report = api.verify(base, adapter, merged, scale=scale, device=device, tokens=tokens, seed=seed, rtol=rtol,
                            atol=atol, progress=not quiet,
                            options=_options(task_id, mha_single_out_proj, experts_transposed))
    _show_verify(report, json_path, show_all)


def _show_verify(report, json_path: str | None, show_all: bool) -> None:
    from .verify import format_report

    if json_path:
        report.write_json(json_path)
    click.echo(format_report(report, everything=show_all))
    if not report.passed:
        names = ", ".join(c.module for c in report.failures[:3])
        more = f" and {len(report.failures) - 3} more" if len(report.failures) > 3 else ""
        _fail(f"verify failed: {names}{more} differ from the unmerged forward")


def _report(verb: str, r: Result, quiet: bool) -> None:
    """Notes always (they can matter, e.g. an approximate inverse); the summary unless --quiet.

    Notes that differ only in module and numbers are told once, with how many modules they concern
    (the full list is in the API's ``Result.notes``).
    """
    groups: dict[str, list[str]] = {}
    for note in r.notes:
        groups.setdefault(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", note.split(": ", 1)[-1]), []).append(note)
    for lines in groups.values():
        shown = lines[0] if len(lines) == 1 else f"{len(lines)} modules, e.g. {lines[0]}"
        click.echo(f"wsurgery: note: {shown}", err=True)
    if not quiet:
        click.echo(f"{verb} {r.modules} module(s), {r.changed_tensors} tensor(s) changed of {r.tensors}; "
                   f"wrote {r.out} ({len(r.shards)} shard(s), {r.bytes_written:,} bytes)", err=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"wsurgery: {_one_line(message)}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors become one line on stderr and a non-zero exit, unless --debug."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="wsurgery", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail("interrupted; no output was left behind", 130)
    except WsurgeryError as e:
        if debug:
            raise
        _fail(f"error: {e}")
    except OSError as e:  # disk full, permissions...: about the user's system, not a bug
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"error: {where}{e.strerror or e}")
    except Exception as e:  # a bug: still one line
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for details)")


if __name__ == "__main__":
    main()
