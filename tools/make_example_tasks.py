#!/usr/bin/env python
"""Write three small fine-tuning tasks (train and valid JSONL), built offline from held-out documentation
sentences: no download, nothing but this machine's Python installation (megatron_narrow/tasks/example_tasks.py).

Every tenth distinct docstring of the standard library and the installed packages is held out of the offline
pretraining corpus; its prose sentences are split between train and valid first, then each split's tasks are
built from its own sentences, so no valid sentence is fine-tuned on (the tasks are listed below).

No sentence of the library or pair task contains its library's name. Reading every installed package's
docstrings takes ~2 minutes on two cores; --stdlib-only takes ~10 s, and names each standard-library module a
library of its own (about 1,000 sentences: a few hundred examples per task, fewer than the default sizes ask).
--train and --valid are the examples wanted per task; a task gets fewer when the sentences do not make more.
Prints one line per file: task, split, examples, labels, path. Fine-tune on a task with its overrides (below):

  python tools/make_example_tasks.py --output-dir data/example_tasks [--stdlib-only]
  python megatron_narrow/finetune.py --config examples/configs/finetune_classification.yaml \\
      --deepspeed_config ds_configs/zero0.json model.init_from=runs/narrowbert_base \\
      task.train_file=data/example_tasks/same_library_train.jsonl \\
      task.valid_file=data/example_tasks/same_library_valid.jsonl \\
      task.kind=sequence task.text_field=text task.text_pair_field=text_pair task.label_field=label
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_narrow.tasks.example_tasks import EXAMPLE_TASKS, held_out_sentences, write_example_tasks  # noqa: E402


def task_list() -> str:
    """--help's list of the tasks, from the registry: name, what it asks, metric, fine-tuning overrides."""
    return "tasks:\n" + "\n".join(f"  {task.name}: {task.description}; metric {task.metric}\n"
                                   f"      {' '.join(task.overrides())}" for task in EXAMPLE_TASKS.values())


def print_file(task: str, split: str, records: list[dict], path: Path) -> None:
    labels = EXAMPLE_TASKS[task].labels(records)
    print(f"{task} {split}: {len(records):,} examples, {len(labels)} labels ({', '.join(labels)}) -> {path}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=task_list(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path, help="write {task}_{train,valid}.jsonl here")
    parser.add_argument("--train", type=int, default=2000, help="training examples wanted per task (default 2000)")
    parser.add_argument("--valid", type=int, default=500, help="validation examples wanted per task (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split and the sampling")
    parser.add_argument("--stdlib-only", action="store_true",
                        help="the standard library's docstrings only (~10 s instead of ~2 min; fewer examples)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.valid < 1:
        parser.error("--train and --valid must be >= 1")
    sentences = held_out_sentences(packages=not args.stdlib_only)
    print(f"{len(sentences):,} held-out sentences from {len({lib for lib, _ in sentences}):,} libraries", flush=True)
    files = write_example_tasks(sentences, args.output_dir, (args.train, args.valid), args.seed,
                                on_written=print_file)
    empty = [path for splits in files.values() for path in splits.values() if Path(path).stat().st_size == 0]
    if empty:
        print(f"error: no examples in {', '.join(empty)}: too few held-out sentences for these tasks",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
