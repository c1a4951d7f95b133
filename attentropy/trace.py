"""`attentropy trace`: one prompt, nothing to set up. Generates with recording into a small run directory (the
prompt's full attention rows kept), then writes one self-contained page: the answer's tokens coloured by a chosen
statistic (the report's token viewer), per-layer x token heatmaps of attention entropy and varentropy with the
next-token entropy and varentropy below, and the attention of a clicked token over the prompt and answer for a
chosen layer and head. `--text` prints the answer coloured in the terminal instead."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from pathlib import Path

import numpy as np

from .model import DEFAULT_MODEL

MAX_MAP_BYTES = 64 << 20  # larger attention maps (long answers of large models) are left out of the page


def trace_dir(model: str, prompt: str, *, system: str | None, raw: bool, max_new_tokens: int) -> Path:
    """traces/<hash>: one directory per model, prompt and settings, so a rerun reuses the generation."""
    key = json.dumps([model, prompt, system, raw, max_new_tokens])
    return Path("traces") / hashlib.sha256(key.encode()).hexdigest()[:12]


def trace(prompt: str, *, model: str = DEFAULT_MODEL, out: str | Path | None = None, system: str | None = None,
          raw: bool = False, max_new_tokens: int = 128, maps: bool = True, progress: bool = True) -> Path:
    """Generate (greedy, recorded) the answer to one prompt into run directory `out` and return it."""
    from .data import FREE, DataError
    from .run import run_benchmark

    if not prompt.strip():
        raise DataError("the prompt is empty")
    if raw and system:
        raise DataError("--system needs the chat template (not --raw)")
    out = Path(out) if out else trace_dir(model, prompt, system=system, raw=raw, max_new_tokens=max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    row = {"id": "trace", "prompt": prompt, **({"system": system} if system else {})}
    data = out / "prompt.jsonl"
    if not data.exists() or data.read_text(encoding="utf-8") != json.dumps(row) + "\n":
        data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    run_benchmark(FREE, out / "run", model=model, data=str(data), max_new_tokens=max_new_tokens, raw=raw,
                  batch_size=1, save_attention=("trace",) if maps else (), progress=progress)
    return out


def trace_page(out: str | Path, stat: str = "entropy") -> Path:
    """Write OUT/trace.html for the traced prompt in OUT/run and return its path."""
    from . import plots
    from .contrasts import analyze_run
    from .html_blocks import figure as figure_html
    from .report import CSS, VIEWER_HTML, VIEWER_JS, viewer_data
    from .store import load_run

    out = Path(out)
    run = load_run(out / "run")
    a = analyze_run(run, n_boot=20)
    a.name = "trace"
    qid = a.answers.question_id.iloc[0]
    figure = plots.trace_heatmaps(a, qid, out / "figures", "trace")
    data = viewer_data(a)
    sample = a.samples.set_index("question_id").loc[qid]
    maps_json, note = "null", ""
    try:
        maps = run.attention_map(qid)
    except KeyError:
        maps, note = None, "not kept for this trace (--no-maps)"
    if maps is not None:
        size = sum(m.nbytes for m in maps.values())
        if size > MAX_MAP_BYTES:
            maps, note = None, f"left out of the page ({size / 2 ** 20:.0f} MiB; kept in run/attention_maps/)"
    if maps is not None:
        from transformers import AutoTokenizer

        from .grade import _tokenizer_source

        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(run))
        key_ids = list(sample.prompt_ids) + list(sample.completion_ids)
        first = next(iter(maps.values()))
        maps_json = json.dumps({
            "layers": sorted(maps), "heads": int(first.shape[0]), "rows": int(first.shape[1]),
            "keys": int(first.shape[2]), "prompt_len": len(sample.prompt_ids),
            "key_tokens": [tokenizer.decode([t]) for t in key_ids[:first.shape[2]]],
            # float16, little-endian, [heads, completion rows, keys] per layer
            "data": {str(layer): base64.b64encode(np.ascontiguousarray(m, "<f2").tobytes()).decode()
                     for layer, m in maps.items()}})
    esc = html.escape
    cfg = run.config
    stat_ok = stat if stat in data["stat_names"] else "entropy"
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>attentropy trace</title>"
        f"<style>{CSS}{TRACE_CSS}</style></head><body><h1>attentropy trace</h1>"
        f"<p class=meta>{esc(cfg['model']['name'])} · {'plain continuation (--raw)' if not cfg['protocol']['chat_template'] else 'chat template'}"
        f" · {len(sample.completion_ids)} tokens ({esc(sample.finish_reason)}) · greedy</p>"
        f"<h2>Prompt</h2><pre class=prompt>{esc(sample.question)}</pre>"
        f"<h2>Answer</h2><p class=meta>Tokens coloured by the chosen statistic (attention statistics: per layer, "
        f"mean over heads, or the mean over layers); hover for the value, click a token for its attention "
        f"below.</p>{VIEWER_HTML}"
        f"<h2>Attention of the clicked token</h2><div id=mapcontrols><label>layer <select id=maplayer></select>"
        f"</label> <label>head <select id=maphead></select></label> <span id=mapinfo class=meta></span></div>"
        f"<div id=keys class=meta>{esc(note) or 'click a token of the answer'}</div>"
        f"<canvas id=map></canvas>"
        f"<h2>Per layer along the answer</h2>"
        f"{figure_html(figure, 'attention entropy and varentropy per layer, next-token entropy and varentropy')}"
        f"<script id=viewer-data type=application/json>{json.dumps([data]).replace('</', '<' + chr(92) + '/')}"
        f"</script><script id=map-data type=application/json>{maps_json}</script>"
        f"<script>{VIEWER_JS}</script><script>document.getElementById('stat').value = {json.dumps(stat_ok)};"
        f"document.getElementById('stat').dispatchEvent(new Event('change'));</script>"
        f"<script>{TRACE_JS}</script></body></html>")
    path = out / "trace.html"
    tmp = path.with_name("trace.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def trace_text(out: str | Path, stat: str = "entropy", layer: int | None = None) -> str:
    """The traced answer with each token on a background by `stat` (attention statistics: mean over heads of
    `layer`, or over all layers), from low (dark) to high (bright) within the answer, and a legend."""
    from .statistic_values import LOGIT_STATS, token_values
    from .schema import ATTN_STATS
    from .store import load_run

    run = load_run(Path(out) / "run")
    if stat in (*ATTN_STATS, "entropy_norm"):
        values = token_values(run, stat)  # [n, L, H]
        if layer is not None:
            if layer not in run.layers:
                raise ValueError(f"layer {layer} is not recorded; recorded: {list(run.layers)}")
            v = values[:, list(run.layers).index(layer)].mean(axis=1)
        else:
            v = values.mean(axis=(1, 2))
    elif stat in LOGIT_STATS:
        v = run.tokens[stat].to_numpy(float)
    else:
        raise ValueError(f"unknown statistic {stat!r}; expected one of {', '.join((*ATTN_STATS, 'entropy_norm', *LOGIT_STATS))}")
    lo, hi = np.nanpercentile(v, [2, 98]) if len(v) else (0.0, 1.0)
    scaled = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.full(len(v), 0.5)
    body = "".join(_ansi_viridis(t, s) for t, s in zip(run.tokens.token.astype(str), scaled))
    where = f"layer {layer}, mean over heads" if layer is not None else "mean over layers and heads"
    return f"{body}\n\n{stat} ({where if stat not in LOGIT_STATS else 'per token'}): {lo:.3f} {_ansi_viridis('  low  ', 0)}" \
           f"{_ansi_viridis(' high ', 1)} {hi:.3f}"


_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _ansi_viridis(text: str, t: float) -> str:
    t = float(np.clip(t, 0, 1)) * (len(_VIRIDIS) - 1)
    i = min(len(_VIRIDIS) - 2, int(t))
    r, g, b = (round(a + (t - i) * (c - a)) for a, c in zip(_VIRIDIS[i], _VIRIDIS[i + 1]))
    fg = "0;0;0" if 0.3 * r + 0.59 * g + 0.11 * b > 140 else "255;255;255"
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;{fg}m{text}\x1b[0m"


TRACE_CSS = """
pre.prompt { white-space: pre-wrap; background: #f7f7f7; padding: 6px; font-size: 12.5px; max-height: 16em;
  overflow: auto; }
