"""Join the outputs of a multi-node preprocessing run (`--partition I/N` on each node) into one dataset whose
shards and manifest are byte for byte those of a single-node run over all the inputs.

Why that holds: a shard never spans two input files and a partition is a run of whole files, so the shards of
part I are exactly the single-node run's shards of those files, in order; only their numbers change. The
manifest is rebuilt by the same builder from the parts' shard records, inputs and settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_narrow.data.preprocess import REJECT_KINDS, build_manifest, fingerprint_of, output_lock
from megatron_narrow.data.shards import MANIFEST_NAME, DataError, atomic_write_json, load_manifest, shard_name


def _load_parts(parts: list[Path]) -> list[tuple[Path, dict]]:
    """(directory, manifest) of each part, checked to be the N parts of one run, in part order."""
    manifests = []
    for part in parts:
        manifest = load_manifest(part)
        if "partition" not in manifest:
            raise DataError(f"{part} is not a partition (made without --partition I/N); nothing to merge")
        manifests.append(manifest)
    count = manifests[0]["partition"]["count"]
    indices = sorted(m["partition"]["index"] for m in manifests)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise DataError(f"merge needs parts 0..{count - 1} of one run, once each; got parts {indices}"
                        + (f" (missing {missing})" if missing else ""))
    first = manifests[0]
    for part, manifest in zip(parts, manifests, strict=True):
        for key in ("settings", "tokenizer"):
            if manifest[key] != first[key]:
                raise DataError(f"{part}: its {key} differ from {parts[0]}'s: the parts come from different runs")
        if manifest["partition"]["all_inputs"] != first["partition"]["all_inputs"]:
            raise DataError(f"{part}: made from other inputs than {parts[0]}: the parts come from different runs")
    return sorted(zip(parts, manifests, strict=True), key=lambda pair: pair[1]["partition"]["index"])


def merge_partitions(parts: list[str | Path], output_dir: str | Path) -> dict:
    """Write the merged dataset into `output_dir` (shards hard-linked where the filesystem allows, else copied);
    returns its manifest. Running it again on a finished merge does nothing."""
    parts = [Path(p) for p in parts]
    ordered = _load_parts(parts)
    first = ordered[0][1]
    inputs = first["partition"]["all_inputs"]
    fingerprint = fingerprint_of(first["settings"], first["tokenizer"]["identity"], inputs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if (out / MANIFEST_NAME).is_file():
            existing = json.loads((out / MANIFEST_NAME).read_text())
            if existing.get("fingerprint") == fingerprint:
                return existing
            raise DataError(f"{out} already holds another dataset; merge into an empty directory")
        shards, rejected, first_document = [], dict.fromkeys(REJECT_KINDS, 0), 0
        for source, manifest in ordered:
            for kind in REJECT_KINDS:
                rejected[kind] += manifest["rejected"].get(kind, 0)
            for entry in manifest["shards"]:
                name = shard_name(len(shards))
                _link_or_copy(source / entry["file"], out / name)
                shards.append({**entry, "file": name, "first_document": first_document})
                first_document += entry["documents"]
        if not first_document:
            raise DataError(f"no part of {', '.join(map(str, parts))} holds a document; nothing to merge")
        manifest = build_manifest(fingerprint=fingerprint, tokenizer=first["tokenizer"], settings=first["settings"],
                                  inputs=inputs, shards=shards, rejected=rejected)
        atomic_write_json(out / MANIFEST_NAME, manifest)  # last: the dataset exists only once it is whole
    return manifest


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or no hard links
        shutil.copyfile(source, target)
