/* headscope attention views: head, model and neuron view of one document.
 *
 * The payload (script#hs-payload) holds every window as base64 arrays; a window is decoded the
 * first time it is shown and only the current window is drawn. A thinned payload shows only
 * some layers and heads (payload.layers, payload.heads): the selectors offer only those.
 */
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const payload = JSON.parse($('hs-payload').textContent);
  const L = payload.model.num_layers;
  const H = payload.model.num_heads;
  const CAUSAL = payload.model.causal;
  const WINDOWS = payload.model.layer_windows || [];  // per layer: sliding window or null
  const range = (n) => Array.from({ length: n }, (_, i) => i);
  const LAYERS = payload.layers || range(L); // the layers and heads this page holds
  const HEADS = payload.heads || range(H);
  const TOP_K = payload.top_k || null; // at most this many weights per query row
  const LAYER_AT = new Map(LAYERS.map((l, i) => [l, i]));
  const HEAD_AT = new Map(HEADS.map((h, i) => [h, i]));

  const ROW = 18; // px per token row in the head view
  const TOP = 30; // px above the first row (column titles)
  const LABEL_W = 150; // px of a token column
  const GAP = 280; // px between the two token columns
  const THUMB = 60; // px (and at most cells) of a model-view thumbnail
  const DETAIL = 512; // at most cells of the enlarged matrix
  const NROW = 16; // px per key row in the neuron view
  const FILTERS = { all: [[0, 1], [0, 1]], aa: [[0], [0]], ab: [[0], [1]], ba: [[1], [0]],
    bb: [[1], [1]] };

  const COLOURS = Array.from({ length: H }, (_, h) =>
    `hsl(${Math.round((h * 137.508 + 210) % 360)}, 68%, ${h % 2 ? 40 : 48}%)`);

  const state = {
    win: 0,
    tab: 'head',
    layer: LAYERS[0],
    heads: range(H).map((h) => HEAD_AT.has(h)),
    filter: 'all',
    hideSpecial: false,
    model: { layer: LAYERS[0], head: HEADS[0] },
    neuron: { layer: LAYERS[0], head: HEADS[0], query: -1 },
    layout: null, // rows of the drawn head view, for hovering
  };
  const dirty = { head: true, model: true, neuron: true };
  const cache = new Map();

  /* ---- decoding -------------------------------------------------------------------------- */

  const LITTLE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
  const KINDS = {
    u16: [Uint16Array, 2, 'getUint16'],
    u32: [Uint32Array, 4, 'getUint32'],
    f32: [Float32Array, 4, 'getFloat32'],
  };

  function decode(text, kind) {
    const bin = atob(text);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const [Type, size, getter] = KINDS[kind];
    if (LITTLE) return new Type(bytes.buffer);
    const view = new DataView(bytes.buffer);
    const out = new Type(bytes.length / size);
    for (let i = 0; i < out.length; i++) out[i] = view[getter](i * size, true);
    return out;
  }

  function windowData(index) {
    let d = cache.get(index);
    if (d) return d;
    const w = payload.windows[index];
    const a = w.attention;
    d = {
      w,
      n: w.n_tokens,
      offsets: decode(a.offsets, 'u32'),
      query: decode(a.query, 'u16'),
      key: decode(a.key, 'u16'),
      weight: decode(a.weight, 'f32'),
      qk: undefined,
    };
    cache.set(index, d);
    return d;
  }

  function vectorsOf(d) {
    if (d.qk === undefined) {
      const v = d.w.qk;
      d.qk = v ? { dim: v.dim, scale: v.scale, q: decode(v.query, 'f32'), k: decode(v.key, 'f32') }
        : null;
    }
    return d.qk;
  }

  /** First and one-past-last stored row of (layer, head). */
  function span(d, layer, head) {
    const slot = layer * H + head;
    return [d.offsets[slot], d.offsets[slot + 1]];
  }

  /* ---- small helpers --------------------------------------------------------------------- */

  const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);
  const clip = (s, n) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);
  const options = (values, label) =>
    values.map((v) => `<option value="${v}">${esc(label(v))}</option>`).join('');

  function firstContent(w) {
    const i = w.is_special.indexOf(0);
    return i < 0 ? 0 : i;
  }

  /* ---- head view ------------------------------------------------------------------------- */

  /** Row of every token in the query (left) and key (right) column, -1 when filtered out. */
  function headLayout(d) {
    const w = d.w;
    const [qs, ks] = FILTERS[w.pair ? state.filter : 'all'];
    const left = new Int32Array(d.n).fill(-1);
    const right = new Int32Array(d.n).fill(-1);
    let nl = 0;
    let nr = 0;
    for (let i = 0; i < d.n; i++) {
      if (state.hideSpecial && w.is_special[i]) continue;
      if (qs.includes(w.segment[i])) left[i] = nl++;
      if (ks.includes(w.segment[i])) right[i] = nr++;
    }
    return { left, right, rows: Math.max(nl, nr, 1) };
  }

  function headLines(d, layout, x1, x2, y) {
    const out = [];
    for (const h of HEADS) {
      if (!state.heads[h]) continue;
      const [a, b] = span(d, state.layer, h);
      const colour = COLOURS[h];
      for (let r = a; r < b; r++) {
        const q = d.query[r];
        const k = d.key[r];
        const lq = layout.left[q];
        const rk = layout.right[k];
        if (lq < 0 || rk < 0) continue;
        out.push(`<line class="attn" data-head="${h}" data-q="${q}" data-k="${k}" x1="${x1}" ` +
          `y1="${y(lq)}" x2="${x2}" y2="${y(rk)}" stroke="${colour}" ` +
          `stroke-opacity="${d.weight[r].toFixed(3)}"/>`);
      }
    }
    return out;
  }

  function headTokens(d, layout, x1, x2, y) {
    const w = d.w;
    const out = [
      `<text class="hs-col hs-col-q" x="${x1 - 8}" y="${TOP / 2}">queries</text>`,
      `<text class="hs-col" x="${x2 + 8}" y="${TOP / 2}">keys</text>`,
    ];
    for (let i = 0; i < d.n; i++) {
      const cls = w.is_special[i] ? ' special' : '';
      const label = esc(clip(w.tokens[i], 20));
      if (layout.left[i] >= 0) {
        out.push(`<text class="tok tq${cls}" data-i="${i}" x="${x1 - 8}" ` +
          `y="${y(layout.left[i])}">${label}</text>`);
      }
      if (layout.right[i] >= 0) {
        out.push(`<text class="tok tk${cls}" data-i="${i}" x="${x2 + 8}" ` +
          `y="${y(layout.right[i])}">${label}</text>`);
      }
    }
    return out;
  }

  function drawHead() {
    const started = performance.now();
    const d = windowData(state.win);
    const layout = headLayout(d);
    const x1 = LABEL_W;
    const x2 = LABEL_W + GAP;
    const y = (row) => TOP + row * ROW + ROW / 2;
    const lines = headLines(d, layout, x1, x2, y);
    const svg = $('hs-head-svg');
    state.layout = null;
    hoverHead(null);
    state.layout = Object.assign(layout, { x1, x2, y });
    for (const el of [svg, $('hs-head-top')]) {
      el.setAttribute('width', x2 + LABEL_W);
      el.setAttribute('height', TOP + layout.rows * ROW + 6);
    }
    $('hs-lines').innerHTML = lines.join('');
    $('hs-toks').innerHTML = headTokens(d, layout, x1, x2, y).join('');
    Object.assign(svg.dataset, {
      count: lines.length,
      layer: state.layer,
      window: d.w.window,
      filter: d.w.pair ? state.filter : 'all',
      hideSpecial: state.hideSpecial ? '1' : '0',
      draws: Number(svg.dataset.draws || 0) + 1,
      ms: (performance.now() - started).toFixed(1),
    });
    $('hs-head-count').textContent =
      `${lines.length.toLocaleString()} weight${lines.length === 1 ? '' : 's'} drawn`;
    const filter = $('hs-filter');
    filter.disabled = !d.w.pair;
    $('hs-filter-label').classList.toggle('hs-off', !d.w.pair);
    $('hs-filter-label').title = d.w.pair ? '' : 'this window is a single text, not a pair';
  }

  /** Highlight the lines of token ``i`` on ``side`` ('q' or 'k'); null clears.
   *
   * The drawn lines are only dimmed as one group; the highlighted ones are copies in an
   * overlay group, so hovering never restyles thousands of line elements.
   */
  function hoverHead(side, i) {
    const svg = $('hs-head-svg');
    const top = $('hs-head-top');
    for (const t of top.querySelectorAll('text.hl')) t.classList.remove('hl');
    const layout = state.layout;
    if (side === null || side === undefined || !layout) {
      $('hs-hl').innerHTML = '';
      svg.classList.remove('hovering');
      return;
    }
    const d = windowData(state.win);
    const index = Number(i);
    const other = side === 'q' ? 'k' : 'q';
    const parts = [];
    const partners = new Set();
    for (const h of HEADS) {
      if (!state.heads[h]) continue;
      const [a, b] = span(d, state.layer, h);
      for (let r = a; r < b; r++) {
        const q = d.query[r];
        const k = d.key[r];
        if ((side === 'q' ? q : k) !== index) continue;
        if (layout.left[q] < 0 || layout.right[k] < 0) continue;
        partners.add(side === 'q' ? k : q);
        parts.push(`<line x1="${layout.x1}" y1="${layout.y(layout.left[q])}" x2="${layout.x2}" ` +
          `y2="${layout.y(layout.right[k])}" stroke="${COLOURS[h]}" ` +
          `stroke-opacity="${Math.max(0.25, d.weight[r]).toFixed(3)}"/>`);
      }
    }
    $('hs-hl').innerHTML = parts.join('');
    const mark = (cls, j) => {
      const t = top.querySelector(`text.t${cls}[data-i="${j}"]`);
      if (t) t.classList.add('hl');
    };
    mark(side, index);
    for (const j of partners) mark(other, j);
    svg.classList.add('hovering');
  }

  function initHead() {
    $('hs-layer').innerHTML = options(LAYERS, (l) => `layer ${l}`);
    $('hs-layer').addEventListener('change', (e) => {
      state.layer = Number(e.target.value);
      redraw('head');
    });
    $('hs-filter').addEventListener('change', (e) => {
      state.filter = e.target.value;
      redraw('head');
    });
    $('hs-hide-special').addEventListener('change', (e) => {
      state.hideSpecial = e.target.checked;
      redraw('head');
    });
    initHeadToggles();
    const top = $('hs-head-top');
    top.addEventListener('mouseover', (e) => {
      const tok = e.target.closest && e.target.closest('text.tok');
      if (tok) hoverHead(tok.classList.contains('tq') ? 'q' : 'k', tok.dataset.i);
      else hoverHead(null);
    });
    top.addEventListener('mouseleave', () => hoverHead(null));
  }

  function initHeadToggles() {
    const box = $('hs-heads');
    box.innerHTML = HEADS.map((h) =>
      `<label class="hs-head-toggle" title="head ${h} (double-click: only this head)">` +
      `<input type="checkbox" data-head="${h}" checked>` +
      `<span class="hs-swatch" style="background:${COLOURS[h]}"></span>${h}</label>`).join('') +
      '<button type="button" data-heads="all">all heads</button>' +
      '<button type="button" data-heads="none">none</button>';
    const sync = () => {
      for (const input of box.querySelectorAll('input[data-head]')) {
        input.checked = state.heads[Number(input.dataset.head)];
      }
      redraw('head');
    };
    box.addEventListener('change', (e) => {
      if (e.target.dataset.head === undefined) return;
      state.heads[Number(e.target.dataset.head)] = e.target.checked;
      redraw('head');
    });
    box.addEventListener('click', (e) => {
      const which = e.target.dataset && e.target.dataset.heads;
      if (!which) return;
      for (const h of HEADS) state.heads[h] = which === 'all';
      sync();
    });
    box.addEventListener('dblclick', (e) => {
      const label = e.target.closest('label');
      if (!label) return;
      const h = Number(label.querySelector('input').dataset.head);
      state.heads.fill(false);
      state.heads[h] = true;
      sync();
    });
  }

  /* ---- model view ------------------------------------------------------------------------ */

  /** Draw the weights of (layer, head) as a heatmap of at most ``cells`` × ``cells`` (max). */
  function heatmap(canvas, d, layer, head, cells) {
    const g = Math.max(1, Math.min(d.n, cells));
    const scale = g / d.n;
    const grid = new Float32Array(g * g);
    const [a, b] = span(d, layer, head);
    for (let r = a; r < b; r++) {
      const c = Math.floor(d.query[r] * scale) * g + Math.floor(d.key[r] * scale);
      if (d.weight[r] > grid[c]) grid[c] = d.weight[r];
    }
    canvas.width = g;
    canvas.height = g;
    const ctx = canvas.getContext('2d');
    const img = ctx.createImageData(g, g);
    for (let i = 0; i < grid.length; i++) {
      const v = Math.sqrt(Math.min(1, grid[i])); // √weight: small weights stay visible
      img.data[4 * i] = 255 - v * 235;
      img.data[4 * i + 1] = 255 - v * 180;
      img.data[4 * i + 2] = 255 - v * 100;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawModel() {
    const d = windowData(state.win);
    const grid = $('hs-model-grid');
    grid.style.gridTemplateColumns = `auto repeat(${HEADS.length}, ${THUMB + 2}px)`;
    let html = '<span></span>' + HEADS.map((h) => `<span class="hs-mhead">${h}</span>`).join('');
    for (const l of LAYERS) {
      html += `<span class="hs-mlabel">layer ${l}</span>`;
      html += HEADS.map((h) => `<canvas class="hs-thumb" data-layer="${l}" data-head="${h}" ` +
        `title="layer ${l}, head ${h}"></canvas>`).join('');
    }
    grid.innerHTML = html;
    for (const canvas of grid.querySelectorAll('canvas.hs-thumb')) {
      heatmap(canvas, d, Number(canvas.dataset.layer), Number(canvas.dataset.head), THUMB);
    }
    grid.dataset.window = d.w.window;
    drawDetail();
  }

  function drawDetail() {
    const d = windowData(state.win);
    const { layer, head } = state.model;
    for (const c of $('hs-model-grid').querySelectorAll('canvas.hs-thumb')) {
      c.classList.toggle('selected', Number(c.dataset.layer) === layer &&
        Number(c.dataset.head) === head);
    }
    const box = $('hs-model-detail');
    box.dataset.layer = layer;
    box.dataset.head = head;
    $('hs-detail-title').textContent = `Layer ${layer}, head ${head}`;
    const canvas = $('hs-detail-canvas');
    heatmap(canvas, d, layer, head, DETAIL);
    const size = Math.min(DETAIL, Math.max(280, d.n * 6));
    canvas.style.width = `${size}px`;
    canvas.style.height = `${size}px`;
    const [a, b] = span(d, layer, head);
    const top = range(b - a).map((i) => a + i).sort((x, y) => d.weight[y] - d.weight[x]);
    const toks = d.w.tokens;
    const what = TOP_K ? `weights shown (at most the top ${TOP_K} per query)` : 'stored weights';
    $('hs-detail-stats').textContent = `${(b - a).toLocaleString()} ${what}; rows are ` +
      'queries, columns keys (colour: √weight). Strongest:';
    $('hs-detail-top').innerHTML = top.slice(0, 5).map((r) =>
      `<li>${esc(toks[d.query[r]])} → ${esc(toks[d.key[r]])}: ${d.weight[r].toFixed(3)}</li>`)
      .join('');
    $('hs-detail-readout').textContent = '';
  }

  function detailReadout(e) {
    const d = windowData(state.win);
    const rect = e.target.getBoundingClientRect();
    const q = Math.floor(((e.clientY - rect.top) / rect.height) * d.n);
    const k = Math.floor(((e.clientX - rect.left) / rect.width) * d.n);
    if (q < 0 || k < 0 || q >= d.n || k >= d.n) return;
    const [a, b] = span(d, state.model.layer, state.model.head);
    let weight = null;
    for (let r = a; r < b; r++) {
      if (d.query[r] === q && d.key[r] === k) weight = d.weight[r];
    }
    const toks = d.w.tokens;
    const missing = TOP_K ? `not stored, or not in the top ${TOP_K}` : 'not stored';
    const value = weight === null ? missing : weight.toFixed(4);
    $('hs-detail-readout').textContent =
      `query ${q} “${toks[q]}” → key ${k} “${toks[k]}”: ${value}`;
  }

  function initModel() {
    $('hs-model-grid').addEventListener('click', (e) => {
      const c = e.target.closest('canvas.hs-thumb');
      if (!c) return;
      state.model = { layer: Number(c.dataset.layer), head: Number(c.dataset.head) };
      drawDetail();
    });
    $('hs-detail-canvas').addEventListener('mousemove', detailReadout);
    $('hs-detail-open').addEventListener('click', () => {
      state.layer = state.model.layer;
      state.heads.fill(false);
      state.heads[state.model.head] = true;
      $('hs-layer').value = String(state.layer);
      for (const input of $('hs-heads').querySelectorAll('input[data-head]')) {
        input.checked = state.heads[Number(input.dataset.head)];
      }
      dirty.head = true;
      showTab('head');
    });
  }

  /* ---- neuron view ----------------------------------------------------------------------- */

  /** q·k × the layer's scale (1/√d in BERT and GPT-2) for every key of query ``q``, softmax
   *  over the keys it may see: keys lo .. hi - 1 (causal: up to q; a sliding-window layer of
   *  window w: only keys with |q - j| < w). */
  function scores(qk, n, layer, head, q) {
    const dim = qk.dim;
    const base = (LAYER_AT.get(layer) * HEADS.length + HEAD_AT.get(head)) * n * dim;
    const qv = qk.q.subarray(base + q * dim, base + (q + 1) * dim);
    const dot = new Float64Array(n);
    const prob = new Float64Array(n);
    const window = WINDOWS[layer];
    const lo = window ? Math.max(0, q - window + 1) : 0;
    const hi = CAUSAL ? q + 1 : (window ? Math.min(n, q + window) : n);
    let max = -Infinity;
    for (let j = lo; j < hi; j++) {
      let s = 0;
      for (let c = 0; c < dim; c++) s += qv[c] * qk.k[base + j * dim + c];
      dot[j] = s * qk.scale[layer];
      if (dot[j] > max) max = dot[j];
    }
    let total = 0;
    for (let j = lo; j < hi; j++) {
      prob[j] = Math.exp(dot[j] - max);
      total += prob[j];
    }
    for (let j = lo; j < hi; j++) prob[j] /= total;
    return { qv, base, dot, prob, lo, hi };
  }

  /** Diverging colour cells (blue < 0 < orange), one pixel per value, scaled up by CSS. */
  function cells(canvas, values, rows, cols, cellW) {
    let top = 1e-12;
    for (let i = 0; i < values.length; i++) top = Math.max(top, Math.abs(values[i]));
    canvas.width = cols;
    canvas.height = rows;
    canvas.style.width = `${cols * cellW}px`;
    canvas.style.height = `${rows * NROW}px`;
    const ctx = canvas.getContext('2d');
    const img = ctx.createImageData(cols, rows);
    for (let i = 0; i < values.length; i++) {
      const v = values[i] / top;
      const t = Math.abs(v);
      const [r, g, b] = v >= 0 ? [230, 120, 20] : [30, 100, 200];
      img.data[4 * i] = 255 + (r - 255) * t;
      img.data[4 * i + 1] = 255 + (g - 255) * t;
      img.data[4 * i + 2] = 255 + (b - 255) * t;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function storedRow(d, layer, head, q) {
    const stored = new Map();
    const [a, b] = span(d, layer, head);
    for (let r = a; r < b; r++) if (d.query[r] === q) stored.set(d.key[r], d.weight[r]);
    return stored;
  }

  function neuronColumns(d, res, stored, q) {
    const toks = d.w.tokens;
    const labels = [];
    const dots = [];
    const probs = [];
    const kept = [];
    for (let j = 0; j < d.n; j++) {
      const cls = (j === q ? ' nv-q' : '') + (d.w.is_special[j] ? ' special' : '');
      labels.push(`<div class="nv-row${cls}" data-i="${j}" title="${esc(toks[j])}">` +
        `${j} ${esc(clip(toks[j], 16))}</div>`);
      if (j < res.lo || j >= res.hi) {
        dots.push('<div class="nv-row nv-masked">masked</div>');
        probs.push(`<div class="nv-row nv-softmax nv-masked" data-k="${j}" data-value="0">` +
          '0</div>');
      } else {
        const p = res.prob[j];
        dots.push(`<div class="nv-row nv-dot" data-k="${j}">${res.dot[j].toFixed(3)}</div>`);
        const bar = `<span class="nv-bar" style="width:${(p * 100).toFixed(1)}%"></span>`;
        probs.push(`<div class="nv-row nv-softmax" data-k="${j}" ` +
          `data-value="${p.toPrecision(8)}">${bar}${p.toFixed(4)}</div>`);
      }
      const w = stored.get(j);
      kept.push(w === undefined ? '<div class="nv-row nv-masked">·</div>'
        : `<div class="nv-row nv-stored" data-k="${j}" data-value="${w}">${w.toFixed(4)}</div>`);
    }
    return { labels, dots, probs, kept };
  }

  function drawNeuron() {
    const d = windowData(state.win);
    const qk = vectorsOf(d);
    $('hs-neuron-missing').hidden = Boolean(qk);
    $('hs-neuron-main').hidden = !qk;
    if (!qk) return;
    const { layer, head } = state.neuron;
    if (state.neuron.query < 0 || state.neuron.query >= d.n) state.neuron.query = firstContent(d.w);
    const q = state.neuron.query;
    $('hs-nv-layer').value = String(layer);
    $('hs-nv-head').value = String(head);
    const qsel = $('hs-nv-query');
    if (qsel.dataset.window !== String(d.w.window)) {
      qsel.innerHTML = options(range(d.n), (i) => `${i}: ${clip(d.w.tokens[i], 24)}`);
      qsel.dataset.window = d.w.window;
    }
    qsel.value = String(q);
    const dim = qk.dim;
    const res = scores(qk, d.n, layer, head, q);
    const keys = qk.k.subarray(res.base, res.base + d.n * dim);
    const prod = new Float32Array(d.n * dim);
    for (let j = 0; j < d.n; j++) {
      for (let c = 0; c < dim; c++) prod[j * dim + c] = res.qv[c] * keys[j * dim + c];
    }
    const cellW = Math.max(2, Math.min(8, Math.floor(512 / dim)));
    cells($('hs-nv-qcanvas'), res.qv, 1, dim, cellW);
    cells($('hs-nv-kcanvas'), keys, d.n, dim, cellW);
    cells($('hs-nv-pcanvas'), prod, d.n, dim, cellW);
    for (const id of ['hs-nv-khead', 'hs-nv-phead']) $(id).style.width = `${dim * cellW + 14}px`;
    const cols = neuronColumns(d, res, storedRow(d, layer, head, q), q);
    $('hs-nv-labels').innerHTML = cols.labels.join('');
    $('hs-nv-dots').innerHTML = cols.dots.join('');
    $('hs-nv-probs').innerHTML = cols.probs.join('');
    $('hs-nv-kept').innerHTML = cols.kept.join('');
    $('hs-nv-qlabel').textContent = `query ${q} “${clip(d.w.tokens[q], 12)}”`;
    Object.assign($('hs-neuron-main').dataset, { layer, head, query: q, window: d.w.window });
  }

  function initNeuron() {
    $('hs-nv-layer').innerHTML = options(LAYERS, (l) => `layer ${l}`);
    $('hs-nv-head').innerHTML = options(HEADS, (h) => `head ${h}`);
    if (TOP_K) $('hs-nv-stored-head').textContent = `stored (top ${TOP_K})`;
    const bind = (id, field) => $(id).addEventListener('change', (e) => {
      state.neuron[field] = Number(e.target.value);
      redraw('neuron');
    });
    bind('hs-nv-layer', 'layer');
    bind('hs-nv-head', 'head');
    bind('hs-nv-query', 'query');
    $('hs-nv-labels').addEventListener('click', (e) => {
      const row = e.target.closest('.nv-row');
      if (!row) return;
      state.neuron.query = Number(row.dataset.i);
      redraw('neuron');
    });
  }

  /* ---- windows, tabs --------------------------------------------------------------------- */

  const DRAW = { head: drawHead, model: drawModel, neuron: drawNeuron };

  function redraw(view) {
    dirty[view] = true;
    if (state.tab === view) {
      DRAW[view]();
      dirty[view] = false;
    }
  }

  function showTab(name) {
    state.tab = name;
    for (const tab of document.querySelectorAll('.hs-tab')) {
      tab.setAttribute('aria-selected', String(tab.dataset.tab === name));
    }
    for (const panel of document.querySelectorAll('.hs-panel')) {
      panel.hidden = panel.dataset.tab !== name;
    }
    if (dirty[name]) redraw(name);
  }

  function setWindow(index) {
    const count = payload.windows.length;
    state.win = Math.max(0, Math.min(count - 1, index));
    const w = payload.windows[state.win];
    $('hs-window').value = String(state.win);
    $('hs-prev').disabled = state.win === 0;
    $('hs-next').disabled = state.win === count - 1;
    $('hs-window-info').textContent = `window ${w.window + 1} of ${payload.n_windows}: ` +
      `${w.n_tokens} tokens (document tokens ${w.token_start}–${w.token_end - 1})`;
    $('hs-app').dataset.window = w.window;
    state.neuron.query = -1;
    for (const view of Object.keys(dirty)) dirty[view] = true;
    redraw(state.tab);
  }

  function initFrame() {
    const m = payload.model;
    $('hs-meta').textContent = `${m.name} · ${L} layers × ${H} heads · ` +
      `${CAUSAL ? 'causal' : 'bidirectional'} · attention ${payload.attention_mode} · ` +
      `document ${payload.doc_id}`;
    $('hs-window').innerHTML = options(range(payload.windows.length), (i) => {
      const w = payload.windows[i];
      return `window ${w.window + 1} (tokens ${w.token_start}–${w.token_end - 1})`;
    });
    $('hs-pager').hidden = payload.windows.length < 2;
    $('hs-window').addEventListener('change', (e) => setWindow(Number(e.target.value)));
    $('hs-prev').addEventListener('click', () => setWindow(state.win - 1));
    $('hs-next').addEventListener('click', () => setWindow(state.win + 1));
    for (const tab of document.querySelectorAll('.hs-tab')) {
      tab.addEventListener('click', () => showTab(tab.dataset.tab));
    }
  }

  function main() {
    initFrame();
    initHead();
    initModel();
    initNeuron();
    setWindow(0);
    showTab('head');
    window.hsReadyMs = performance.now();
    document.documentElement.dataset.ready = '1';
  }

  try {
    main();
  } catch (err) {
    const box = $('hs-error');
    box.hidden = false;
    box.textContent = `This view failed to draw: ${err && err.message}`;
    throw err;
  }
})();
