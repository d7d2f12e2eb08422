// The results explorer (written by `pnd report`, see report/explore.rs). Everything it shows
// comes from the JSON blob above; the URL fragment holds the filter and the view.
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('data').textContent);
  // Fields of a row (see PageData in explore.rs).
  var M = 0, S = 1, P = 2, SEED = 3, URL = 4, PT = 5, CT = 6, REF = 7, ID = 8, SC = 9, DL = 10;
  var R = D.rows, NS = D.scores.length;
  var DEFAULT = { view: 'grid', subject: '', prompt: '', seed: '', method: [], sort: '', order: 'desc', page: 1, size: 100 };
  var SIZES = [50, 100, 200, 500];
  var $ = function (id) { return document.getElementById(id); };
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function finite(v) { return typeof v === 'number' && isFinite(v); }
  function fmt(v) { return finite(v) ? v.toFixed(4) : '\u2013'; }
  function signed(v) { return finite(v) ? (v >= 0 ? '+' : '') + v.toFixed(4) : '\u2013'; }
  function uniq(values) {
    var seen = {}, out = [];
    values.forEach(function (v) { if (!seen.hasOwnProperty(v)) { seen[v] = 1; out.push(v); } });
    return out.sort(function (a, b) { return a - b; });
  }
  // Paired differences: the row's scores minus those of the row it is compared with (the
  // report's pairing, see explore.rs), in place of that row's index.
  var paired = R.map(function (r) { return r[DL]; });
  R.forEach(function (r, i) {
    var b = paired[i];
    r[DL] = b < 0 ? null : r[SC].map(function (v, k) {
      var w = R[b][SC][k];
      return v === null || w === null ? null : v - w;
    });
  });
  var PROMPTS = uniq(R.map(function (r) { return r[P]; }));
  var SEEDS = uniq(R.map(function (r) { return r[SEED]; }));

  // The fragment: key=value pairs; `method` is a comma-separated list of encoded names.
  function parse(hash) {
    var s = copy(DEFAULT);
    hash.replace(/^#/, '').split('&').forEach(function (part) {
      if (!part) return;
      var i = part.indexOf('=');
      var key = decodeURIComponent(i < 0 ? part : part.slice(0, i));
      var raw = i < 0 ? '' : part.slice(i + 1);
      if (key === 'method') {
        s.method = raw ? raw.split(',').map(decodeURIComponent) : [];
      } else if (DEFAULT.hasOwnProperty(key)) {
        s[key] = decodeURIComponent(raw);
      }
    });
    s.page = Math.max(1, parseInt(s.page, 10) || 1);
    s.size = SIZES.indexOf(+s.size) >= 0 ? +s.size : DEFAULT.size;
    if (s.view !== 'compare') s.view = 'grid';
    if (s.order !== 'asc') s.order = 'desc';
    return s;
  }
  function copy(s) {
    var o = {};
    for (var k in s) o[k] = Array.isArray(s[k]) ? s[k].slice() : s[k];
    return o;
  }
  function fragment(s) {
    var parts = [];
    for (var k in DEFAULT) {
      if (k === 'method') {
        if (s.method.length) parts.push('method=' + s.method.map(encodeURIComponent).join(','));
      } else if (String(s[k]) !== String(DEFAULT[k])) {
        parts.push(k + '=' + encodeURIComponent(s[k]));
      }
    }
    return parts.join('&');
  }

  var state = parse(location.hash);

  // Rows passing the method filter and, unless `keyFree`, the subject, prompt and seed filters.
  function filtered(s, keyFree) {
    var methods = null;
    if (s.method.length) {
      methods = {};
      D.methods.forEach(function (m, k) { if (s.method.indexOf(m.name) >= 0) methods[k] = 1; });
    }
    var subject = s.subject === '' ? null : D.subjects.indexOf(s.subject);
    var prompt = s.prompt === '' ? null : +s.prompt;
    var seed = s.seed === '' ? null : +s.seed;
    return R.filter(function (r) {
      if (methods && !methods[r[M]]) return false;
      if (keyFree) return true;
      return (subject === null || r[S] === subject) && (prompt === null || r[P] === prompt) &&
        (seed === null || r[SEED] === seed);
    });
  }
  // The sort key's value of a row: `dino`, or `delta:dino` for the paired difference.
  function sortValue(s) {
    var delta = s.sort.indexOf('delta:') === 0;
    var k = D.scores.indexOf(delta ? s.sort.slice(6) : s.sort);
    return function (r) {
      var v = delta ? (r[DL] ? r[DL][k] : null) : r[SC][k];
      return finite(v) ? v : null;
    };
  }
  function sorted(rows, s) {
    if (!s.sort) return rows;
    var value = sortValue(s), sign = s.order === 'asc' ? 1 : -1;
    return rows.map(function (r, i) { return [value(r), i, r]; }).sort(function (a, b) {
      if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
      return sign * (a[0] - b[0]) || a[1] - b[1];
    }).map(function (x) { return x[2]; });
  }

  function setOptions(select, options) {
    select.textContent = '';
    options.forEach(function (o) {
      var e = el('option', null, o[1]);
      e.value = o[0];
      select.appendChild(e);
    });
  }
  function buildControls() {
    setOptions($('f-subject'), [['', 'all']].concat(D.subjects.map(function (x) { return [x, x]; })));
    setOptions($('f-seed'), [['', 'all']].concat(SEEDS.map(function (x) { return [String(x), String(x)]; })));
    var sorts = [['', 'run order']];
    D.scores.forEach(function (x, k) { sorts.push([x, D.labels[k]]); });
    D.scores.forEach(function (x, k) { sorts.push(['delta:' + x, '\u0394' + D.labels[k] + ' (paired)']); });
    setOptions($('f-sort'), sorts);
    var box = $('f-methods');
    D.methods.forEach(function (m) {
      var label = el('label');
      var c = el('input');
      c.type = 'checkbox';
      c.value = m.name;
      label.appendChild(c);
      label.appendChild(document.createTextNode(' ' + m.label));
      box.appendChild(label);
    });
    ['f-view', 'f-subject', 'f-prompt', 'f-seed', 'f-sort', 'f-order', 'f-size'].forEach(function (id) {
      $(id).addEventListener('change', fromControls);
    });
    box.addEventListener('change', fromControls);
    $('f-reset').addEventListener('click', function () { go(copy(DEFAULT)); });
  }
  function promptOptions(s) {
    // The prompt's text for the chosen subject (prompts name the subject's class).
    var subject = s.subject === '' ? null : D.subjects.indexOf(s.subject);
    var text = {};
    R.forEach(function (r) {
      if ((subject === null || r[S] === subject) && !text.hasOwnProperty(r[P])) text[r[P]] = D.texts[r[CT]];
    });
    setOptions($('f-prompt'), [['', 'all']].concat(PROMPTS.map(function (p) {
      return [String(p), subject === null || !text[p] ? String(p) : p + ': ' + text[p]];
    })));
  }
  function toControls(s) {
    promptOptions(s);
    $('f-view').value = s.view;
    $('f-subject').value = s.subject;
    $('f-prompt').value = s.prompt;
    $('f-seed').value = s.seed;
    $('f-sort').value = s.sort;
    $('f-order').value = s.order;
    $('f-size').value = String(s.size);
    var boxes = $('f-methods').querySelectorAll('input');
    for (var i = 0; i < boxes.length; i++) {
      boxes[i].checked = !s.method.length || s.method.indexOf(boxes[i].value) >= 0;
    }
  }
  function fromControls() {
    var s = copy(state);
    s.view = $('f-view').value;
    s.subject = $('f-subject').value;
    s.prompt = $('f-prompt').value;
    s.seed = $('f-seed').value;
    s.sort = $('f-sort').value;
    s.order = $('f-order').value;
    s.size = +$('f-size').value;
    var boxes = $('f-methods').querySelectorAll('input'), on = [];
    for (var i = 0; i < boxes.length; i++) if (boxes[i].checked) on.push(boxes[i].value);
    s.method = on.length === boxes.length ? [] : on;
    s.page = 1;
    go(s);
  }
  // A new state: into the fragment (a history entry, so Back undoes a filter), then drawn.
  function go(s) {
    var f = '#' + fragment(s);
    if (f === location.hash || (f === '#' && !location.hash)) {
      state = s;
      render();
    } else {
      location.hash = f;
    }
  }
  window.addEventListener('hashchange', function () { state = parse(location.hash); render(); });

  // One score line per metric: name, value, paired difference.
  function scoreTable(r) {
    var t = el('div', 'sc');
    for (var k = 0; k < NS; k++) {
      t.appendChild(el('span', 'k', D.labels[k]));
      var v = el('span', 'score', fmt(r[SC][k]));
      v.setAttribute('data-metric', D.scores[k]);
      v.setAttribute('data-v', String(r[SC][k]));
      t.appendChild(v);
      var d = r[DL] ? r[DL][k] : null;
      var x = el('span', 'delta' + (finite(d) ? (d > 0 ? ' up' : d < 0 ? ' down' : '') : ''), r[DL] ? signed(d) : '');
      if (r[DL]) {
        x.setAttribute('data-metric', D.scores[k]);
        x.setAttribute('data-v', String(d));
      }
      t.appendChild(x);
    }
    return t;
  }
  function versus(r) {
    var vs = D.methods[r[M]].vs;
    return r[DL] && vs !== null ? '\u0394 = this image \u2212 ' + D.methods[vs].label + ' on the same subject, prompt and seed' : '';
  }
  function compareLink(r) {
    var s = copy(DEFAULT);
    s.view = 'compare';
    s.subject = D.subjects[r[S]];
    s.prompt = String(r[P]);
    s.seed = String(r[SEED]);
    return '#' + fragment(s);
  }
  function card(r) {
    var c = el('div', 'card');
    c.setAttribute('data-id', r[ID]);
    var a = el('a');
    a.href = compareLink(r);
    a.title = 'every method on this subject, prompt and seed';
    var img = el('img', 'thumb');
    img.loading = 'lazy';
    img.decoding = 'async';
    img.width = 180;
    img.height = 180;
    img.alt = r[ID];
    img.src = r[URL];
    a.appendChild(img);
    c.appendChild(a);
    c.appendChild(el('div', 'm', D.methods[r[M]].label));
    var where = el('div', 'w', D.subjects[r[S]] + ' \u00b7 prompt ' + r[P] + ' \u00b7 seed ' + r[SEED]);
    where.title = D.texts[r[PT]];
    c.appendChild(where);
    var t = scoreTable(r);
    t.title = versus(r);
    c.appendChild(t);
    return c;
  }
  function pager(nav, page, pages) {
    nav.textContent = '';
    if (pages <= 1) return;
    var add = function (label, p) {
      var b = el('button', null, label);
      b.type = 'button';
      b.disabled = p < 1 || p > pages || p === page;
      b.addEventListener('click', function () { var s = copy(state); s.page = p; go(s); window.scrollTo(0, 0); });
      nav.appendChild(b);
    };
    add('\u00ab first', 1);
    add('\u2039 previous', page - 1);
    nav.appendChild(el('span', 'pg', 'page ' + page + ' of ' + pages));
    add('next \u203a', page + 1);
    add('last \u00bb', pages);
  }
  function renderGrid() {
    var rows = sorted(filtered(state, false), state);
    var pages = Math.max(1, Math.ceil(rows.length / state.size));
    var page = Math.min(state.page, pages);
    var shown = rows.slice((page - 1) * state.size, page * state.size);
    var status = $('status');
    status.textContent = '';
    var n = el('span', null, String(rows.length));
    n.id = 'count';
    status.appendChild(n);
    status.appendChild(document.createTextNode(' of ' + R.length + ' images match; ' + shown.length + ' shown' +
      (unknownMethods().length ? ' (no method named ' + unknownMethods().join(', ') + ')' : '') +
      '. Coloured numbers: the paired difference (\u0394) from the image of the same subject, prompt and seed' +
      ' under the method it is compared with. Click an image for every method on that cell.'));
    var box = $('grid'), f = document.createDocumentFragment();
    shown.forEach(function (r) { f.appendChild(card(r)); });
    box.textContent = '';
    box.appendChild(f);
    pager($('pager'), page, pages);
    pager($('pager2'), page, pages);
  }
  function unknownMethods() {
    return state.method.filter(function (n) { return !D.methods.some(function (m) { return m.name === n; }); });
  }
  function key(r) { return r[S] + '/' + r[P] + '/' + r[SEED]; }
  function renderCompare() {
    var box = $('compare');
    box.textContent = '';
    $('pager').textContent = '';
    $('pager2').textContent = '';
    // The cells (subject, prompt, seed) of the chosen methods, in order; the one named, else the
    // first that passes the filter.
    var all = filtered(state, true).slice().sort(function (a, b) {
      return a[S] - b[S] || a[P] - b[P] || a[SEED] - b[SEED] || a[M] - b[M];
    });
    var keys = uniqKeys(all);
    var pick = filtered(state, false);
    var status = $('status');
    if (!pick.length) {
      status.textContent = 'No image matches this subject, prompt and seed.';
      return;
    }
    var k = key(pick[0]);
    var rows = all.filter(function (r) { return key(r) === k; });
    var at = keys.indexOf(k), first = rows[0];
    status.textContent = '';
    var n = el('span', null, String(rows.length));
    n.id = 'count';
    status.appendChild(n);
    status.appendChild(document.createTextNode(' methods on ' + D.subjects[first[S]] + ', prompt ' + first[P] +
      ' (\u201c' + D.texts[first[CT]] + '\u201d), seed ' + first[SEED] + ' \u2014 cell ' + (at + 1) + ' of ' + keys.length + '.'));
    var nav = el('div', 'cmpnav');
    [['\u2039 previous cell', at - 1], ['next cell \u203a', at + 1]].forEach(function (x) {
      var b = el('button', null, x[0]);
      b.type = 'button';
      b.disabled = x[1] < 0 || x[1] >= keys.length;
      b.addEventListener('click', function () {
        var parts = keys[x[1]].split('/'), s = copy(state);
        s.subject = D.subjects[+parts[0]];
        s.prompt = parts[1];
        s.seed = parts[2];
        go(s);
      });
      nav.appendChild(b);
    });
    var back = el('button', null, 'thumbnails of this subject');
    back.type = 'button';
    back.addEventListener('click', function () {
      var s = copy(DEFAULT);
      s.subject = D.subjects[first[S]];
      go(s);
    });
    nav.appendChild(back);
    box.appendChild(nav);
    var line = el('div', 'cmp');
    uniq(rows.map(function (r) { return r[REF]; })).forEach(function (ref) {
      if (ref < 0 || !D.refs[ref]) return;
      var f = el('figure', 'col ref');
      var img = el('img', 'ref');
      img.src = D.refs[ref];
      img.alt = 'reference of ' + D.subjects[first[S]];
      f.appendChild(img);
      f.appendChild(el('figcaption', 'm', 'reference'));
      line.appendChild(f);
    });
    rows.forEach(function (r) {
      var f = el('figure', 'col');
      f.setAttribute('data-id', r[ID]);
      var a = el('a');
      a.href = r[URL];
      var img = el('img', 'full');
      img.loading = 'lazy';
      img.alt = r[ID];
      img.src = r[URL];
      a.appendChild(img);
      f.appendChild(a);
      var cap = el('figcaption');
      cap.appendChild(el('div', 'm', D.methods[r[M]].label));
      cap.appendChild(el('div', 'w', D.texts[r[PT]]));
      var t = scoreTable(r);
      cap.appendChild(t);
      var vs = versus(r);
      if (vs) cap.appendChild(el('div', 'vs', vs));
      f.appendChild(cap);
      line.appendChild(f);
    });
    box.appendChild(line);
  }
  function uniqKeys(rows) {
    var seen = {}, out = [];
    rows.forEach(function (r) { var k = key(r); if (!seen[k]) { seen[k] = 1; out.push(k); } });
    return out;
  }
  function render() {
    var t0 = performance.now();
    toControls(state);
    var grid = state.view === 'grid';
    $('grid').style.display = grid ? '' : 'none';
    $('compare').style.display = grid ? 'none' : '';
    if (grid) {
      $('compare').textContent = '';
      renderGrid();
    } else {
      $('grid').textContent = '';
      renderCompare();
    }
    document.body.setAttribute('data-view', state.view);
    document.body.setAttribute('data-render-ms', (performance.now() - t0).toFixed(1));
  }
  buildControls();
  render();
})();
