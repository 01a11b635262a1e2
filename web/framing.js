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
  const ink = stretchContrast(removeBackground(L), recipe);
  if (ink === null) return { framed: null, report: { ...report, reason: "no object found (too little contrast)" } };
  const [r0, r1, c0, c1] = boundingBox(ink, recipe.object_threshold * 255);
  const placed = place(scaleToBox(crop(ink, r0, r1, c0, c1), recipe.box), recipe);
  const framed = sharpen(placed, recipe.sharpen);
  Object.assign(report, { applied: true, recipe: recipe.name, inverted: light, box: [c0 * k, r0 * k, (c1 - c0 + 1) * k, (r1 - r0 + 1) * k] });
  return { framed, report };
}
