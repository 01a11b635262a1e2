// The browser's copy of contract/framing.py: frame a drawing or a photo the way the data set was
// made (large images reduced, ink from alpha, background polarity and level, contrast, crop, scale into the recipe's
// box, centre, sharpen). The Python docstring specifies each step; this follows it in float64, in the
// same order of operations, and tests/test_web.py checks the two agree.

function median(values) {
  const sorted = Float64Array.from(values).sort();
  const middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

// An H x W float64 image: { h, w, v: Float64Array } (row-major).
const image = (h, w, v = new Float64Array(h * w)) => ({ h, w, v });
const row = (im, y) => im.v.subarray(y * im.w, (y + 1) * im.w);
const column = (im, x) => Array.from({ length: im.h }, (_, y) => im.v[y * im.w + x]);

function borderRing(im) {
  const { h, w } = im;
  if (h <= 2 || w <= 2) return im.v;
  const ring = [...row(im, 0), ...row(im, h - 1)];
  for (let y = 1; y < h - 1; y++) ring.push(im.v[y * w], im.v[y * w + w - 1]);
  return ring;
}

/** Composite over the background that contrasts with the content (step 1); null if all clear. */
function inkFromAlpha(L, A) {
  let total = 0, weighted = 0;
  for (let i = 0; i < A.length; i++) {
    total += A[i];
    weighted += L.v[i] * A[i];
  }
  if (total <= 0) return null;
  const background = weighted / total < 127.5 ? 255 : 0;
  return image(L.h, L.w, L.v.map((l, i) => A[i] * l + (1 - A[i]) * background));
}

function lightBackground(L, recipe) {
  return median(borderRing(L)) > recipe.polarity_threshold;
}

/** Ink above a plane through the border's medians (step 3). */
function removeBackground(L) {
  const { h, w } = L;
  const m0 = median(borderRing(L));
  const gx = (median(column(L, w - 1)) - median(column(L, 0))) / Math.max(w - 1, 1);
  const gy = (median(row(L, h - 1)) - median(row(L, 0))) / Math.max(h - 1, 1);
  const out = image(h, w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const plane = m0 + (x - (w - 1) / 2) * gx + (y - (h - 1) / 2) * gy;
      out.v[y * w + x] = Math.min(Math.max(L.v[y * w + x] - plane, 0), 255);
    }
  }
  return out;
}

/** k x k block means for images beyond max_side (step 0); the remainder rows and columns drop. */
function reduceLarge(im, recipe) {
  const maxSide = recipe.max_side;
  if (!maxSide || Math.max(im.h, im.w) <= maxSide) return { im, k: 1 };
  const k = Math.ceil(Math.max(im.h, im.w) / maxSide);
  const h = Math.floor(im.h / k), w = Math.floor(im.w / k);
  const out = image(h, w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let sum = 0;
      for (let dy = 0; dy < k; dy++) for (let dx = 0; dx < k; dx++) sum += im.v[(y * k + dy) * im.w + x * k + dx];
      out.v[y * w + x] = sum / (k * k);
    }
  }
  return { im: out, k };
}

/** Darkest ink to 255 (step 4); null when there is no object. */
function stretchContrast(ink, recipe) {
  const peak = ink.v.reduce((a, b) => Math.max(a, b), -Infinity);
  if (peak < recipe.min_contrast) return null;
  return image(ink.h, ink.w, ink.v.map((v) => v / peak * 255));
}

/** Rows r0..r1 and columns c0..c1 (inclusive) of the pixels above `threshold` (step 5). */
function boundingBox(ink, threshold) {
  let r0 = Infinity, r1 = -1, c0 = Infinity, c1 = -1;
  for (let y = 0; y < ink.h; y++) {
    for (let x = 0; x < ink.w; x++) {
      if (ink.v[y * ink.w + x] > threshold) {
        r0 = Math.min(r0, y); r1 = Math.max(r1, y); c0 = Math.min(c0, x); c1 = Math.max(c1, x);
      }
    }
  }
  return [r0, r1, c0, c1];
}

