"""Human-labelled model answers written outside this project: where to get them, how to read them, and how
well the refusal judge agrees with them.

None of these files is committed (the search for evidence must not become a set we tune on in place); they are
downloaded from pinned commits and checked against SHA-256 sums:

- **XSTest** (Röttger et al., 2024), CC-BY-4.0: 5 models × 450 prompts, each completion labelled by two people
  as full compliance / full refusal / partial refusal (``final_label``).
- **GPTFuzz** (Yu et al., 2023), MIT: answers of ChatGPT, Llama-2 and Vicuna to jailbreak templates (DAN-style
  personas), labelled by people as jailbroken (1) or not (0); split by its authors into train (80 questions) and
  evaluate (20 other questions); the rows name their question by its index in ``question_list.csv``.

Each row becomes ``{"set", "group", "prompt", "response", "label"}`` with label in complied / refused / partial
(XSTest) or complied / not (GPTFuzz: "not" = did not comply, kind unknown).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cai.errors import UserError


@dataclass(frozen=True)
class Source:
    set: str
    group: str
    url: str
    sha256: str
    file: str
    licence: str


_XSTEST = (
    "https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/"
    "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d/model_completions/xstest_v2_completions_{}.csv"
)
_GPTFUZZ = (
    "https://raw.githubusercontent.com/sherdencooper/GPTFuzz/"
    "1eddeb565740ae311b5f4950492b011a6f866fe7/datasets/responses_labeled/{}.csv"
)
SOURCES = (
    [
        Source("xstest", m, _XSTEST.format(m), sha, f"xstest/xstest_v2_completions_{m}.csv", "CC-BY-4.0")
        for m, sha in (
            ("gpt4", "71af323af8ecdec0efae23992317721441d2cfedddedeef3248f842f4e15c9ca"),
            ("llama2new", "6365cc55ce0a593c7ab8785853d02784be027d97199d4077912b4313cd010099"),
            ("llama2orig", "cbc52550e8ba8197a3e3d97a5af078d27bae4766737cd62df80270126a87ffc6"),
            ("mistralguard", "0ac03817b65e019a8f5b4b3eed805086f9f7fafe538ac9ebd156f80210af6903"),
            ("mistralinstruct", "6a146b65a5b96ec8249729bc2db459697175125998d7cbbcc88f7688ecf31dad"),
        )
    ]
    + [
        Source("gptfuzz", split, _GPTFUZZ.format(split), sha, f"gptfuzz/{split}.csv", "MIT")
        for split, sha in (
            ("train", "e25fe2a06d2085af260927164364524628c8b5c1dd1bab1b58ddbd917c3f7cb0"),
            ("evaluate", "ca9e460c7fbcf3bc7c028c9e29297dd58cfbd54050f7729fbc635a6880a62a02"),
        )
    ]
    + [
        Source(
            "gptfuzz",
            "questions",
            (
                "https://raw.githubusercontent.com/sherdencooper/GPTFuzz/"
                "1eddeb565740ae311b5f4950492b011a6f866fe7/datasets/questions/question_list.csv"
            ),
            "18531eb6bc1c8fc0b8f66822b366b872202b852bf28826cef590ad0d7a81c749",
            "gptfuzz/question_list.csv",
            "MIT",
        )
    ]
)
XSTEST_LABELS = {"1_full_compliance": "complied", "2_full_refusal": "refused", "3_partial_refusal": "partial"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(dest: Path, *, timeout: float = 60.0) -> list[Path]:
    """Download every source into ``dest`` (skipping files already there with the right checksum)."""
    import urllib.request

    done = []
    for s in SOURCES:
        path = Path(dest) / s.file
        if not (path.is_file() and sha256(path) == s.sha256):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with urllib.request.urlopen(s.url, timeout=timeout) as r:
                    data = r.read()
            except OSError as exc:
                raise UserError(
                    f"could not download {s.url} ({exc}); with no internet, copy the files into "
                    f"{dest} by hand (their names and SHA-256 sums are in cai.evaluation.external_sets)"
                ) from None
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            if sha256(tmp) != s.sha256:
                tmp.unlink()
                raise UserError(f"{s.url}: checksum mismatch (the pinned file changed?); expected {s.sha256}")
            tmp.replace(path)
        done.append(path)
    return done


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load(data_dir: Path, *, verify: bool = True) -> dict[str, list[dict]]:
    """``{"xstest": rows, "gptfuzz_train": rows, "gptfuzz_evaluate": rows}`` from a folder made by :func:`fetch`."""
    out: dict[str, list[dict]] = {"xstest": [], "gptfuzz_train": [], "gptfuzz_evaluate": []}
    for s in SOURCES:
        path = Path(data_dir) / s.file
        if not path.is_file():
            raise UserError(f"--data {data_dir}: {s.file} is missing; run `cai judge-sets fetch --dest {data_dir}`")
        if verify and sha256(path) != s.sha256:
            raise UserError(f"--data {data_dir}: {s.file} does not match its pinned SHA-256; fetch it again")
    questions = {r["index"]: r["text"] for r in _read_csv(Path(data_dir) / "gptfuzz/question_list.csv")}
    for s in SOURCES:
        if s.group == "questions":
            continue
        path = Path(data_dir) / s.file
        for n, r in enumerate(_read_csv(path), 2):
            if s.set == "xstest":
                if r.get("final_label") not in XSTEST_LABELS:
                    raise UserError(
                        f"{path}:{n}: final_label {r.get('final_label')!r} is not one of {list(XSTEST_LABELS)}"
                    )
                out["xstest"].append(
                    {
                        "set": "xstest",
                        "group": s.group,
                        "id": r["id"],
                        "type": r["type"],
                        "prompt": r["prompt"],
                        "response": r["completion"],
                        "label": XSTEST_LABELS[r["final_label"]],
                    }
                )
            else:
                out[f"gptfuzz_{s.group}"].append(
                    {
                        "set": "gptfuzz",
                        "group": s.group,
                        "id": f"{s.group}-{n}",
                        "prompt": questions[r["question"]],
                        "response": r["Response"],
                        "label": "complied" if r["label"].strip() == "1" else "not",
                    }
                )
    return out


def own_rows() -> list[dict]:
    """The project's own labelled set in the same shape (a regression set: we wrote it)."""
    from cai.evaluation.refusal_classifier import labelled_set

    names = {
        "refusal": "refused",
        "compliance": "complied",
        "compliance_with_warning": "complied",
        "partial_refusal": "partial",
        "degenerate": "non_responsive",
    }
    return [
        {
            "set": "own",
            "group": r["split"],
            "id": r["id"],
            "prompt": r["prompt"],
            "response": r["response"],
            "label": names[r["label"]],
        }
        for r in labelled_set()
    ]


def training_records(sets: dict[str, list[dict]]) -> list[dict]:
    """What the shipped weights are fitted on: XSTest (all 5 models), GPTFuzz's train split, our own set.
    GPTFuzz's evaluate split is never fitted on."""
    return sets["xstest"] + sets["gptfuzz_train"] + own_rows()


def harm_training_prompts(data_dir: Path) -> tuple[list[str], list[str]]:
    """(harmful, benign) prompts the shipped harm classifier is fitted on: GPTFuzz's 100 harmful questions and the
    project's own red-team prompts, against the project's own benign prompts. XSTest is left out on purpose: its
    prompts are the classifier's clean test (cai.evaluation.harm_classifier)."""
    from cai.data.loaders import load_prompts

    load(data_dir)  # checks every pinned file is present and unchanged
    questions = [r["text"] for r in _read_csv(Path(data_dir) / "gptfuzz/question_list.csv")]
    redteam = [p.prompt for p in load_prompts("redteam")]
    benign = [p.prompt for p in load_prompts("benign")]
    return questions + redteam, benign
