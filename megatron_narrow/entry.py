"""The entry points' shell, shared by pretrain.py and finetune.py: one command line, DeepSpeed's CPU accelerator
without a GPU, exit codes for refused, stopped and failed runs, and an exit that avoids gloo's teardown abort."""

from __future__ import annotations

import argparse
import os
import sys


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


def run_entry(argv: list[str] | None, job, *, description: str, sections: str) -> int:
    """The entry points' shell: catch SIGTERM and Ctrl-C first (before the heavy imports: a signal during
    start-up is kept too), parse the command line, pick DeepSpeed's CPU accelerator without a GPU, run
    `job(args, stop)` (the loop polls `stop` and checkpoints). A refused run (`RunRefused`: bad config or data,
    raised around set-up only) is one `error:` line and exit code 2, a run stopped by train.nonfinite_loss=stop
    exit code 1, one stopped by SIGTERM or Ctrl-C after its checkpoint 75; any other error keeps its traceback.
    The process group is torn down whatever happened."""
    from megatron_narrow.training.stop import StopSignal

    stop = StopSignal().install()
    try:
        return _run_job(argv, job, stop, description=description, sections=sections)
    finally:
        stop.uninstall()


def _run_job(argv: list[str] | None, job, stop, *, description: str, sections: str) -> int:
    args = parse_args(argv, description=description, sections=sections)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from megatron_narrow.cli import EXIT_USAGE_ERROR, RunRefused, debug_requested, report_error
    from megatron_narrow.training.stop import EXIT_STOPPED, RunStopped

    try:
        job(args, stop)
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
