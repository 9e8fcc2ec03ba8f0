"""The entry points' shell, shared by pretrain.py and finetune.py: one command line, DeepSpeed's CPU accelerator
without a GPU, exit codes for refused, stopped and failed runs, and an exit that avoids gloo's teardown abort."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable


def parse_args(argv: list[str] | None = None, *, description: str,
               sections: str = "model, data, parallel, train") -> argparse.Namespace:
    """The command line shared by pretraining and fine-tuning (launchers add --local_rank)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML run config (sections {sections})")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", required=True,
                        help="DeepSpeed JSON (ZeRO stage, offload, precision sections); see ds_configs/")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a refused run (also MEGATRON_NARROW_DEBUG=1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def run_entry(argv: list[str] | None, entry_point: Callable[[], tuple[Callable, Callable]], *, description: str,
              sections: str) -> int:
    """The entry points' shell: catch SIGTERM and Ctrl-C first (before the heavy imports: a signal during
    start-up is kept too), parse the command line, pick DeepSpeed's CPU accelerator without a GPU, then
    `entry_point()` imports and returns (load_config(path, overrides), run(config, ds_config_path, stop)); the
    loop polls `stop` and checkpoints. A refused run (`RunRefused`: bad config or data, raised around set-up
    only) is one `error:` line and exit code 2, a run stopped by train.nonfinite_loss=stop exit code 1, one stopped
    by SIGTERM or Ctrl-C after its checkpoint 75; any other error keeps its traceback. The process group is torn
    down whatever happened."""
    from megatron_narrow.training.stop import StopSignal

    stop = StopSignal().install()
    try:
        return _run_job(argv, entry_point, stop, description=description, sections=sections)
    finally:
        stop.uninstall()


def _run_job(argv: list[str] | None, entry_point, stop, *, description: str, sections: str) -> int:
    args = parse_args(argv, description=description, sections=sections)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from megatron_narrow.cli import EXIT_USAGE_ERROR, RunRefused, debug_requested, refusing, report_error
    from megatron_narrow.training.stop import EXIT_STOPPED, RunStopped

    try:
        load_config, run = entry_point()
        with refusing():
            config = load_config(args.config, args.overrides)
        run(config, args.deepspeed_config, stop)
    except RunRefused as error:
        report_error(error, debug=args.debug or debug_requested([]))
        return EXIT_USAGE_ERROR
    except RunStopped:  # the loop checkpointed and said so
        return EXIT_STOPPED
    except FloatingPointError as error:  # train.nonfinite_loss=stop: a run that failed, not a refused one
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


ENTRY_POINTS = {
    "pretrain": ("model, data, parallel, train", "megatron_narrow.config:load_run_config",
                 "megatron_narrow.training.loop:pretrain"),
    "finetune": ("task, model, train", "megatron_narrow.tasks.config:load_finetune_config",
                 "megatron_narrow.tasks.loop:finetune"),
}
"""Each entry point's config sections, config loader and loop (imported once the stop signal is installed)."""


def _imported(name: str) -> Callable:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def script_main(name: str, description: str) -> Callable[[list[str] | None], int]:
    """The `main(argv) -> exit code` of entry point `name` (pretrain.py, finetune.py)."""
    sections, load_config, loop = ENTRY_POINTS[name]

    def main(argv: list[str] | None = None) -> int:
        return run_entry(argv, lambda: (_imported(load_config), _imported(loop)), description=description,
                         sections=sections)

    return main


def exit_now(code: int) -> None:
    """End the process without Python's finalization. gloo's worker threads can still be dropping the last
    reference to a tensor of the final collective; during finalization that needs the GIL, which Python
    refuses by ending the thread, and the C++ runtime aborts the rank (SIGABRT after a successful run,
    seen in a few launches per hundred). Our files are closed by then; stdio and logging are flushed, and
    MPI (mpirun launches, through mpi4py) is finalized as mpirun requires."""
    import logging

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
