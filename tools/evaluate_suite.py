#!/usr/bin/env python
"""Fine-tune checkpoints on a suite of tasks (every task x learning rate x seed, each an ordinary fine-tuning
run) and report the table the papers report: per task the mean +- std over seeds at the learning rate best on
validation, and the average over tasks.

  python tools/evaluate_suite.py --suite examples/suites/offline.yaml --data-dir runs/example_tasks \\
      --checkpoint bert=runs/bert narrow=runs/narrow --output-dir runs/suite --jobs 2

Each run is `python megatron_narrow/finetune.py` as rank 0 of a world of one, in OUTPUT_DIR/runs/CHECKPOINT/
TASK/lrLR_seedSEED (its log: finetune.log there); --jobs runs that many at once, each with an equal share of the
cores. A checkpoint is a pretraining save_dir or step_ directory, or a Hugging Face directory; LABEL=PATH names
its column. Writes OUTPUT_DIR/suite_results.json (every run and the table), suite_results.md and
suite_results.png, and prints the table.

Rerunning the same command skips finished runs and resumes the others from their checkpoints, so a suite killed
mid-way (or preempted: SIGTERM stops every running fine-tuning at a checkpoint, exit 75) finishes only what was
missing. A run whose settings changed since it started is started over.

Exit codes: 0 every run finished; 75 stopped by SIGTERM or Ctrl-C (rerun to continue); 1 a run failed (its log
is named); 2 a bad suite file or command line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_STOPPED = 75


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, help="the suite YAML (seeds, tasks, settings)")
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="[LABEL=]PATH",
                        help="pretraining checkpoints or Hugging Face directories to fine-tune (a column each)")
    parser.add_argument("--output-dir", required=True, help="where the runs and the results go")
    parser.add_argument("--data-dir", default=None, help="where relative task files are (default: the suite's "
                                                         "folder)")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at once, one rank each (default 1)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="these seeds instead of the suite's")
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="these learning rates for every task instead of the suite's")
    parser.add_argument("--set", nargs="+", default=[], metavar="section.key=value", dest="settings",
                        help="settings for every run, over the suite's (e.g. train.train_steps=20 for a quick look)")
    return parser.parse_args(argv)


def run_jobs(jobs: list, suite, pool, output_dir: Path) -> list:
    """Run the unfinished `jobs` through `pool`, printing one line as each ends; returns the failed ones."""
    from megatron_narrow.tasks.jobs import FINETUNE

    todo = [job for job in jobs if not job.finished]
    print(f"{len(jobs)} runs: {len(jobs) - len(todo)} finished earlier, {len(todo)} to run, {pool.jobs} at a time",
          flush=True)
    started, done, failed = time.monotonic(), [], []

    def run_one(job) -> None:
        if job.recorded() not in (None, job.record()):  # the suite changed this run's settings: start it over
            shutil.rmtree(job.save_dir)
        job.save_dir.mkdir(parents=True, exist_ok=True)
        (job.save_dir / "suite_job.json").write_text(json.dumps(job.record(), indent=1) + "\n")
        command = [str(FINETUNE), "--deepspeed_config", suite.deepspeed_config, *job.overrides]
        code = pool.run(command, job.save_dir / "finetune.log")
        if code is None or (pool.stopping and code != 0):  # not started, or stopped (75; killed in its start-up)
            return
        done.append(job)
        name = f"{job.checkpoint} {job.task.name} lr {job.lr:g} seed {job.seed}"
        elapsed = time.monotonic() - started
        eta = elapsed / len(done) * (len(todo) - len(done))
        if code == 0 and job.finished:
            print(f"[{len(done)}/{len(todo)}] {name}: {job.task.metric} {100 * job.result():.2f} "
                  f"({elapsed:.0f} s so far, ~{eta:.0f} s left)", flush=True)
        elif code != EXIT_STOPPED:
            failed.append(job)
            print(f"[{len(done)}/{len(todo)}] {name}: FAILED (exit {code}); see {job.save_dir / 'finetune.log'}",
                  flush=True)

    with ThreadPoolExecutor(max_workers=pool.jobs) as executor:
        for future in [executor.submit(run_one, job) for job in todo]:
            future.result()
    return failed


def main(argv: list[str] | None = None, launch=None) -> int:
    """`launch`: how a fine-tuning run starts (JobPool's; tests start warm processes)."""
    args = parse_args(argv)
    from megatron_narrow.tasks.jobs import JobPool
    from megatron_narrow.tasks.suite import checkpoint_labels, load_suite, markdown_table, plan_jobs, plot, summarise

    try:
        suite = load_suite(args.suite, args.data_dir, overrides=args.settings, seeds=args.seeds, lrs=args.lrs)
        checkpoints = checkpoint_labels(args.checkpoint)
        pool = JobPool(args.jobs, launch=launch)
        output_dir = Path(args.output_dir).resolve()
        jobs = plan_jobs(suite, checkpoints, output_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    previous = {signum: signal.signal(signum, lambda signum, frame: pool.stop(signal.SIGTERM))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed = run_jobs(jobs, suite, pool, output_dir)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    results = summarise(suite, checkpoints, jobs)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "suite_results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results, suite)
    (output_dir / "suite_results.md").write_text(table)
    plot(results, suite, output_dir / "suite_results.png")
    print(table + f"written: {output_dir / 'suite_results.json'}, suite_results.md, suite_results.png", flush=True)
    if pool.stopping:
        print("stopped: every running fine-tuning saved a checkpoint; run the same command again to continue",
              flush=True)
        return EXIT_STOPPED
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
