"""``wsurgery merge-models``: the click command (the integrator registers it with ``cli.add_command``)."""

from __future__ import annotations

from typing import Any

import click

from ..commands import dtype_option, max_shard_size_option, overwrite_option, quiet_option, workers_option
from ..errors import InputError
from . import merge_models, method_names

_PARAMETERS = ("density", "epsilon", "gamma", "lambda_", "t", "normalize", "rescale", "int8_mask", "filter_wise")


@click.command("merge-models")
@click.argument("args", nargs=-1, required=True, metavar="[BASE MODEL[:WEIGHT]...] OUT")
@click.option("--config", "config", default=None, metavar="YAML",
              help="A mergekit YAML file (merge_method, base_model, models, parameters, dtype, out_dtype), read "
                   "as mergekit reads it; then give only OUT.")
@click.option("--method", type=click.Choice(method_names()), default="task_arithmetic", show_default=True,
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
def merge_models_command(args: tuple[str, ...], config: str | None, method: str, seed: int | None, dtype: str | None,
                         max_shard_size: str | None, overwrite: bool, quiet: bool, workers: int | None,
                         **values: Any) -> None:
    """Merge whole models that share BASE (fine-tunes, or LoRA adapters of BASE, which contribute their
    change) into the new folder OUT, exactly as mergekit 0.1.5 does: each MODEL:WEIGHT's change from BASE
    combined by --method. `linear` averages the MODELs themselves (BASE only lends config and tokenizer);
    slerp and nearswap take one MODEL. Each output tensor is computed from the matching tensors of every
    input, one at a time."""
    parameters = {k.rstrip("_"): v for k, v in values.items() if k in _PARAMETERS and v is not None}
    *inputs, out = args
    if config is not None:
        if inputs or parameters or method != "task_arithmetic":
            raise InputError("with --config, give only OUT: the YAML names the models, method and parameters")
        r = merge_models(out, config=config, seed=seed, dtype=dtype, max_shard_size=max_shard_size,
                         overwrite=overwrite, progress=not quiet, workers=workers)
    else:
        if len(inputs) < 2:
            raise InputError("give BASE, at least one MODEL and OUT (or --config mergekit.yml OUT)")
        r = merge_models(out, inputs[0], inputs[1:], method=method, parameters=parameters, seed=seed, dtype=dtype,
                         max_shard_size=max_shard_size, overwrite=overwrite, progress=not quiet, workers=workers)
    if not quiet:
        seed_note = f", seed {r.seed}" if r.seed is not None else ""
        click.echo(f"merged {r.models} models with {r.method} into {r.out}: {r.tensors} tensors, "
                   f"{r.bytes_written / 1e6:.1f} MB{seed_note}")
