// The browser's copy of contract/preprocessing.py: image bytes -> the model's float32 input.
//
// Python is the reference; this module mirrors it step by step so that the page and the server
// give the same answer for the same bytes (tests/test_web.py checks it in Chromium):
//   decode (EXIF orientation applied; limits on sides and pixels) -> luminance (transparency
//   composited over black) -> block means down to WORK_SIDE for larger images -> framing as bundle.json's recipe says (framing.js), or else: pad to a square with black
//   -> Lanczos resize to H x W (Pillow's algorithm) -> (x / 255 - mean) / std.
// No DOM: decoding needs createImageBitmap and OffscreenCanvas only, so a worker can use it too.
import { frame } from "./framing.js";

export const MAX_BODY_BYTES = 1 << 20; // contract.preprocessing.MAX_BODY_BYTES
export const MAX_SIDE = 8192; // contract.preprocessing.MAX_SIDE: width and height each
export const MAX_PIXELS = 1 << 22; // contract.preprocessing.MAX_PIXELS (a baseline JPEG is scaled first)
export const WORK_SIDE = 512; // contract.preprocessing.WORK_SIDE: larger images are block-averaged
export const MAX_JPEG_SCANS = 64; // contract.preprocessing.MAX_JPEG_SCANS: each scan passes over the image

export class InvalidInput extends Error {
  constructor(message, status = 400) {
    super(message);
    this.status = status;
  }
}

/** The model input that bundle.json describes (contract.preprocessing.InputSpec). */
export function specFromBundle(bundle) {
  const input = bundle.input;
  return {
    channels: input.channels, height: input.height, width: input.width,
    mean: input.mean.map(Number), std: input.std.map(Number),
    framing: input.framing ?? null, // contract/framing.py's recipe; null: images are only fitted
  };
}

let gl = null; // one WebGL context, reused: creating one per image is slow

// The bitmap's RGBA exactly as decoded: a texture upload without premultiplication, read back.
function readWithWebGL(bitmap) {
  gl ??= new OffscreenCanvas(1, 1).getContext("webgl2");
  if (!gl || Math.max(bitmap.width, bitmap.height) > gl.getParameter(gl.MAX_TEXTURE_SIZE)) return null;
  const texture = gl.createTexture();
  const framebuffer = gl.createFramebuffer();
  try {
    gl.bindTexture(gl.TEXTURE_2D, texture);
    gl.pixelStorei(gl.UNPACK_PREMULTIPLY_ALPHA_WEBGL, false);
    gl.pixelStorei(gl.UNPACK_COLORSPACE_CONVERSION_WEBGL, gl.NONE);
    gl.pixelStorei(gl.UNPACK_FLIP_Y_WEBGL, false);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA8, gl.RGBA, gl.UNSIGNED_BYTE, bitmap);
    gl.bindFramebuffer(gl.FRAMEBUFFER, framebuffer);
    gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, texture, 0);
    if (gl.checkFramebufferStatus(gl.FRAMEBUFFER) !== gl.FRAMEBUFFER_COMPLETE) return null;
    const data = new Uint8ClampedArray(bitmap.width * bitmap.height * 4);
    gl.pixelStorei(gl.PACK_ALIGNMENT, 1);
    gl.readPixels(0, 0, bitmap.width, bitmap.height, gl.RGBA, gl.UNSIGNED_BYTE, data);
    return gl.getError() === gl.NO_ERROR ? data : null;
  } finally {
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
    gl.deleteFramebuffer(framebuffer);
    gl.deleteTexture(texture);
  }
}

// A 2D canvas stores premultiplied colour: translucent pixels come back with slightly changed
// colour. Their luminance over black (what the model sees unframed) is still Pillow's, bit for
// bit (tested over every colour/alpha pair); framing a translucent image, which reads the colour
// itself, may differ slightly. Used only where WebGL is missing.
function readWith2D(bitmap) {
  const context = new OffscreenCanvas(bitmap.width, bitmap.height).getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, bitmap.width, bitmap.height).data;
}

