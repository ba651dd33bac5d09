"""The feature atlas: a static HTML site (open ``index.html``; no server, no network).

Each model gets ``<variant>/index.html``, a searchable, sortable list of its features (name,
modality score, density, Clarity) with a box that answers "which features fire for this word",
and ``<variant>/features/<id>.html`` per feature: top words with scores, top images, heatmaps
of the feature over the patch grid of sample images (drawn client-side from the token
activations, so no PNG per feature), and its evolution through training. Data is inlined as
JSON in each page because browsers refuse ``fetch`` on ``file://``.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
a{color:#1a5fb4;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
input{font-size:15px;padding:4px 8px;width:22em}
img.thumb{width:96px;height:96px;image-rendering:pixelated;margin:2px;border:1px solid #ccc}
.tiles{display:flex;flex-wrap:wrap;gap:6px}.tile{text-align:center;font-size:12px}
.bar{background:#7aa6e0;height:10px;display:inline-block}
.muted{color:#777}canvas{image-rendering:pixelated;border:1px solid #ccc}
"""

INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title><style>__STYLE__</style></head>
<body><h1>__TITLE__</h1><p class="muted">__SUBTITLE__</p>
<p><input id="search" placeholder="filter by name or top word" autofocus> <span id="count"></span></p>
<div id="fires"></div>
<table id="features"><thead><tr><th data-key="feature">feature</th><th data-key="name">name</th>
<th data-key="modality">modality (1 = image)</th><th data-key="density">density</th>
<th data-key="clarity">Clarity</th><th>top words</th></tr></thead><tbody></tbody></table>
<script>
const FEATURES = __FEATURES__;
const WORD_FEATURES = new Map(__WORD_FEATURES__);
const body = document.querySelector('#features tbody');
let sortKey = 'density', descending = true;
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'})[c]); }
function fmt(x) { return (x === null || Number.isNaN(x)) ? '' : Number(x).toFixed(3); }
function render() {
  const q = document.getElementById('search').value.trim().toLowerCase();
  const shown = FEATURES.filter(f => !q || (f.name || '').toLowerCase().includes(q)
      || f.words.some(w => w.toLowerCase().includes(q)));
  shown.sort((a, b) => { const x = a[sortKey] ?? -1, y = b[sortKey] ?? -1;
      return (x < y ? -1 : x > y ? 1 : 0) * (descending ? -1 : 1); });
  body.innerHTML = shown.map(f => '<tr class="feature-row"><td><a href="features/' + f.feature + '.html">#'
      + f.feature + '</a></td><td>' + (f.name ? esc(f.name) : '<span class="muted">silent</span>') + '</td><td>'
      + fmt(f.modality) + '</td><td>' + fmt(f.density) + '</td><td>' + fmt(f.clarity) + '</td><td>'
      + f.words.slice(0, 6).map(esc).join(', ') + '</td></tr>').join('');
  document.getElementById('count').textContent = shown.length + ' of ' + FEATURES.length + ' features';
  const fires = WORD_FEATURES.get(q);
  document.getElementById('fires').innerHTML = fires ? '<p id="fires-for">"' + esc(q) + '" fires: '
      + fires.map(([f, v]) => '<a href="features/' + f + '.html">#' + f + '</a> (' + v.toFixed(2) + ')').join(', ')
      + '</p>' : '';
}
document.getElementById('search').addEventListener('input', render);
document.querySelectorAll('th[data-key]').forEach(th => th.addEventListener('click', () => {
  descending = sortKey === th.dataset.key ? !descending : true; sortKey = th.dataset.key; render(); }));
