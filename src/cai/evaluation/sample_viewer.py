"""The report's side-by-side sample viewer: one row per evaluation prompt, one column per checkpoint (base, SL,
RL, ...), each answer with its judge verdict; filters by set, category and verdict (in any or one checkpoint),
"verdicts differ" and text, in plain inline JavaScript (no external assets).

The table is rendered server-side (readable without JavaScript); the script only hides rows. The filters also
read the page's URL fragment, e.g. ``report.html#verdict=complied&checkpoint=rl&set=harmful``, so a filtered view
can be linked (and the headless-browser test drives the filter that way).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from cai.evaluation.metrics import VERDICTS, verdict_of
from cai.runs import read_jsonl

MAX_ROWS = 600  # prompts shown per run; the page stays a few MB at most


def viewer_rows(run: Path, checkpoints: Sequence[str]) -> list[dict]:
    """One row per prompt id, in the first checkpoint's order: ``{id, set, category, prompt, answers}`` with
    ``answers[checkpoint] = {text, verdict, p_refused, loop}`` (a checkpoint that did not answer is absent)."""
    rows: dict[str, dict] = {}
    for label in checkpoints:
        for s in read_jsonl(run / "eval" / label / "samples.jsonl"):
            row = rows.setdefault(
                str(s["id"]),
                {
                    "id": str(s["id"]),
                    "set": s.get("set", ""),
                    "category": s.get("category", "") or "",
                    "prompt": s.get("prompt", ""),
                    "answers": {},
                },
            )
            if label in row["answers"]:
                continue  # several samples per prompt: the viewer shows the first
            lab = s.get("labels") or {}
            row["answers"][label] = {
                "text": (s.get("prefill", "") or "") + (s.get("response", "") or ""),
                "verdict": verdict_of(lab) if lab else "unjudged",
                "p_refused": lab.get("p_refused"),
                "loop": bool(lab.get("loop")),
            }
    return list(rows.values())


def _options(name: str, label: str, values: Sequence[str]) -> str:
    opts = "".join(f"<option value='{html.escape(v)}'>{html.escape(v)}</option>" for v in values)
    return f"<label>{label} <select data-filter='{name}'><option value=''>any</option>{opts}</select></label>"


def _cell(answer: dict | None) -> str:
    if answer is None:
        return "<td class='ans missing'><i>not evaluated</i></td>"
    p = answer["p_refused"]
    badge = answer["verdict"].replace("_", " ") + (f" · p_refused {p:.2f}" if isinstance(p, (int, float)) else "")
    badge += " · loop" if answer["loop"] else ""
    text = html.escape(answer["text"]) or "<i>(empty)</i>"
    return (
        f"<td class='ans'><span class='verdict v-{html.escape(answer['verdict'])}'>{html.escape(badge)}</span>"
        f"<div class='text'>{text}</div></td>"
    )


def sample_viewer(run: Path, checkpoints: Sequence[str]) -> str:
    rows = viewer_rows(run, checkpoints)
    if not rows:
        return "<p class='muted'>no evaluated samples</p>"
    shown = rows[:MAX_ROWS]
    sets = sorted({r["set"] for r in rows if r["set"]})
    cats = sorted({r["category"] for r in rows if r["category"]})
    seen = {a["verdict"] for r in rows for a in r["answers"].values()}
    verdicts = [v for v in (*VERDICTS, "unjudged") if v in seen]
    controls = (
        "<div class='filters'>"
        + _options("set", "set", sets)
        + _options("category", "category", cats)
        + _options("verdict", "verdict", verdicts)
        + _options("checkpoint", "in checkpoint", list(checkpoints))
        + "<label><input type='checkbox' data-filter='differ'> verdicts differ</label>"
        + "<label>text <input type='search' data-filter='text' placeholder='prompt or answer'></label>"
        + "<span class='count'></span></div>"
    )
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in checkpoints)
    body = []
    for r in shown:
        verdict_map = {c: a["verdict"] for c, a in r["answers"].items()}
        body.append(
            f"<tr class='vrow' data-set='{html.escape(r['set'])}' data-category='{html.escape(r['category'])}' "
            f"data-verdicts='{html.escape(json.dumps(verdict_map))}'>"
            f"<td class='prompt'><div class='meta'>{html.escape(r['set'])} · {html.escape(r['category'])} · "
            f"{html.escape(r['id'])}</div><div class='text'>{html.escape(r['prompt'])}</div></td>"
            + "".join(_cell(r["answers"].get(c)) for c in checkpoints)
            + "</tr>"
        )
    more = (
        f"<p class='muted'>showing the first {MAX_ROWS} of {len(rows)} prompts; all are in eval/*/samples.jsonl</p>"
        if len(rows) > MAX_ROWS
        else ""
    )
    return (
        f"<div class='viewer' data-checkpoints='{html.escape(json.dumps(list(checkpoints)))}'>{controls}"
        f"<table class='samples'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}</div>"
    )


VIEWER_CSS = """.filters{display:flex;flex-wrap:wrap;gap:.4em 1em;align-items:center;margin:.5em 0;font-size:.9em}
.filters .count{color:#555}table.samples{table-layout:fixed;width:100%}table.samples td{vertical-align:top}
table.samples .text{white-space:pre-wrap;max-height:12em;overflow:auto;font-size:.85em}
.verdict{display:inline-block;border-radius:3px;padding:0 4px;font-size:.75em;margin-bottom:.2em;color:#fff}
.v-complied{background:#2e7d32}.v-refused{background:#c62828}.v-partial{background:#ef6c00}
.v-non_responsive{background:#6d6d6d}.v-unjudged{background:#999}td.prompt{background:#eef4ff}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.4em .6em;border-radius:4px}"""

# Filters every .viewer on the page; reads the URL fragment (set=, category=, verdict=, checkpoint=, differ=1,
# text=) into the controls first.
VIEWER_JS = """<script>(function(){
function apply(v){
  var get=function(n){return v.querySelector('[data-filter="'+n+'"]');};
  var f={set:get('set').value,category:get('category').value,verdict:get('verdict').value,
         checkpoint:get('checkpoint').value,differ:get('differ').checked,text:get('text').value.toLowerCase()};
  var rows=v.querySelectorAll('tr.vrow'),shown=0;
  rows.forEach(function(r){
    var verdicts=JSON.parse(r.getAttribute('data-verdicts')),names=Object.keys(verdicts);
    var vals=names.map(function(k){return verdicts[k];});
    var ok=(!f.set||r.getAttribute('data-set')===f.set)&&(!f.category||r.getAttribute('data-category')===f.category);
    if(ok&&f.verdict){ok=f.checkpoint?verdicts[f.checkpoint]===f.verdict:vals.indexOf(f.verdict)>=0;}
    if(ok&&f.differ){ok=vals.some(function(x){return x!==vals[0];});}
    if(ok&&f.text){ok=r.textContent.toLowerCase().indexOf(f.text)>=0;}
    r.style.display=ok?'':'none';
    if(ok){shown++;}
  });
  v.querySelector('.count').textContent=shown+' of '+rows.length+' prompts';
  v.setAttribute('data-shown',shown);
}
function fromHash(v){
  var h=new URLSearchParams(location.hash.replace(/^#/,''));
  h.forEach(function(val,key){
    var c=v.querySelector('[data-filter="'+key+'"]');
    if(!c){return;}
    if(c.type==='checkbox'){c.checked=val==='1'||val==='true';}else{c.value=val;}
  });
}
document.querySelectorAll('.viewer').forEach(function(v){
  fromHash(v);
  v.querySelectorAll('[data-filter]').forEach(function(c){
    c.addEventListener('input',function(){apply(v);});c.addEventListener('change',function(){apply(v);});
  });
  apply(v);
});
})();</script>"""