.badge.ungraded { background: #4c72b0; } .tok { cursor: pointer; } .tok.picked { outline: 2px solid #000; }
#keys { line-height: 1.9; max-height: 24em; overflow: auto; border: 1px solid #e3e3e3; padding: 6px; }
#keys .key { white-space: pre-wrap; font-family: monospace; font-size: 12px; border-radius: 2px; }
#keys .key.self { outline: 2px solid #000; } #keys .answer-start { border-left: 3px solid #d95f02; }
canvas#map { margin-top: 8px; image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; }
"""

TRACE_JS = r"""
(function () {
  const maps = JSON.parse(document.getElementById('map-data').textContent);
  const layerSel = document.getElementById('maplayer'), headSel = document.getElementById('maphead');
  const keysBox = document.getElementById('keys'), info = document.getElementById('mapinfo');
  const canvas = document.getElementById('map');
  if (!maps) { layerSel.disabled = headSel.disabled = true; canvas.style.display = 'none'; return; }
  function half(h) {  // IEEE float16 -> number
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }
  const decoded = {};
  function layerData(layer) {
    if (!decoded[layer]) {
      const bytes = Uint8Array.from(atob(maps.data[layer]), c => c.charCodeAt(0));
      const view = new DataView(bytes.buffer), out = new Float32Array(bytes.length / 2);
      for (let i = 0; i < out.length; i++) out[i] = half(view.getUint16(2 * i, true));
      decoded[layer] = out;
    }
    return decoded[layer];
  }
  maps.layers.forEach(layer => layerSel.add(new Option(`layer ${layer}`, layer)));
  for (let h = 0; h < maps.heads; h++) headSel.add(new Option(`head ${h}`, h));
  let picked = null;
  function row(t) {  // attention of completion token t over the keys it saw
    const d = layerData(layerSel.value), h = Number(headSel.value), start = (h * maps.rows + t) * maps.keys;
    return d.subarray(start, start + maps.prompt_len + t);
  }
  function showKeys() {
    if (picked === null) return;
    const r = row(picked);
    let max = 0, entropy = 0;
    r.forEach(p => { max = Math.max(max, p); if (p > 0) entropy -= p * Math.log(p); });
    keysBox.innerHTML = '';
    maps.key_tokens.slice(0, r.length).forEach((text, k) => {
      const span = document.createElement('span');
      span.className = 'key' + (k === r.length - 1 ? ' self' : '') + (k === maps.prompt_len ? ' answer-start' : '');
      span.textContent = text;
      const a = max > 0 ? Math.sqrt(r[k] / max) : 0;  // sqrt: small weights stay visible
      span.style.backgroundColor = `rgba(217, 95, 2, ${a.toFixed(3)})`;
      span.title = `key ${k}: ${r[k].toPrecision(3)}`;
      keysBox.appendChild(span);
    });
    info.textContent = `token ${picked} attends over ${r.length} keys; entropy ${entropy.toFixed(3)} nats ` +
      `(the query row's own token outlined; orange bar: the answer starts)`;
    drawMap();
  }
  function drawMap() {  // the whole [answer tokens x keys] map of the layer and head, the picked row marked
    const d = layerData(layerSel.value), h = Number(headSel.value);
    canvas.width = maps.keys; canvas.height = maps.rows;
    canvas.style.width = Math.min(1400, 3 * maps.keys) + 'px';
    canvas.style.height = Math.min(900, 3 * maps.rows) + 'px';
    const ctx = canvas.getContext('2d'), img = ctx.createImageData(maps.keys, maps.rows);
    for (let t = 0; t < maps.rows; t++) {
      let max = 0;
      for (let k = 0; k < maps.keys; k++) max = Math.max(max, d[(h * maps.rows + t) * maps.keys + k]);
      for (let k = 0; k < maps.keys; k++) {
        const p = d[(h * maps.rows + t) * maps.keys + k], a = max > 0 ? Math.sqrt(p / max) : 0, i = 4 * (t * maps.keys + k);
        const mark = t === picked;
        img.data[i] = mark ? 0 : 255 - Math.round(38 * a); img.data[i + 1] = mark ? 0 : 255 - Math.round(160 * a);
        img.data[i + 2] = mark ? Math.round(255 * a) : 255 - Math.round(253 * a); img.data[i + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
  }
  document.getElementById('answers').addEventListener('click', e => {
    if (!e.target.classList.contains('tok')) return;
    document.querySelectorAll('.tok.picked').forEach(el => el.classList.remove('picked'));
    e.target.classList.add('picked');
    picked = Number(e.target.dataset.t);
    showKeys();
  });
  layerSel.addEventListener('change', showKeys); headSel.addEventListener('change', showKeys);
  layerSel.value = maps.layers[0];
  drawMap();
})();
"""
