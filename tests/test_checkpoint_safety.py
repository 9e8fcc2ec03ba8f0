"""A shared checkpoint cannot run code: a poisoned one is refused by conversion and by resume, the payload never
runs, --trust-checkpoint is a real escape; names in manifests and complete.json stay inside their directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_narrow.data.shards import DataError, IndexedDocuments
from megatron_narrow.file_safety import UnreadableCheckpoint, check_checkpoint_directory, confined
from megatron_narrow.formats import checkpoint_files

from .runs import copy_run_dir, latest, pretrain_argv, run_to_end, run_tool


class Payload:
    """Unpickling it runs `touch MARKER`: what a crafted checkpoint entry does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(save_dir: Path, marker: Path) -> Path:
    """The latest tag's mp_rank_00_model_states.pt with one extra entry that runs the payload when unpickled,
    and complete.json updated to the new size (a careful attacker's file passes the completeness check)."""
    tag_dir = checkpoint_files.checkpoint_root(save_dir) / latest(save_dir)
    target = tag_dir / "mp_rank_00_model_states.pt"
    state = torch.load(target, map_location="cpu", weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, target)
    complete = json.loads((tag_dir / checkpoint_files.COMPLETE_NAME).read_text())
    complete["files"]["mp_rank_00_model_states.pt"] = target.stat().st_size
    (tag_dir / checkpoint_files.COMPLETE_NAME).write_text(json.dumps(complete))
    assert not marker.exists()
    return target


def test_poisoned_checkpoint_is_refused_by_conversion_and_resume_and_trust_loads_it(tmp_path, reference_runs,
                                                                                     tiny_corpus_data, capsys):
    save_dir = copy_run_dir(reference_runs("narrow"), tmp_path / "run")
    marker = tmp_path / "MARKER"
    poisoned = poison(save_dir, marker)

    assert run_tool("convert_checkpoint_to_hf", ["--checkpoint", str(save_dir), "--output", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(poisoned) in error[0] and "posix.system" in error[0], error
    assert "--trust-checkpoint" in error[0] and not marker.exists()

    output = run_to_end(pretrain_argv(tiny_corpus_data, save_dir, "narrow", **{"train.train_steps": "12"}), expect=2)
    assert f"{poisoned} is refused: its pickle calls posix.system" in output, output[-2000:]
    assert "train.trust_checkpoint=true" in output and not marker.exists()

    code = run_tool("convert_checkpoint_to_hf", ["--checkpoint", str(save_dir), "--output", str(tmp_path / "hf"),
                                                 "--trust-checkpoint"])
    assert code == 0 and marker.exists(), "--trust-checkpoint must load the file as it is (here: a harmless touch)"


def test_every_file_of_a_real_checkpoint_passes_and_a_legacy_or_damaged_file_is_not_unpickled(tmp_path,
                                                                                             reference_runs):
    tag_dir = checkpoint_files.checkpoint_root(reference_runs("narrow")) / latest(reference_runs("narrow"))
    check_checkpoint_directory(tag_dir)  # model and optimizer states of a ZeRO-0 fp32 run: nothing unexpected
    legacy = tmp_path / "legacy" / "model_states.pt"
    legacy.parent.mkdir()
    torch.save({"extra": Payload(tmp_path / "MARKER")}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnreadableCheckpoint, match="not a torch checkpoint archive"):  # resume skips, never unpickles
        check_checkpoint_directory(legacy.parent)
    shutil.copy(tag_dir / "mp_rank_00_model_states.pt", tmp_path / "legacy" / "ok.pt")
    legacy.unlink()
    with open(tmp_path / "legacy" / "ok.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UnreadableCheckpoint, match="not a torch checkpoint archive|cannot be read"):
        check_checkpoint_directory(legacy.parent)
    assert not (tmp_path / "MARKER").exists()


def test_names_that_leave_their_directory_are_refused(tmp_path, tiny_corpus_data, reference_runs, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_corpus_data["data"], data)
    manifest = json.loads((data / "index.json").read_text())
    outside = tmp_path / "outside.arrow"
    shutil.copy(data / manifest["shards"][0]["file"], outside)
    for name in ("../outside.arrow", str(outside)):
        manifest["shards"][0]["file"] = name
        (data / "index.json").write_text(json.dumps(manifest))
        with pytest.raises(DataError, match="not a plain path inside"):
            IndexedDocuments(data)
    (data / "link.arrow").symlink_to(outside)
    manifest["shards"][0]["file"] = "link.arrow"
    (data / "index.json").write_text(json.dumps(manifest))
    assert run_tool("verify_data", [str(data)]) == 1
    assert "leads outside" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a plain path"):
        confined(tmp_path, "a/../../b", what="test")

    save_dir = copy_run_dir(reference_runs("narrow"), tmp_path / "run")
    tag_dir = checkpoint_files.checkpoint_root(save_dir) / latest(save_dir)
    complete = json.loads((tag_dir / checkpoint_files.COMPLETE_NAME).read_text())
    complete["files"]["../../../outside.arrow"] = outside.stat().st_size
    (tag_dir / checkpoint_files.COMPLETE_NAME).write_text(json.dumps(complete))
    assert run_tool("convert_checkpoint_to_hf", ["--checkpoint", str(save_dir), "--output", str(tmp_path / "hf")]) == 2
    assert "names '../../../outside.arrow', which is not a plain path inside" in capsys.readouterr().err