function asBytes(bytes) {
  return new Uint8Array(bytes.buffer ?? bytes, bytes.byteOffset ?? 0, bytes.byteLength);
}

/** A JPEG stream starts here: JFIF, EXIF, MPO, progressive, arithmetic (contract.preprocessing.is_jpeg_stream). */
export function isJpegStream(bytes) {
  const b = asBytes(bytes);
  return b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff;
}

/**
 * Whether the first frame of a JPEG stream is progressive (SOF2, SOF6, SOF10, SOF14), by walking
 * its marker segments; null for no JPEG stream or no frame header before the first scan
 * (contract.preprocessing.jpeg_frame_is_progressive). Decided from the bytes, so that an MPO
 * (what phones write) is treated like the JPEG it holds.
 */
export function jpegFrameIsProgressive(bytes) {
  if (!isJpegStream(bytes)) return null;
  const b = asBytes(bytes);
  let at = 2;
  while (at + 4 <= b.length) {
    if (b[at] !== 0xff) return null;
    const marker = b[at + 1];
    if (marker === 0xff) { at += 1; continue; } // fill byte
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd8)) { at += 2; continue; } // no length
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      return [0xc2, 0xc6, 0xca, 0xce].includes(marker);
    }
    if (marker === 0xda || marker === 0xd9) return null;
    at += 2 + ((b[at + 2] << 8) | b[at + 3]);
  }
  return null;
}

/** Start-of-scan markers in the whole body: every picture of an MPO (contract.preprocessing._check_jpeg_scans). */
export function jpegScans(bytes) {
  const b = asBytes(bytes);
  let scans = 0;
  for (let i = 0; i + 1 < b.length; i++) if (b[i] === 0xff && b[i + 1] === 0xda) scans++;
  return scans;
}

/**
 * Image file bytes -> { width, height, data: RGBA as the file holds it, via: "webgl" | "2d" }.
 *
 * No colour management and no premultiplication on decode, so a PNG gives Pillow's bytes; the
 * EXIF orientation is applied, as contract/preprocessing._upright does. `via` forces a path (tests).
 */
export async function decodeRgba(bytes, via = "webgl") {
  if (bytes.byteLength === 0) throw new InvalidInput("empty file: send an image (PNG, JPEG, BMP, GIF, WebP)");
  if (bytes.byteLength > MAX_BODY_BYTES) {
    throw new InvalidInput(`file of ${bytes.byteLength} bytes exceeds the ${MAX_BODY_BYTES}-byte limit; send a smaller image`, 413);
  }
  if (isJpegStream(bytes) && jpegScans(bytes) > MAX_JPEG_SCANS) {
    throw new InvalidInput(`JPEG with ${jpegScans(bytes)} scans exceeds the limit of ${MAX_JPEG_SCANS}; save it as a baseline JPEG or PNG`, 413);
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(new Blob([bytes]), {
      colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image",
    });
  } catch {
    throw new InvalidInput("the browser cannot decode this file as an image: send a PNG, JPEG, BMP, GIF or WebP");
  }
  const { width, height } = bitmap;
  try {
    if (Math.max(width, height) > MAX_SIDE) {
      throw new InvalidInput(`image of ${width}x${height} pixels exceeds the limit of ${MAX_SIDE} per side; downscale it first`, 413);
    }
    // The server's decoder scales a baseline JPEG (in any container) down while decoding, so
    // only other images (progressive JPEGs included) meet the pixel limit at their full size.
    if (width * height > MAX_PIXELS && jpegFrameIsProgressive(bytes) !== false) {
      throw new InvalidInput(`image of ${width}x${height} pixels exceeds the limit of ${MAX_PIXELS} pixels; downscale it first`, 413);
    }
    const exact = via === "webgl" ? readWithWebGL(bitmap) : null;
    return { width, height, data: exact ?? readWith2D(bitmap), via: exact ? "webgl" : "2d" };
  } finally {
    bitmap.close();
  }
}