function crop(im, r0, r1, c0, c1) {
  const out = image(r1 - r0 + 1, c1 - c0 + 1);
  for (let y = 0; y < out.h; y++) out.v.set(im.v.subarray((r0 + y) * im.w + c0, (r0 + y) * im.w + c1 + 1), y * out.w);
  return out;
}

/** (nOut x nIn) triangle-filter weights, antialiased when shrinking (step 6). */
function resizeWeights(nIn, nOut) {
  const scale = nIn / nOut, support = Math.max(scale, 1);
  const weights = image(nOut, nIn);
  for (let i = 0; i < nOut; i++) {
    const centre = (i + 0.5) * scale;
    let sum = 0;
    for (let j = 0; j < nIn; j++) {
      const w = Math.max(0, 1 - Math.abs((j + 0.5 - centre) / support));
      weights.v[i * nIn + j] = w;
      sum += w;
    }
    for (let j = 0; j < nIn; j++) weights.v[i * nIn + j] /= sum;
  }
  return weights;
}

// a @ b, or a @ b^T when bTransposed (then b is given untransposed)
function matmul(a, b, bTransposed = false) {
  const n = bTransposed ? b.h : b.w;
  const out = image(a.h, n);
  for (let i = 0; i < a.h; i++) {
    for (let j = 0; j < n; j++) {
      let sum = 0;
      for (let k = 0; k < a.w; k++) sum += a.v[i * a.w + k] * (bTransposed ? b.v[j * b.w + k] : b.v[k * b.w + j]);
      out.v[i * n + j] = sum;
    }
  }
  return out;
}

function scaleToBox(im, box) {
  const longSide = Math.max(im.h, im.w);
  const height = im.h === longSide ? box : Math.max(1, Math.floor(im.h * box / longSide + 0.5));
  const width = im.w === longSide ? box : Math.max(1, Math.floor(im.w * box / longSide + 0.5));
  return matmul(matmul(resizeWeights(im.h, height), im), resizeWeights(im.w, width), true);
}

/** Put the scaled object into the canvas, centred as the recipe says (step 7). */
function place(im, recipe) {
  const canvas = recipe.canvas, { h, w } = im;
  let top = Math.floor((canvas - h) / 2), left = Math.floor((canvas - w) / 2);
  const total = im.v.reduce((a, b) => a + b, 0);
  if (recipe.center === "mass" && total > 0) {
    // centre of mass from row and column sums, as numpy computes it
    const rowSums = Array.from({ length: h }, (_, y) => row(im, y).reduce((a, b) => a + b, 0));
    const columnSums = Array.from({ length: w }, (_, x) => column(im, x).reduce((a, b) => a + b, 0));
    const cy = rowSums.reduce((a, s, y) => a + s * (y + 0.5), 0) / total;
    const cx = columnSums.reduce((a, s, x) => a + s * (x + 0.5), 0) / total;
    top = Math.min(Math.max(Math.floor(canvas / 2 - cy + 0.5), 0), canvas - h);
    left = Math.min(Math.max(Math.floor(canvas / 2 - cx + 0.5), 0), canvas - w);
  } else if (recipe.center !== "box" && recipe.center !== "mass") {
    throw new Error(`unknown centring ${recipe.center} in bundle.json's framing recipe`);
  }
  const out = image(canvas, canvas);
  for (let y = 0; y < h; y++) out.v.set(row(im, y), (top + y) * canvas + left);
  return out;
}

