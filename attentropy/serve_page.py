"""The page `attentropy serve` shows at /: type a question, watch the answer stream in with each token coloured by
the instrument's confidence (the scale of `attentropy score`: red 0, yellow 0.5, green 1; grey: not scored)."""

from __future__ import annotations

import html
import json

PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><link rel=icon href="data:,"><title>attentropy serve: __MODEL__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
textarea { width: 100%; font: inherit; padding: 6px; box-sizing: border-box; }
#answer { margin-top: 1em; padding: 8px; border: 1px solid #e3e3e3; border-radius: 4px; min-height: 3em; }
.tok { white-space: pre-wrap; font-family: monospace; font-size: 13px; border-radius: 2px; color: #000; }
.meta, #hover { font-size: 12px; color: #555; } #hover { font-family: monospace; min-height: 1.4em; }
.flag { color: #b00; font-weight: 600; }
#legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle;
  background: linear-gradient(to right, rgb(255,0,60), rgb(255,255,60), rgb(0,255,60)); }
</style></head><body>
<h1>attentropy serve</h1>
<p class=meta>model <b>__MODEL__</b> · __PROBE__ · the OpenAI-compatible endpoint is
<code>/v1/chat/completions</code></p>
<textarea id=question rows=3 placeholder="Ask a question, e.g. What is the capital of Peru?"></textarea>
<p><button id=ask>Ask</button>
<label class=meta>colour by <select id=shown><option value=prefix_confidence>prefix confidence (P correct so far)
</option><option value=confidence>token confidence (P not where it goes wrong)</option></select></label>
<span class=meta>0 <span id=legend></span> 1 · grey: not scored</span></p>
<div id=answer></div>
<div id=hover>hover a token for its confidences</div>
<p id=summary class=meta></p>
<script id=config type=application/json>__CONFIG__</script>
<script>
(function () {
  const config = JSON.parse(document.getElementById('config').textContent);
  const box = document.getElementById('answer'), summary = document.getElementById('summary'),
        hover = document.getElementById('hover'), shown = document.getElementById('shown');
  function colour(c) {  // attentropy score's scale: red (0) through yellow (0.5) to green (1)
    if (c === null || c === undefined) return 'rgb(210,210,210)';
    const r = c < 0.5 ? 255 : Math.round(510 * (1 - c)), g = c < 0.5 ? Math.round(510 * c) : 255;
    return `rgb(${r},${g},60)`;
  }
  function paint(span) { span.style.background = colour(span.entry[shown.value]); }
  shown.onchange = () => box.querySelectorAll('.tok').forEach(paint);
  function add(entry, text) {
    const span = document.createElement('span');
    span.className = 'tok'; span.textContent = text; span.entry = entry;
    span.dataset.confidence = entry.confidence; span.dataset.prefixConfidence = entry.prefix_confidence;
    const fixed = v => v === null || v === undefined ? 'n/a' : v.toFixed(3);
    span.onmouseenter = () => { hover.textContent = `${JSON.stringify(entry.token)}  logprob ${fixed(entry.logprob)}`
      + `  token confidence ${fixed(entry.confidence)}  prefix confidence ${fixed(entry.prefix_confidence)}`; };
    paint(span); box.appendChild(span);
  }
  function finish(ext, reason) {
    const c = ext.answer_confidence;
    let text = `finished (${reason}) · answer confidence ${c === null ? 'n/a' : c.toFixed(3)}`;
    if (!ext.applies) text += ` · the instrument does not apply: ${ext.reason}`;
    if (ext.threshold !== null) text += ` · abstention threshold ${ext.threshold.toFixed(3)}`;
    summary.innerHTML = '';
    summary.append(text);
    if (ext.flagged) {
      const flag = document.createElement('span');
      flag.className = 'flag'; flag.textContent = ext.abstained ? ' · abstained' : ' · flagged: low confidence';
      summary.appendChild(flag);
    }
    summary.dataset.done = '1';
  }
  async function ask() {
    box.innerHTML = ''; summary.textContent = 'generating…'; delete summary.dataset.done;
    const reply = await fetch('/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({model: config.model, stream: true, logprobs: true,
                            messages: [{role: 'user', content: document.getElementById('question').value}]})});
    if (!reply.ok) { summary.textContent = (await reply.json()).error.message; return; }
    const reader = reply.body.getReader(), decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf('\\n\\n')) >= 0) {
        const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) { summary.textContent = chunk.error.message; return; }
        const choice = chunk.choices[0];
        if (!choice) continue;
        const entries = (choice.logprobs && choice.logprobs.content) || [];
        entries.forEach((entry, i) => add(entry, entries.length === 1 ? (choice.delta.content || '') : entry.token));
        if (!entries.length && choice.delta.content) add({token: '', logprob: 0, confidence: null,
                                                         prefix_confidence: null}, choice.delta.content);
        if (choice.finish_reason) finish(choice.attentropy, choice.finish_reason);
      }
    }
  }
  document.getElementById('ask').onclick = ask;
})();
</script></body></html>
"""


def page(model: str, has_probe: bool) -> str:
    probe = "instrument loaded" if has_probe else "no instrument: tokens are not scored"
    return (PAGE.replace("__MODEL__", html.escape(model)).replace("__PROBE__", probe)
            .replace("__CONFIG__", json.dumps({"model": model}).replace("</", "<\\/")))
