"""Pushing a run's models and datasets to the Hugging Face Hub (``cai push``).

A model push uploads a plain HF model folder of the run — with the model card its stage wrote (README.md) — and a
dataset push the run's feedback data: the preference pairs and the critique/revision records, as JSONL with a
short dataset card. Everything that can fail before the upload (no such folder, offline, no token) is a one-line
UserError, as is a Hub that cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cai.errors import UserError
from cai.runs import read_jsonl

# --what -> (stage, folders to try in order): the loadable model of each training stage
MODEL_FOLDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sft": ("sft", ("merged", "adapter")),
    "reward": ("reward", ("model",)),
    "rl": ("rl", ("model",)),
    "dpo": ("dpo", ("model",)),
}
WHAT = ("model", *MODEL_FOLDERS, "datasets")
# the run's datasets: file in the run folder -> what it holds
DATASET_FILES = {
    "preferences/data.jsonl": "AI-feedback preference pairs (prompt, chosen, rejected, p_chosen, principles)",
    "critique/data.jsonl": "critique → revision records (initial answer, critiques, revisions, final answer)",
    "critique/sft.jsonl": "the SL-CAI training records (chat messages: revisions + helpfulness answers)",
}
_OFF = ("1", "true", "yes", "on")


def _complete(run: Path, stage: str) -> dict | None:
    path = run / stage / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("status") == "complete" else None


def model_folder(run: Path, what: str) -> Path:
    """The folder ``--what`` names in ``run``; ``model`` is the final policy: RL or DPO (whichever finished last),
    else the SL model. A missing one is a UserError naming the stage to run."""
    if what == "model":
        done = [(m.get("finished_at", ""), w) for w in ("rl", "dpo") if (m := _complete(run, w))]
        what = max(done)[1] if done else "sft"
    stage, names = MODEL_FOLDERS[what]
    if _complete(run, stage):
        for name in names:
            folder = run / stage / name
            if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
                return folder
    raise UserError(f"{run}: no trained {stage} model to push (run its '{stage}' stage first, or pick another --what)")


def _check_online() -> str:
    """The Hub token; a one-line UserError when offline or without one."""
    import huggingface_hub
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFF or constants.HF_HUB_OFFLINE:
        raise UserError("cai push needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it and retry")
    token = huggingface_hub.get_token()
    if not token:
        raise UserError("cai push needs a Hugging Face token: run `hf auth login` or set HF_TOKEN (with write access)")
    return token


def _dataset_folder(run: Path, into: Path) -> list[str]:
    """Copy the run's dataset files into ``into`` with a dataset card; returns the files copied."""
    found = [name for name in DATASET_FILES if (run / name).is_file()]
    if not found:
        raise UserError(
            f"{run}: no datasets to push (none of {', '.join(DATASET_FILES)}); run the critique or preferences stage"
        )
    lines = [
        "---",
        "tags: [constitutional-ai, cai-lab]",
        "configs:",
        *[
            f"- config_name: {name.replace('/', '_').removesuffix('.jsonl')}\n  data_files: {name.replace('/', '_')}"
            for name in found
        ],
        "---",
        "",
        f"# {run.name}: cai-lab datasets",
        "",
        "Data written by a [cai-lab](https://pypi.org/project/cai-lab/) run (Constitutional AI on TRL).",
        "",
    ]
    for name in found:
        shutil.copyfile(run / name, into / name.replace("/", "_"))
        lines.append(f"- `{name.replace('/', '_')}` ({len(read_jsonl(run / name))} rows): {DATASET_FILES[name]}")
    (into / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return found


def _public_adapter(folder: Path, into: Path) -> Path:
    """A copy of an adapter folder whose adapter_config.json names the public base model (its card's
    ``base_model``) instead of the local path PEFT recorded, so it loads from the Hub; UserError without one."""
    from cai.model_card import card_base_model

    base = card_base_model(folder)
    if not base:
        raise UserError(
            f"{folder}: this adapter's base model has no public hub id, so it cannot load from the Hub; "
            "push the merged model instead (sft.save_merged: true)"
        )
    copy = into / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".*"))
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (copy / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


def push(run: str | Path, repo: str, *, what: str = "model", private: bool = False) -> str:
    """Upload a model folder of ``run`` (``what``: model, sft, reward, rl, dpo) or its datasets to the Hub repo
    ``repo``; returns the repo's URL."""
    run = Path(run)
    if what not in WHAT:
        raise UserError(f"--what {what!r}: choose one of {', '.join(WHAT)}")
    if not run.is_dir():
        raise UserError(f"{run}: not a run folder; pass runs/<name>")
    folder = model_folder(run, what) if what != "datasets" else None  # before any network: a wrong run fails first
    token = _check_online()
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    repo_type = "dataset" if folder is None else "model"
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            if folder is None:
                _dataset_folder(run, Path(tmp))
                folder = Path(tmp)
            elif (folder / "adapter_config.json").is_file():
                folder = _public_adapter(folder, Path(tmp))
            api.upload_folder(
                repo_id=repo,
                repo_type=repo_type,
                folder_path=str(folder),
                ignore_patterns=[".*", "checkpoint-*"],
                commit_message=f"cai push: {run.name} ({what})",
            )
    except (HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot push to {repo!r} on the Hugging Face Hub ({first[:160]}); check the connection, the repo id "
            "and that the token may write there"
        ) from None
    return str(url)
