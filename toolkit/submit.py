"""The command line: `python -m toolkit.submit STAGE [flags]` (also installed as `lingogap`).

This module parses, plans and submits; the work itself lives in `jobs/`. Flags are generated from
the `toolkit.config` dataclasses, so `--help`, YAML keys and the Python API never disagree; the
sub-commands and the config sections each takes come from `toolkit.commands` (one per stage of the
registry, `toolkit.stages`, plus `pipeline`, `status` and `cancel`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from typing import Any

from rich.console import Console

from toolkit import __version__, cluster, commands
from toolkit.config import SECTIONS, Config
from toolkit.errors import UserError
from toolkit.output import quiet_libraries

PREFIX = {"sae": "sae-"}
# choices that registries hold rather than the config (which imports no executor)
REGISTERED_CHOICES = {"run.executor": cluster.executor_names}


def flag_of(section: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + PREFIX.get(section, "") + f.name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lingogap", description="Multilingual SAE activation gaps, activation-aware LoRA, benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"lingogap {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for command in commands.COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
        p.add_argument("--config", metavar="YAML", help="YAML config file (CLI flags override it)")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, run nothing")
        p.add_argument("--debug", action="store_true", help="show tracebacks; run jobs in-process")
        for section in ("run", *command.sections):
            _add_section(p.add_argument_group(section), section)
    return parser


def _add_section(group: argparse._ArgumentGroup, section: str) -> None:
    """One flag per field of a config section, named, typed and explained by the field."""
    for f in dataclasses.fields(SECTIONS[section]):
        kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "help": f.metadata["help"],
                                  "default": argparse.SUPPRESS}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(f.default)
            kwargs["metavar"] = f.name.upper()
            choices = f.metadata.get("choices")
            if kwargs["dest"] in REGISTERED_CHOICES:
                choices = REGISTERED_CHOICES[kwargs["dest"]]()
                kwargs["help"] += f" ({', '.join(choices)})"
            if choices:
                kwargs["choices"] = choices
        group.add_argument(flag_of(section, f), **kwargs)


def config_from_args(args: argparse.Namespace) -> Config:
    cli: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            cli.setdefault(section, {})[name] = value
    return Config.build(cli, getattr(args, "config", None))


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()  # before any library is imported: ours is the only progress display
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    console = Console(stderr=True)
    cfg = None
    try:
        cfg = config_from_args(args)
        if debug:
            cfg.run.executor = "debug" if cfg.run.executor == "local" else cfg.run.executor
        command = commands.get(args.stage)
        commands.preflight(cfg, command)
        if getattr(args, "dry_run", False):
            from toolkit import plan

            plan.show(cfg, args.stage, Console())
            if command.stages:
                cluster.describe(cfg, args.stage, Console())
            return 0
        return command.run(cfg, console)
    except UserError as exc:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except OSError as exc:
        message = environment_error(exc, cfg, args.stage)
        if debug or message is None:
            raise
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as exc:
        from toolkit.cluster.local import Terminated

        if isinstance(exc, Terminated):
            console.print("[yellow]terminated[/]; rerun the same command to resume")
            return 143
        console.print("[yellow]interrupted[/]; rerun the same command to resume")
        return 130


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_WRITE = {errno.EACCES: "permission denied", errno.EROFS: "read-only filesystem", errno.EPERM: "not permitted"}


def environment_error(exc: OSError, cfg: Config | None, stage: str = "") -> str | None:
    """One message for a full disk or an unwritable place; None for any other OSError (a bug shows in full).
    HDF5 reports a full disk inside its message, without an errno."""
    where = exc.filename or (cfg.run_dir if cfg else "the run folder")
    if exc.errno in NO_SPACE or "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
        return no_space_message(cfg if stage in ("extract", "pipeline") else None, where)
    if exc.errno in NO_WRITE:
        return (f"cannot use {where}: {NO_WRITE[exc.errno]}; fix its permissions or choose another --run folder, "
                "then rerun the same command (it resumes)")
    return None


def no_space_message(cfg: Config | None, where: object) -> str:
    """With an extraction's config, how much it needs (the --dry-run estimate) and how much is free."""
    from toolkit import plan

    need = plan.disk_estimate(cfg) if cfg else None
    needs = (f": this run needs about {plan.human_bytes(need)} (the --dry-run estimate), "
             f"{plan.human_bytes(plan.free_bytes(cfg.run_dir))} is free there") if cfg and need else ""
    return (f"the disk is full (writing {where}){needs}. Free some space (or choose another --run folder) and rerun "
            "the same command: it resumes from what was committed")


if __name__ == "__main__":
    sys.exit(main())
