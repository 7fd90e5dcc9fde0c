"""One way to turn a documented function into a `stagewise <command>` with `-c/--config` YAML files."""

from __future__ import annotations

from typing import Any, Callable


def run_function(function: Callable[..., Any], args: list[str] | None, prog: str) -> Any:
    """Parse ``args`` (``-c file.yaml`` any number of times, then ``--key value`` overrides) into the
    arguments of ``function`` (types and help from its signature and docstring) and call it."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    doc = (function.__doc__ or "").strip().splitlines()
    parser = ArgumentParser(prog=prog, description=doc[0] if doc else None, exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config; repeat to compose")
    parser.add_function_arguments(function, as_group=False)
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in init.items() if k not in ("config", "__path__")}
    return function(**kwargs)
