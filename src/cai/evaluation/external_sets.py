"""Human-labelled model answers written outside this project: where to get them, how to read them, and how
well the refusal judge agrees with them.

None of these files is committed (the search for evidence must not become a set we tune on in place); they are
downloaded from pinned commits and checked against SHA-256 sums:

- **XSTest** (Röttger et al., 2024), CC-BY-4.0: 5 models × 450 prompts, each completion labelled by two people
  as full compliance / full refusal / partial refusal (``final_label``).
- **GPTFuzz** (Yu et al., 2023), MIT: answers of ChatGPT, Llama-2 and Vicuna to jailbreak templates (DAN-style
  personas), labelled by people as jailbroken (1) or not (0); split by its authors into train (80 questions) and
  evaluate (20 other questions); the rows name their question by its index in ``question_list.csv``.

- **jailbreak-eval** (Cai et al., 2024, "Rethinking How to Evaluate Language Model Jailbreak"), Apache-2.0: 300
  answers of Llama-2-7b-chat and GPT-3.5 to three attacks (GCG suffixes, generation exploitation, PAIR rewrites),
  each labelled by people on three questions. The judge is only ever *measured* on this set (never fitted or tuned
  on it). Its label *informativeness* ("the response provides relevant information to address the intent, rather
  than just rejection or repeating the intent") is the complied-vs-not question; *safeguard violation* (a policy
  breach, intent not considered) is kept beside it as ``safeguard_violation``.

Each row becomes ``{"set", "group", "prompt", "response", "label"}`` with label in complied / refused / partial
(XSTest) or complied / not (GPTFuzz, jailbreak-eval: "not" = did not comply, kind unknown).
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
    for s in all_sources():
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


def all_sources() -> tuple[Source, ...]:
    """Everything :func:`fetch` downloads, in order."""
    return (*SOURCES, *HARM_SOURCES, *HELD_OUT_SOURCES, *TEST_ONLY_SOURCES)


def checked_file(data_dir: Path, source: Source, *, verify: bool = True) -> Path:
    """The path of ``source`` in a folder made by :func:`fetch`; a one-line error when it is missing or (with
    ``verify``) not the pinned file."""
    path = Path(data_dir) / source.file
    if not path.is_file():
        raise UserError(f"--data {data_dir}: {source.file} is missing; run `cai judge-sets fetch --dest {data_dir}`")
    if verify and sha256(path) != source.sha256:
        raise UserError(f"--data {data_dir}: {source.file} does not match its pinned SHA-256; fetch it again")
    return path


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load(data_dir: Path, *, verify: bool = True) -> dict[str, list[dict]]:
    """``{"xstest": rows, "gptfuzz_train": rows, "gptfuzz_evaluate": rows}`` from a folder made by :func:`fetch`."""
    out: dict[str, list[dict]] = {"xstest": [], "gptfuzz_train": [], "gptfuzz_evaluate": []}
    for s in SOURCES:
        checked_file(data_dir, s, verify=verify)
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


_ADVERSARIALLM = (
    "https://raw.githubusercontent.com/busycalibrating/AdversariaLLM/f970939273ea17b491fadf6001fddc36ed3ae3ff/"
)
_COCONOT = "https://raw.githubusercontent.com/allenai/noncompliance/25bf77cc668814360405cdb8197c4368205806c7/data/"
_SELF_INSTRUCT = "https://raw.githubusercontent.com/yizhongw/self-instruct/0b26ccaa415992100fa32df62d41b994cf928e23/"
# Prompts only (no answers), for the request-harm classifier (cai.evaluation.harm_classifier). HarmBench's own
# repository is not reachable from where these were pinned; AdversariaLLM carries byte copies of HarmBench's
# behaviour files (HarmBench's MIT licence file beside them), of AdvBench in HarmBench's format (MIT) and of
# StrongREJECT (MIT).
HARM_SOURCES = (
    Source(
        "harmbench",
        "behaviors",
        _ADVERSARIALLM + "data/behavior_datasets/harmbench_behaviors_text_all.csv",
        "2745611872be3b2eab141e39bb328b8c1140dc3cd8d0a49da6174260d9ccbfb9",
        "harmbench/harmbench_behaviors_text_all.csv",
        "MIT",
    ),
    Source(
        "advbench",
        "behaviors",
        _ADVERSARIALLM + "data/behavior_datasets/extra_behavior_datasets/advbench_behaviors.csv",
        "0e635254df9065ae6f8d074534b660fa7a361d1ad269e2c8e1b7377961802a86",
        "harmbench/advbench_behaviors.csv",
        "MIT",
    ),
    Source(
        "strongreject",
        "prompts",
        _ADVERSARIALLM + "data/behavior_datasets/strongreject_dataset.csv",
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
        "strongreject/strongreject_dataset.csv",
        "MIT",
    ),
    Source(
        "simplesafetytests",
        "prompts",
        "https://raw.githubusercontent.com/bertiev/SimpleSafetyTests/d7aee9a9422a5a5488f478fd79c2479c891c0f3b/"
        "SimpleSafetyTests%20-%20test%20cases.csv",
        "6d95a1301e0d0f3a3c4cf5392f4afff11ad6e3066f95d23aaa138d44aedf986c",
        "simplesafetytests/test_cases.csv",
        "CC-BY-4.0",
    ),
    Source(
        "coconot",
        "eval",
        _COCONOT + "coconot_eval.jsonl",
        "df72466c477207f14a96c5940c3ef3b93b1b50c0d1e7ed7c5fb5dc6d6140c077",
        "coconot/coconot_eval.jsonl",
        "MIT",
    ),
    Source(
        "coconot",
        "contrast",
        _COCONOT + "coconot_contrast_eval.jsonl",
        "76dccec176743ed656279f2969c51abb68bda94e5fda8397e34ff5638e021d86",
        "coconot/coconot_contrast_eval.jsonl",
        "MIT",
    ),
    Source(
        "coconot",
        "pref",
        _COCONOT + "coconot_pref.jsonl",
        "3b0cddcfb72218b8c32d7c11bfded00174f2f4a3c4edfbc862640fc63f43d9c2",
        "coconot/coconot_pref.jsonl",
        "MIT",
    ),
    Source(
        "selfinstruct",
        "seed",
        _SELF_INSTRUCT + "data/seed_tasks.jsonl",
        "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
        "selfinstruct/seed_tasks.jsonl",
        "Apache-2.0",
    ),
    Source(
        "selfinstruct",
        "user",
        _SELF_INSTRUCT + "human_eval/user_oriented_instructions.jsonl",
        "81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e",
        "selfinstruct/user_oriented_instructions.jsonl",
        "Apache-2.0",
    ),
)
# Human preference pairs held out from all development (issue 15): measured on, never fitted or tuned on. The
# GitHub copy is in Git LFS, so the URL is the LFS media endpoint at a pinned commit.
HELD_OUT_SOURCES = (
    Source(
        "hh-rlhf",
        "harmless-base-test",
        "https://media.githubusercontent.com/media/anthropics/hh-rlhf/354e5c3cb8960630860dd5774a6ac2a58313bf4d/"
        "harmless-base/test.jsonl.gz",
        "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
        "hh-rlhf/harmless-base-test.jsonl.gz",
        "MIT",
    ),
)
# Human-labelled answers the refusal judge is measured on and never fitted or tuned on (issue 12's "every other
# external set"): added 2026-11-28 and measured once with the shipped weights, before any change was made for it.
JAILBREAK_EVAL = Source(
    "jailbreak-eval",
    "manual",
    "https://raw.githubusercontent.com/purseclab/jailbreak-evaluation/"
    "b5be0cd5eedf8cfe92605ddb84180c398d2415b3/raw-data/manual_data.csv",
    "93d21030803ba55b53046513fb984a240a99c12573f23685d261c563804a98d5",
    "jailbreak-eval/manual_data.csv",
    "Apache-2.0",
)
TEST_ONLY_SOURCES = (JAILBREAK_EVAL,)
# Its ids, from the authors' README: the attack (publication_id) and the answering model (model_id).
JAILBREAK_EVAL_ATTACKS = {"0": "gcg", "1": "generation-exploitation", "2": "pair"}
JAILBREAK_EVAL_MODELS = {"0": "llama-2-7b-chat", "1": "gpt-3.5-turbo"}
COCONOT_HARMFUL = "Requests with safety concerns"  # in coconot_eval only; its contrast and pref sets are benign


def _read_jsonl(path: Path) -> list[dict]:
    import json

    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise UserError(
                        f"{path}:{n}: not a JSON line; fetch it again with `cai judge-sets fetch`"
                    ) from None
    return rows


def _field(path: Path, n: int, row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}:{n}: no {key!r} text; fetch it again with `cai judge-sets fetch`")
    return value.strip()


def read_harm_source(source: Source, path: Path) -> list[tuple[str, bool]]:
    """(prompt, harmful) rows of one prompt set, as its authors labelled them. HarmBench's copyright behaviours
    ("generate the lyrics of …") are left out: they are not the kind of harm the labeler asks about."""
    if source.set == "harmbench":
        return [
            (_field(path, n, r, "Behavior"), True)
            for n, r in enumerate(_read_csv(path), 2)
            if r.get("FunctionalCategory") != "copyright"
        ]
    if source.set == "advbench":
        return [(_field(path, n, r, "Behavior"), True) for n, r in enumerate(_read_csv(path), 2)]
    if source.set == "strongreject":
        return [(_field(path, n, r, "forbidden_prompt"), True) for n, r in enumerate(_read_csv(path), 2)]
    if source.set == "simplesafetytests":
        return [(_field(path, n, r, "prompts_final"), True) for n, r in enumerate(_read_csv(path), 2)]
    if source.set == "coconot":
        return [
            (_field(path, n, r, "prompt"), source.group == "eval" and r.get("category") == COCONOT_HARMFUL)
            for n, r in enumerate(_read_jsonl(path), 1)
        ]
    if source.set == "selfinstruct":
        rows = []
        for n, r in enumerate(_read_jsonl(path), 1):
            first = (r.get("instances") or [{}])[0].get("input", "").strip()
            rows.append(((_field(path, n, r, "instruction") + ("\n\n" + first if first else "")).strip(), False))
        return rows
    raise ValueError(f"no reader for prompt set {source.set!r}")


def harm_training_records(data_dir: Path) -> list[dict]:
    """What the shipped harm classifier is fitted on, one ``{"source", "prompt", "harmful"}`` per prompt: the
    prompt sets in :data:`HARM_SOURCES`, GPTFuzz's 100 harmful questions and the project's own red-team (harmful)
    and benign prompts. XSTest is left out on purpose: its prompts are the classifier's clean test
    (cai.evaluation.harm_classifier). A prompt met twice keeps its first label."""
    from cai.data.loaders import load_prompts

    gptfuzz = next(s for s in SOURCES if s.group == "questions")
    for s in (gptfuzz, *HARM_SOURCES):
        checked_file(data_dir, s)
    rows = [("gptfuzz/questions", r["text"], True) for r in _read_csv(Path(data_dir) / gptfuzz.file)]
    for s in HARM_SOURCES:
        rows += [(f"{s.set}/{s.group}", p, h) for p, h in read_harm_source(s, Path(data_dir) / s.file)]
    rows += [("cai-lab/redteam", p.prompt, True) for p in load_prompts("redteam")]
    rows += [("cai-lab/benign", p.prompt, False) for p in load_prompts("benign")]
    seen: set[str] = set()
    out = []
    for source, prompt, harmful in rows:
        key = " ".join(prompt.lower().split())
        if key not in seen:
            seen.add(key)
            out.append({"source": source, "prompt": prompt, "harmful": harmful})
    return out


def _flag(path: Path, n: int, row: dict, key: str) -> bool:
    value = (row.get(key) or "").strip()
    if value not in ("True", "False"):
        raise UserError(f"{path}:{n}: {key} {value!r} is not True or False; fetch it again with `cai judge-sets fetch`")
    return value == "True"


def read_jailbreak_eval(path: Path) -> list[dict]:
    """jailbreak-eval's 300 rows in the shape of :func:`load`'s: the prompt is the request (``intent``, as GPTFuzz's
    rows carry the question, not the jailbreak template), the group is ``attack/model``, the label is complied when
    people found the answer *informative* for the request, else not."""
    rows = []
    for n, r in enumerate(_read_csv(path), 2):
        attack, model = r.get("publication_id", ""), r.get("model_id", "")
        if attack not in JAILBREAK_EVAL_ATTACKS or model not in JAILBREAK_EVAL_MODELS:
            raise UserError(f"{path}:{n}: unknown publication_id {attack!r} / model_id {model!r}")
        rows.append(
            {
                "set": "jailbreak-eval",
                "group": f"{JAILBREAK_EVAL_ATTACKS[attack]}/{JAILBREAK_EVAL_MODELS[model]}",
                "id": r.get("_id") or f"row-{n}",
                "prompt": _field(path, n, r, "intent"),
                "response": r.get("response") or "",
                "label": "complied" if _flag(path, n, r, "manual_informativeness_label") else "not",
                "safeguard_violation": _flag(path, n, r, "manual_safeguard_violation_label"),
            }
        )
    return rows


def load_jailbreak_eval(data_dir: Path, *, verify: bool = True) -> list[dict]:
    """jailbreak-eval's rows from a folder made by :func:`fetch` (a test-only set: see the module docstring)."""
    return read_jailbreak_eval(checked_file(data_dir, JAILBREAK_EVAL, verify=verify))
