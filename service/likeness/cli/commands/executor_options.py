"""`--executor local|ray --ray-address ADDR --workers N --gpus-per-worker G` for generate and curate.

Not a command module (not in ``likeness.cli.main.COMMAND_MODULES``): the commands
that can spread their shards over workers add these options and turn them
into an executor with :func:`executor_from_args`.
"""

from __future__ import annotations

import argparse
from typing import Any

from likeness.errors import InvalidInput


def add_executor_options(p: argparse.ArgumentParser) -> None:
    """Add the executor options to a subcommand's parser."""
    g = p.add_argument_group("executor (docs/scaling.md)")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: shards on Ray actors, one loaded model each")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help='Ray cluster: "auto" (the running cluster on this node), "ray://HEAD:10001" (from outside); '
                        "unset starts a local one; needs --executor ray")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray actors to start (default 2; one per GPU with --gpus-per-worker 1); needs --executor ray")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per Ray actor (default 0: CPU; 1 pins one actor per GPU); needs --executor ray")


def executor_config_from_args(args: argparse.Namespace) -> Any:
    """The ExecutorConfig the options name; InvalidInput for a combination that cannot work."""
    from likeness.config import from_dict
    from likeness.executor import ExecutorConfig

    kind = getattr(args, "executor", "local") or "local"
    ray_only = {"--ray-address": args.ray_address, "--workers": args.workers, "--gpus-per-worker": args.gpus_per_worker}
    if kind == "local":
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            raise InvalidInput(f"{', '.join(given)} only apply to the Ray executor; add --executor ray "
                               f"or drop {'them' if len(given) > 1 else 'it'}")
        return ExecutorConfig(kind="local")
    if args.workers is not None and args.workers < 1:
        raise InvalidInput(f"--workers {args.workers}: must be at least 1 (one actor per GPU is typical)")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise InvalidInput(f"--gpus-per-worker {args.gpus_per_worker:g}: must not be negative (0 = CPU actors)")
    if args.ray_address is not None and not args.ray_address.strip():
        raise InvalidInput('--ray-address is empty; use "auto", "HOST:6379" or "ray://HOST:10001", or leave it out')
    data: dict[str, Any] = {"kind": kind}
    if args.ray_address is not None:
        data["ray_address"] = args.ray_address.strip()
    if args.workers is not None:
        data["workers"] = args.workers
    if args.gpus_per_worker is not None:
        data["gpus_per_worker"] = float(args.gpus_per_worker)
    return from_dict(ExecutorConfig, data, "executor")


def executor_from_args(args: argparse.Namespace) -> Any:
    """None for ``--executor local`` (the stage runs in this process as it always did), else a RayExecutor."""
    from likeness.executor import make_executor

    cfg = executor_config_from_args(args)
    return None if cfg.kind == "local" else make_executor(cfg)
