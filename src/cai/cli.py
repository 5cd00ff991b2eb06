"""The ``cai`` command line: a thin layer over library functions. User errors print one line and exit 2.

Every command lives in a module of ``cai.commands`` named for what it holds; each module adds its commands
through ``register(app)``, and all of them are registered here, so ``cai.cli.app`` is the whole command line."""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys

import typer
from rich.console import Console
from typer.core import TyperGroup

from cai.errors import UserError


class _AlphabeticalGroup(TyperGroup):
    """`cai --help` lists commands by name, whichever module registered them."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(self.commands)


app = typer.Typer(
    help="cai-lab: Constitutional AI and alignment-robustness experiments on open language models.",
    cls=_AlphabeticalGroup,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(stderr=True)


@app.callback()
def _global(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def register_commands(root: typer.Typer) -> None:
    """Add the commands of every module in ``cai.commands`` to ``root``, each through its ``register(root)``."""
    from cai import commands

    for module in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"cai.commands.{module}").register(root)


register_commands(app)


def main() -> None:
    """Entry point: one line and exit 2 for user errors; bugs still raise."""
    try:
        app()
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