/** [1, 2, 1] / 4 along rows, then along columns, edge pixels repeated (step 8). */
function blur3(im) {
  const { h, w } = im;
  const at = (v, y, x) => v[Math.min(Math.max(y, 0), h - 1) * w + Math.min(Math.max(x, 0), w - 1)];
  const rows = image(h, w), out = image(h, w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) rows.v[y * w + x] = (at(im.v, y, x - 1) + 2 * at(im.v, y, x) + at(im.v, y, x + 1)) / 4;
  }
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) out.v[y * w + x] = (at(rows.v, y - 1, x) + 2 * at(rows.v, y, x) + at(rows.v, y + 1, x)) / 4;
  }
  return out;
}

/** Unsharp mask, then 0..255 as float32 (step 8). */
function sharpen(im, amount) {
  let v = im.v;
  if (amount) {
    const blurred = blur3(im).v;
    v = v.map((x, i) => x + amount * (x - blurred[i]));
  }
  return Float32Array.from(v, (x) => Math.min(Math.max(x, 0), 255));
}

// ---- cleaning the page around handwriting (steps 3a, 3b, 4a, 5a) ----

/** Minimum or maximum over x-r..x+r of a 1-D array, outside ignored (van Herk / Gil-Werman). */
function running(x, radius, isMin) {
  const n = x.length;
  if (radius < 1) return Float64Array.from(x);
  const k = 2 * radius + 1, m = Math.ceil((n + 2 * radius) / k) * k;
  const op = isMin ? Math.min : Math.max;
  const padded = new Float64Array(m).fill(isMin ? Infinity : -Infinity);
  padded.set(x, radius);
  const forward = new Float64Array(m), backward = new Float64Array(m);
  for (let i = 0; i < m; i++) forward[i] = i % k === 0 ? padded[i] : op(forward[i - 1], padded[i]);
  for (let i = m - 1; i >= 0; i--) backward[i] = i % k === k - 1 ? padded[i] : op(backward[i + 1], padded[i]);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = op(backward[i], forward[i + 2 * radius]);
  return out;
}

/** A (2r+1) x (2r+1) minimum or maximum: along rows, then along columns. */
function squareFilter(im, radius, isMin) {
  const { h, w } = im;
  const rows = image(h, w), out = image(h, w);
  for (let y = 0; y < h; y++) rows.v.set(running(row(im, y), radius, isMin), y * w);
  for (let x = 0; x < w; x++) {
    const filtered = running(column(rows, x), radius, isMin);
    for (let y = 0; y < h; y++) out.v[y * w + x] = filtered[y];
  }
  return out;
}

/** Step 3a: the ink above the page's opening, less the residual's median. */
function subtractOpening(ink, fraction) {
  const radius = Math.floor(fraction * Math.min(ink.h, ink.w) / 2);
  if (radius < 1) return ink;
  const opened = squareFilter(squareFilter(ink, radius, true), radius, false);
  const residual = ink.v.map((v, i) => v - opened.v[i]);
  const level = median(residual);
  return image(ink.h, ink.w, residual.map((v) => Math.min(Math.max(v - level, 0), 255)));
}

/** Step 3b: printed lines (rows, then columns, that are ink over most of their length). */
function removeLines(ink, recipe) {
  const peak = ink.v.reduce((a, b) => Math.max(a, b), -Infinity);
  if (peak <= 0) return [ink, 0];
  const threshold = recipe.line_threshold * peak;
  const out = image(ink.h, ink.w, Float64Array.from(ink.v));
  let removed = 0;
  for (const alongRows of [true, false]) {
    const count = alongRows ? out.h : out.w, length = alongRows ? out.w : out.h;
    const get = (i) => (alongRows ? Float64Array.from(row(out, i)) : Float64Array.from(column(out, i)));
    const put = (i, values) => {
      for (let j = 0; j < length; j++) out.v[alongRows ? i * out.w + j : j * out.w + i] = values[j];
    };
    const found = Array.from({ length: count }, (_, i) => get(i).reduce((a, v) => a + (v > threshold ? 1 : 0), 0) >= recipe.line_coverage * length);
    removed += found.filter(Boolean).length;
    const radius = Math.floor(recipe.line_window * length / 2);
    for (let i = 0; i < count; i++) {
      if (!(found[i] || (i > 0 && found[i - 1]) || (i < count - 1 && found[i + 1]))) continue;
      const values = get(i), level = running(values, radius, true);
      put(i, values.map((v, j) => Math.min(Math.max(v - level[j], 0), 255)));
    }
  }
  return [out, removed];
}