// Pillow's integer arithmetic, so that the result is bit-identical to Image.alpha_composite over
// opaque black followed by convert("L"): 7 fractional bits, a shift-based division by 255, and
// ITU-R 601-2 luma in 16-bit fixed point.
function compositeOverBlack(channel, alpha) {
  const t = channel * alpha * 128 + (0x80 << 7);
  return (((t >>> 8) + t) >>> 8) >>> 7;
}

function luma8(r, g, b) {
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16;
}

/** RGBA -> Float32Array of luminance 0..255 (contract.preprocessing._to_gray). */
export function toGray({ width, height, data }) {
  const gray = new Float32Array(width * height);
  for (let i = 0; i < gray.length; i++) {
    const a = data[4 * i + 3];
    // alpha 255 composites to the colour itself, so opaque images take the same path
    gray[i] = luma8(compositeOverBlack(data[4 * i], a), compositeOverBlack(data[4 * i + 1], a),
      compositeOverBlack(data[4 * i + 2], a));
  }
  return gray;
}

function lanczos(x) {
  const sinc = (v) => (v === 0 ? 1 : Math.sin(v * Math.PI) / (v * Math.PI));
  return -3 <= x && x < 3 ? sinc(x) * sinc(x / 3) : 0;
}

// Pillow's precompute_coeffs (libImaging/Resample.c) for the box (0, inSize).
function resampleCoefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 3 * filterScale;
  const rows = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const weights = new Float64Array(xmax);
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      weights[x] = lanczos((x + xmin - center + 0.5) / filterScale);
      total += weights[x];
    }
    if (total !== 0) for (let x = 0; x < xmax; x++) weights[x] /= total;
    rows.push({ xmin, weights });
  }
  return rows;
}

/**
 * Pillow's Image.resize(LANCZOS) of a mode "F" image: a horizontal pass into a float32 image,
 * then a vertical one, each summing in double precision and storing float32.
 */
export function resizeLanczos(gray, width, height, outWidth, outHeight) {
  const columns = resampleCoefficients(width, outWidth);
  const rows = resampleCoefficients(height, outHeight);
  let source = gray, sourceWidth = width;
  if (outWidth !== width) {
    source = new Float32Array(outWidth * height);
    for (let y = 0; y < height; y++) {
      for (let xx = 0; xx < outWidth; xx++) {
        const { xmin, weights } = columns[xx];
        let sum = 0;
        for (let x = 0; x < weights.length; x++) sum += gray[y * width + xmin + x] * weights[x];
        source[y * outWidth + xx] = sum;
      }
    }
    sourceWidth = outWidth;
  }
  if (outHeight === height) return source;
  const out = new Float32Array(sourceWidth * outHeight);
  for (let yy = 0; yy < outHeight; yy++) {
    const { xmin: ymin, weights } = rows[yy];
    for (let x = 0; x < sourceWidth; x++) {
      let sum = 0;
      for (let y = 0; y < weights.length; y++) sum += source[(ymin + y) * sourceWidth + x] * weights[y];
      out[yy * sourceWidth + x] = sum;
    }
  }
  return out;
}

/** Pad to a square with black, resize to (H, W), clip to 0..255 (contract.preprocessing._fit). */
export function fit(gray, width, height, spec) {
  if (width === spec.width && height === spec.height) return gray;
  const side = Math.max(width, height);
  const square = new Float32Array(side * side);
  const top = Math.floor((side - height) / 2), left = Math.floor((side - width) / 2);
  for (let y = 0; y < height; y++) square.set(gray.subarray(y * width, (y + 1) * width), (top + y) * side + left);
  const resized = resizeLanczos(square, side, side, spec.width, spec.height);
  for (let i = 0; i < resized.length; i++) resized[i] = Math.min(Math.max(resized[i], 0), 255);
  return resized;
}

