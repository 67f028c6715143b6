"""``OUT/run.json``: what a run was asked to do, what it has done, and a sha256 of every weight file."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DemeError

RUN_FILE = "run.json"
WEIGHT_SUFFIXES = (".safetensors",)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_hashes(folder: Path, root: Path) -> dict[str, str]:
    """sha256 of every weight file under ``folder``, keyed by its path relative to ``root``."""
    return {
        str(p.relative_to(root)): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    }


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_run(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise DemeError(f"{out_dir} has no {RUN_FILE}: point --run/--resume at the output folder of `deme-ray train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DemeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def verify_hashes(out_dir: Path, hashes: dict[str, str]) -> None:
    """Raise naming the first weight file whose content no longer matches run.json."""
    for rel, expected in hashes.items():
        path = Path(out_dir) / rel
        if not path.is_file():
            raise DemeError(f"{path} is missing (listed in {RUN_FILE}); re-run `deme-ray train --resume {out_dir}`")
        if sha256(path) != expected:
            raise DemeError(f"{path} does not match its sha256 in {RUN_FILE}: the file was changed or corrupted")


@dataclass
class TrainedRun:
    """A finished `deme-ray train` run, its weight files verified against run.json."""

    out_dir: Path
    record: dict[str, Any]

    @property
    def config(self):
        from .config import ExperimentConfig

        return ExperimentConfig.model_validate(self.record["config"])

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.record["ranges"]]

    @property
    def base_dir(self) -> Path:
        return self.out_dir / self.record["base"]["path"]

    @property
    def expert_dirs(self) -> list[Path]:
        return [self.out_dir / self.record["experts"][f"{lo}_{hi}"]["path"] for lo, hi in self.ranges]

    @property
    def resolution(self) -> int:
        return self.record["resolution"]

    @property
    def channels(self) -> int:
        return json.loads((self.base_dir / "config.json").read_text())["in_channels"]


def load_run(out_dir: Path) -> TrainedRun:
    record = read_run(out_dir)
    unfinished = [name for name, e in record["experts"].items() if e["status"] != "finished"]
    if unfinished:
        raise DemeError(
            f"{out_dir}: expert(s) {', '.join(unfinished)} did not finish; run `deme-ray train --resume {out_dir}` first"
        )
    verify_hashes(Path(out_dir), record["sha256"])
    return TrainedRun(Path(out_dir), record)