/** Step 4a: keep the heaviest component of ink cells and the strokes near it. */
function keepTheWriting(ink, recipe) {
  const { h, w } = ink;
  const c = Math.ceil(Math.max(h, w) / recipe.cells);
  const gh = Math.ceil(h / c), gw = Math.ceil(w / c);
  const sums = new Float64Array(gh * gw), counts = new Float64Array(gh * gw);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const cell = Math.floor(y / c) * gw + Math.floor(x / c);
      sums[cell] += ink.v[y * w + x];
      counts[cell] += 1;
    }
  }
  const on = Array.from(sums, (s, i) => s / counts[i] > recipe.cell_threshold * 255);
  const labels = new Int32Array(gh * gw), boxes = [], masses = [];
  for (let start = 0; start < gh * gw; start++) {
    if (!on[start] || labels[start]) continue;
    const number = boxes.length + 1, stack = [start], box = [Infinity, -1, Infinity, -1];
    let mass = 0;
    labels[start] = number;
    while (stack.length) {
      const cell = stack.pop(), y = Math.floor(cell / gw), x = cell % gw;
      mass += sums[cell];
      box[0] = Math.min(box[0], y); box[1] = Math.max(box[1], y); box[2] = Math.min(box[2], x); box[3] = Math.max(box[3], x);
      for (let ny = y - 1; ny <= y + 1; ny++) {
        for (let nx = x - 1; nx <= x + 1; nx++) {
          if (ny < 0 || ny >= gh || nx < 0 || nx >= gw) continue;
          const other = ny * gw + nx;
          if (on[other] && !labels[other]) { labels[other] = number; stack.push(other); }
        }
      }
    }
    boxes.push(box);
    masses.push(mass);
  }
  if (!masses.length) return [ink, [0, 0]];
  // what touches the image's edge is more often a shadow's or the page's edge than writing
  const atEdge = boxes.map(([y0, y1, x0, x1]) => y0 === 0 || x0 === 0 || y1 === gh - 1 || x1 === gw - 1);
  const inside = masses.map((m, i) => (atEdge[i] ? -1 : m));
  const argmax = (values) => values.reduce((best, v, i) => (v > values[best] ? i : best), 0);
  const main = Math.max(...inside) > 0 ? argmax(inside) : argmax(masses);
  const [my0, my1, mx0, mx1] = boxes[main];
  const gap = recipe.component_gap * Math.max(my1 - my0 + 1, mx1 - mx0 + 1);
  const keep = [false, ...boxes.map(([y0, y1, x0, x1], i) => i === main ||
    (masses[i] >= recipe.component_mass * masses[main] && Math.max(y0 - my1, my0 - y1, x0 - mx1, mx0 - x1, 0) <= gap
     && !atEdge[i]))];
  const kept = squareFilter(image(gh, gw, Float64Array.from(labels, (l) => (keep[l] ? 1 : 0))), 1, false);
  const out = image(h, w);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (kept.v[Math.floor(y / c) * gw + Math.floor(x / c)] > 0) out.v[y * w + x] = ink.v[y * w + x];
    }
  }
  return [out, [keep.filter(Boolean).length, masses.length]];
}

/** Stroke width: 2 area / perimeter of the ink above half its peak. */
function strokeWidth(im) {
  const { h, w } = im;
  const core = (y, x) => y >= 0 && y < h && x >= 0 && x < w && im.v[y * w + x] > 127.5;
  let area = 0, perimeter = 0;
  for (let y = -1; y < h; y++) {
    for (let x = -1; x < w; x++) {
      const here = core(y, x);
      if (here) area++;
      if (y >= 0 || x >= 0) {
        if (x >= 0 && here !== core(y + 1, x)) perimeter++;
        if (y >= 0 && here !== core(y, x + 1)) perimeter++;
      }
    }
  }
  return area === 0 ? 0 : 2 * area / perimeter;
}