render();
</script></body></html>
"""

FEATURE = """<!doctype html><html><head><meta charset="utf-8"><title>#__ID__ __NAME__</title><style>__STYLE__</style>
</head><body><p><a href="../index.html">&larr; all features</a></p>
<h1>Feature #__ID__: <span id="name">__NAME__</span></h1>
<p class="muted">modality __MODALITY__ &middot; density __DENSITY__ &middot; Clarity __CLARITY__</p>
<h2>Top words (text tower)</h2><table id="words">__WORDS__</table>
<h2>Top images (image tower)</h2><div class="tiles" id="images">__IMAGES__</div>
<h2>Where it fires</h2><div class="tiles" id="heatmaps"></div>
<h2>Evolution through training</h2><table id="evolution">__EVOLUTION__</table>
<script>
const HEATMAPS = __HEATMAPS__;
const box = document.getElementById('heatmaps');
if (!HEATMAPS.length) box.innerHTML = '<p class="muted">silent on the token sample</p>';
HEATMAPS.forEach(h => {
  const tile = document.createElement('div'); tile.className = 'tile';
  const canvas = document.createElement('canvas'); canvas.width = canvas.height = 128;
  const img = new Image(); img.src = '../../images/' + h.key + '.jpg';
  img.onload = () => { const g = canvas.getContext('2d'); g.imageSmoothingEnabled = false;
    g.drawImage(img, 0, 0, 128, 128); const side = Math.sqrt(h.heat.length), cell = 128 / side,
    top = Math.max(...h.heat) || 1;
    h.heat.forEach((v, i) => { g.fillStyle = 'rgba(255,0,0,' + (0.65 * v / top) + ')';
      g.fillRect((i % side) * cell, Math.floor(i / side) * cell, cell, cell); }); };
  tile.appendChild(canvas); tile.appendChild(document.createElement('br'));
  tile.appendChild(document.createTextNode(h.key + ' max ' + Math.max(...h.heat).toFixed(2)));
  box.appendChild(tile);
});
</script></body></html>
"""

PLACEHOLDER = re.compile(r"__([A-Z]+(?:_[A-Z]+)*)__")

ROOT = """<!doctype html><html><head><meta charset="utf-8"><title>sparseclip feature atlas</title>
<style>__STYLE__</style></head><body><h1>sparseclip feature atlas</h1><table><tr><th>model</th><th>width</th>
<th>L0 (images)</th><th>pointing game</th><th>figures</th></tr>__ROWS__</table></body></html>
"""


def _fill(template: str, **values: str) -> str:
    """Replace each ``__KEY__`` placeholder of the template in one pass: text already inserted is
    never scanned again, so a value that contains ``__OTHER__`` stays literal."""
    values = {"STYLE": STYLE, **values}
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _number(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


# Characters the HTML tokenizer acts on inside <script> ('<' alone starts '</script>' and the
# '<!--' that makes a later '<script>' swallow the real end tag), and the line separators that
# old JavaScript parsers reject in string literals: written as JSON escapes, the same string.
SCRIPT_UNSAFE = {ord(c): f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"}


def _json(value: Any) -> str:
    """JSON that is inert inside <script>: no character in it can end or re-mode the element."""
    return json.dumps(value, separators=(",", ":")).translate(SCRIPT_UNSAFE)


def image_tile(key: str, caption: str, prefix: str) -> str:
    key_html = html.escape(key)
    return (f'<div class="tile"><img class="thumb" src="{prefix}images/{key_html}.jpg" alt="{key_html}"><br>'
            f"{html.escape(caption)}</div>")


def write_index(out_dir: Path, title: str, subtitle: str, features: Sequence[Mapping[str, Any]],
                word_features: Mapping[str, Sequence[tuple[int, float]]]) -> Path:
    """The searchable list; ``features`` carry feature, name, words, modality, density, clarity."""
    rows = [{k: f.get(k) for k in ("feature", "name", "modality", "density", "clarity")} | {"words": f["words"][:10]}
            for f in features]
    page = _fill(INDEX, TITLE=html.escape(title), SUBTITLE=html.escape(subtitle), FEATURES=_json(rows),
                 WORD_FEATURES=_json(_word_entries(word_features)))
    path = out_dir / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _word_entries(word_features: Mapping[str, Sequence[tuple[int, float]]]) -> list[list[Any]]:
    """[word, [[feature, activation], ...]] pairs for the page's ``new Map(...)``: a Map, unlike an
    object literal, holds a word such as ``__proto__`` or ``constructor`` as an ordinary key, and
    its lookups never reach Object.prototype."""
    return [[w.lower(), [[int(f), round(float(v), 3)] for f, v in fs]] for w, fs in word_features.items()]


def write_feature_page(out_dir: Path, feature: Mapping[str, Any], heatmaps: Sequence[Mapping[str, Any]],
                       evolution: Sequence[Mapping[str, Any]]) -> Path:
    """One feature's page: words, images, heatmaps ({key, heat: [T]}), evolution rows."""
    top = max(feature["word_scores"][:1] or [1.0]) or 1.0
    words = "".join(f'<tr><td>{html.escape(w)}</td><td>{s:.3f}</td><td><span class="bar" style="width:'
                    f'{int(120 * s / top)}px"></span></td></tr>'
                    for w, s in zip(feature["words"], feature["word_scores"]))
    images = "".join(image_tile(k, f"{k} ({s:.2f})", "../../") for k, s in zip(feature["images"],
                                                                              feature["image_scores"]))
    evo = "<tr><th>snapshot</th><th>name</th><th>top words</th><th>top images</th></tr>" + "".join(
        f"<tr><td>{html.escape(r['checkpoint'])}</td><td>{html.escape(r['name'] or 'silent')}"
        f"{' <b>renamed</b>' if r['renamed'] else ''}</td><td>{html.escape(', '.join(r['words'][:5]))}</td>"
        f"<td>{''.join(image_tile(k, '', '../../') for k in r['images'][:3])}</td></tr>" for r in evolution)
    page = _fill(FEATURE, ID=str(feature["feature"]), NAME=html.escape(feature["name"] or "silent"),
                 MODALITY=_number(feature.get("modality")), DENSITY=_number(feature.get("density")),
                 CLARITY=_number(feature.get("clarity")), WORDS=words or "<tr><td>none</td></tr>",
                 IMAGES=images or '<p class="muted">no image activates it</p>',
                 EVOLUTION=evo if evolution else "<tr><td>no snapshots</td></tr>", HEATMAPS=_json(list(heatmaps)))
    path = out_dir / "features" / f"{feature['feature']}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def write_root(out_dir: Path, models: Sequence[Mapping[str, Any]]) -> Path:
    """The atlas's front page: one row per model, linking its index and figures."""
    rows = "".join(
        f'<tr><td><a href="{html.escape(m["variant"])}/index.html">{html.escape(m["variant"])}</a></td>'
        f'<td>{m["width"]}</td><td>{_number(m.get("l0"))}</td><td>{_number(m.get("pointing"))}</td><td>'
        + " ".join(f'<a href="{html.escape(m["variant"])}/{html.escape(f)}">{html.escape(Path(f).stem)}</a>'
                   for f in m.get("figures", [])) + "</td></tr>" for m in models)
    path = out_dir / "index.html"
    path.write_text(_fill(ROOT, ROWS=rows), encoding="utf-8")
    return path