/** (H*W) values 0..255 -> (C*H*W) float32: (x / 255 - mean) / std, in float32 like numpy. */
export function normalize(gray, spec) {
  const f = Math.fround;
  const plane = gray.length;
  const out = new Float32Array(spec.channels * plane);
  for (let c = 0; c < spec.channels; c++) {
    const mean = f(spec.mean[c]), std = f(spec.std[c]);
    for (let i = 0; i < plane; i++) out[c * plane + i] = f(f(f(gray[i] / 255) - mean) / std);
  }
  return out;
}

/** Means over factor x factor blocks; partial blocks at the edges average what they hold
 * (contract.preprocessing._block_mean). */
function blockMean(values, width, height, factor) {
  const w = Math.ceil(width / factor), h = Math.ceil(height / factor);
  const out = new Float64Array(w * h);
  for (let by = 0; by < h; by++) {
    for (let bx = 0; bx < w; bx++) {
      let sum = 0, count = 0;
      for (let y = by * factor; y < Math.min(height, (by + 1) * factor); y++) {
        for (let x = bx * factor; x < Math.min(width, (bx + 1) * factor); x++) {
          sum += values[y * width + x];
          count++;
        }
      }
      out[by * w + bx] = sum / count;
    }
  }
  return { values: out, width: w, height: h };
}

/**
 * Images over WORK_SIDE on their long side, reduced as the server's decoder reduces them
 * (contract.preprocessing._to_gray_and_alpha): grey composited over black and alpha by block
 * means, the luminance before compositing by its alpha-weighted block mean.
 */
function reduceLarge(gray, lumaAlpha, width, height) {
  const factor = Math.ceil(Math.max(width, height) / WORK_SIDE);
  if (factor <= 1) return { gray, lumaAlpha, width, height, factor: 1 };
  const reduced = blockMean(gray, width, height, factor);
  let reducedLumaAlpha = null;
  if (lumaAlpha) {
    const { luma, alpha } = lumaAlpha;
    const weighted = blockMean(luma.map((l, i) => l * alpha[i]), width, height, factor).values;
    const meanAlpha = blockMean(alpha, width, height, factor).values;
    reducedLumaAlpha = { luma: weighted.map((v, i) => (meanAlpha[i] > 0 ? v / Math.max(meanAlpha[i], 1e-6) : 0)), alpha: meanAlpha };
  }
  return { gray: Float32Array.from(reduced.values), lumaAlpha: reducedLumaAlpha, width: reduced.width, height: reduced.height, factor };
}

/** Luminance before compositing and alpha 0..1, for framing; null without transparency. */
function lumaAndAlpha({ width, height, data }) {
  const luma = new Float64Array(width * height), alpha = new Float64Array(width * height);
  let transparent = false;
  for (let i = 0; i < luma.length; i++) {
    luma[i] = luma8(data[4 * i], data[4 * i + 1], data[4 * i + 2]);
    alpha[i] = data[4 * i + 3] / 255;
    transparent ||= data[4 * i + 3] < 255;
  }
  return transparent ? { luma, alpha } : null;
}

/**
 * Image file bytes -> { input: Float32Array (C*H*W, the model's input), seen: Float32Array (H*W,
 * 0..255, what the model sees before normalization), framing: what framing did }.
 */
export async function preprocess(bytes, spec, framing = "auto", via = "webgl") {
  const rgba = await decodeRgba(bytes, via);
  const { gray, lumaAlpha, width, height, factor } = reduceLarge(toGray(rgba), lumaAndAlpha(rgba), rgba.width, rgba.height);
  let framed = null, report = { mode: framing, applied: false, reason: "bundle.json has no framing recipe" };
  if (spec.framing) {
    const { luma, alpha } = lumaAlpha ?? { luma: gray, alpha: null };
    ({ framed, report } = frame(luma, alpha, width, height, spec.framing, framing));
    if (report.box && factor > 1) report.box = report.box.map((v) => v * factor); // in the file's pixels
  }
  const seen = framed ?? fit(gray, width, height, spec);
  return { input: normalize(seen, spec), seen, framing: report, decodedWith: rgba.via };
}