/** Step 5a: a square maximum (thin strokes) or minimum (thick) towards the recipe's width. */
function normalizeStrokeWidth(im, recipe) {
  const scale = recipe.box / Math.max(im.h, im.w);
  const width = strokeWidth(im) * scale;
  const target = recipe.stroke_width, tolerance = recipe.stroke_tolerance;
  if (Math.max(im.h, im.w) < 2 * recipe.box) return [im, width]; // too few pixels to measure
  if (width <= 0 || (target / tolerance <= width && width <= target * tolerance)) return [im, width];
  const radius = Math.floor(Math.abs(target - width) / 2 / scale + 0.5);
  if (radius < 1) return [im, width];
  const padded = image(im.h + 2 * radius, im.w + 2 * radius);
  for (let y = 0; y < im.h; y++) padded.v.set(row(im, y), (y + radius) * padded.w + radius);
  const changed = squareFilter(padded, radius, width >= target);
  const threshold = recipe.object_threshold * 255;
  if (changed.v.reduce((a, b) => Math.max(a, b), -Infinity) <= threshold) return [im, width];
  const [r0, r1, c0, c1] = boundingBox(changed, threshold);
  return [crop(changed, r0, r1, c0, c1), width];
}

/**
 * Luminance (H*W, 0..255) and alpha (H*W, 0..1, or null without transparency) -> { framed:
 * Float32Array (canvas*canvas) or null ("not framed": fit as without framing), report }.
 */
export function frame(luma, alpha, width, height, recipe, mode = "auto") {
  const report = { mode, applied: false };
  if (mode === "off") return { framed: null, report };
  const transparent = alpha !== null && alpha.some((a) => a < 1);
  let { im: L, k } = reduceLarge(image(height, width, Float64Array.from(luma)), recipe);
  if (transparent) {
    const A = reduceLarge(image(height, width, Float64Array.from(alpha)), recipe).im.v;
    L = inkFromAlpha(L, A);
    if (L === null) return { framed: null, report: { ...report, reason: "fully transparent image" } };
    report.ink_from = "alpha";
  }
  const light = lightBackground(L, recipe);
  if (mode === "auto" && L.h === recipe.canvas && L.w === recipe.canvas && !transparent && !light) {
    return { framed: null, report: { ...report, reason: "already in the data set's form" } };
  }
  if (light) L = image(L.h, L.w, L.v.map((v) => 255 - v));
  let ink = removeBackground(L);
  const cleaning = {};
  if (recipe.opening) { // absent in bundles from before steps 3a-5a and for solid objects
    ink = subtractOpening(ink, recipe.opening);
    [ink, cleaning.lines_removed] = removeLines(ink, recipe);
  }
  ink = stretchContrast(ink, recipe);
  if (ink === null) return { framed: null, report: { ...report, reason: "no object found (too little contrast)" } };
  if (recipe.cells) [ink, cleaning.components] = keepTheWriting(ink, recipe);
  const [r0, r1, c0, c1] = boundingBox(ink, recipe.object_threshold * 255);
  let cropped = crop(ink, r0, r1, c0, c1);
  if (recipe.stroke_width) [cropped, cleaning.stroke_width] = normalizeStrokeWidth(cropped, recipe);
  const placed = place(scaleToBox(cropped, recipe.box), recipe);
  const framed = sharpen(placed, recipe.sharpen);
  Object.assign(report, { applied: true, recipe: recipe.name, inverted: light, box: [c0 * k, r0 * k, (c1 - c0 + 1) * k, (r1 - r0 + 1) * k], ...cleaning });
  return { framed, report };
}
