//! CLIP image preprocessing, as `CLIPImageProcessor` / `LlavaImageProcessor` do it:
//! optional pad-to-square with the mean colour (LLaVA's `image_aspect_ratio = pad`), resize of
//! the shortest edge, center crop, rescale to [0, 1], normalise per channel.
//!
//! Resizing reproduces Pillow's resampling exactly (separable convolution with the filter support
//! widened by the downscale factor, 22-bit fixed-point coefficients, a horizontal then a vertical
//! pass rounded to 8 bits in between), because that is what the reference processors call:
//! pixel values then match transformers' to float precision rather than to a few grey levels.
//! Decoding uses the `image` crate, and libjpeg-turbo for JPEGs (see [`decode_rgb`]).

use std::path::Path;

use image::RgbImage;
use serde::Deserialize;

use crate::error::DataError;

/// `preprocessor_config.json`, with `CLIPImageProcessor`'s defaults for absent fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    /// Resize before cropping.
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// Target size: `{"shortest_edge": n}` or `{"height": h, "width": w}`.
    #[serde(default = "default_size")]
    pub size: SizeSpec,
    /// Pillow filter id: 0 nearest, 2 bilinear, 3 bicubic.
    #[serde(default = "bicubic")]
    pub resample: u32,
    /// Center crop after resizing.
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    /// Crop size.
    #[serde(default = "default_crop")]
    pub crop_size: SizeSpec,
    /// Multiply by `rescale_factor`.
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// Usually 1/255.
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    /// Subtract the mean, divide by the std.
    #[serde(default = "yes")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default = "clip_mean")]
    pub image_mean: Vec<f32>,
    /// Per-channel std.
    #[serde(default = "clip_std")]
    pub image_std: Vec<f32>,
    /// Pad to a square with the mean colour first (LLaVA's "pad" aspect-ratio mode).
    #[serde(default)]
    pub do_pad: bool,
}

/// A size in a processor config.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    /// Resize so the shorter side has this length, keeping the aspect ratio.
    ShortestEdge {
        /// Target length of the shorter side.
        shortest_edge: u32,
    },
    /// An exact size.
    HeightWidth {
        /// Height.
        height: u32,
        /// Width.
        width: u32,
    },
    /// A square.
    Square(u32),
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn default_size() -> SizeSpec {
    SizeSpec::ShortestEdge { shortest_edge: 224 }
}
fn default_crop() -> SizeSpec {
    SizeSpec::HeightWidth {
        height: 224,
        width: 224,
    }
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
/// CLIP's normalisation mean.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's normalisation std.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];
fn clip_mean() -> Vec<f32> {
    CLIP_MEAN.to_vec()
}
fn clip_std() -> Vec<f32> {
    CLIP_STD.to_vec()
}

/// Preprocessed pixels, `[3, height, width]` channel-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// Channel-major values.
    pub data: Vec<f32>,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

impl ImageProcessorConfig {
    /// CLIP's processor at `image_size` (shortest edge and crop), as LLaVA-1.5 uses at 336.
    pub fn clip(image_size: u32) -> Self {
        Self {
            do_resize: true,
            size: SizeSpec::ShortestEdge {
                shortest_edge: image_size,
            },
            resample: 3,
            do_center_crop: true,
            crop_size: SizeSpec::Square(image_size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: clip_mean(),
            image_std: clip_std(),
            do_pad: false,
        }
    }

    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| DataError::parse(path, e))?;
        if config.image_mean.len() != 3 || config.image_std.len() != 3 {
            return Err(DataError::parse(
                path,
                "image_mean and image_std need 3 values",
            ));
        }
        if !matches!(config.resample, 0 | 2 | 3) {
            return Err(DataError::parse(
                path,
                format!("resample {} is not supported (0, 2 or 3)", config.resample),
            ));
        }
        Ok(config)
    }

    /// `preprocessor_config.json` of a model directory, or CLIP's defaults at `image_size`.
    pub fn from_model_dir(dir: &Path, image_size: u32) -> Result<Self, DataError> {
        let path = dir.join("preprocessor_config.json");
        if path.exists() {
            Self::from_file(&path)
        } else {
            Ok(Self::clip(image_size))
        }
    }

    /// Checks that `path` is an image this crate can decode, from its header alone (format and
    /// size; the pixels are not decoded): what a test set checks before its questions stream.
    pub fn probe_file(path: &Path) -> Result<(u32, u32), DataError> {
        image::ImageReader::open(path)
            .map_err(|e| DataError::io(path, e))?
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))?
            .into_dimensions()
            .map_err(|e| DataError::parse(path, format!("not a readable image: {e}")))
    }

    /// Decodes and preprocesses an image file.
    pub fn preprocess_file(&self, path: &Path) -> Result<PixelValues, DataError> {
        Ok(self.preprocess(&decode_rgb(path)?))
    }

    /// Preprocesses a decoded RGB image.
    pub fn preprocess(&self, image: &RgbImage) -> PixelValues {
        let mut image = image.clone();
        if self.do_pad {
            let background = self
                .image_mean
                .iter()
                .map(|m| (m * 255.0) as u8)
                .collect::<Vec<_>>();
            image = pad_to_square(&image, [background[0], background[1], background[2]]);
        }
        if self.do_resize {
            let (w, h) = image.dimensions();
            let (out_w, out_h) = match self.size {
                SizeSpec::ShortestEdge { shortest_edge } => shortest_edge_size(w, h, shortest_edge),
                SizeSpec::HeightWidth { height, width } => (width, height),
                SizeSpec::Square(s) => (s, s),
            };
            image = resample(&image, out_w, out_h, self.resample);
        }
        if self.do_center_crop {
            let (crop_w, crop_h) = match self.crop_size {
                SizeSpec::HeightWidth { height, width } => (width, height),
                SizeSpec::Square(s) | SizeSpec::ShortestEdge { shortest_edge: s } => (s, s),
            };
            image = center_crop(&image, crop_w, crop_h);
        }
        let (w, h) = image.dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (x, y, pixel) in image.enumerate_pixels() {
            for c in 0..3 {
                let mut v = pixel[c] as f32;
                if self.do_rescale {
                    v = (pixel[c] as f64 * self.rescale_factor) as f32;
                }
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                data[c * h * w + y as usize * w + x as usize] = v;
            }
        }
        PixelValues {
            data,
            height: h,
            width: w,
        }
    }
}

/// Decodes an image file to RGB.
///
/// The `image` crate reads and validates every format. JPEGs are then decoded again with
/// libjpeg-turbo (through `mozjpeg`), the decoder Pillow uses: JPEG decoders legitimately differ
/// by a few grey levels (IDCT and chroma upsampling), and matching Pillow's keeps the pixel values
/// equal to the reference processors'. Should libjpeg refuse a file `image` accepted (CMYK, say),
/// `image`'s decoding is kept.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let fail = |message: String| DataError::Image {
        path: path.display().to_string(),
        message,
    };
    // Read once: both decoders and the truncation check work on these bytes.
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes.as_slice()))
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))
    };
    let format = reader()?.format();
    let decoded = reader()?
        .decode()
        .map_err(|e| match e {
            image::ImageError::Limits(_) => fail(match reader().map(|r| r.into_dimensions()) {
                Ok(Ok((w, h))) => {
                    format!("{w} x {h} pixels is more than the decoder's memory limit (512 MiB)")
                }
                _ => e.to_string(),
            }),
            e => fail(e.to_string()),
        })?
        .to_rgb8();
    if format == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(&bytes) {
        return Err(fail(
            "truncated JPEG: no end-of-image marker after its last scan (the file is cut short)"
                .into(),
        ));
    }
    if format == Some(image::ImageFormat::Jpeg)
        && let Some(exact) = decode_jpeg_like_pillow(&bytes)
        && exact.dimensions() == decoded.dimensions()
    {
        return Ok(exact);
    }
    Ok(decoded)
}

/// Whether a JPEG stream ends: an end-of-image marker (`FF D9`) after the start of its last
/// scan (`FF DA`). Decoders fill a cut-short file's missing blocks with grey without an error
/// (Pillow refuses it); entropy-coded data escapes every `FF`, so the marker cannot occur inside
/// a scan.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let marker = |code: u8| move |w: &[u8]| w == [0xFF, code];
    let Some(last_scan) = bytes.windows(2).rposition(marker(0xDA)) else {
        return false;
    };
    bytes[last_scan..].windows(2).any(marker(0xD9))
}

fn decode_jpeg_like_pillow(bytes: &[u8]) -> Option<RgbImage> {
    // libjpeg reports fatal errors by unwinding; the file was already validated, so this is a
    // fallback path only.
    std::panic::catch_unwind(|| -> std::io::Result<RgbImage> {
        let mut started = mozjpeg::Decompress::new_mem(bytes)?.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let pixels: Vec<[u8; 3]> = started.read_scanlines()?;
        started.finish()?;
        RgbImage::from_raw(w, h, pixels.into_iter().flatten().collect())
            .ok_or_else(|| std::io::Error::other("short scanlines"))
    })
    .ok()?
    .ok()
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side
/// becomes `target`, the long side `int(target * long / short)`.
fn shortest_edge_size(w: u32, h: u32, target: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (target as f64 * long as f64 / short as f64) as u32;
    if w <= h {
        (target, new_long)
    } else {
        (new_long, target)
    }
}

/// Pads to a square canvas of `background`, the image centered (LLaVA's `expand2square`).
pub fn pad_to_square(image: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == h {
        return image.clone();
    }
    let side = w.max(h);
    let mut canvas = RgbImage::from_pixel(side, side, image::Rgb(background));
    let (dx, dy) = ((side - w) / 2, (side - h) / 2);
    image::imageops::replace(&mut canvas, image, dx as i64, dy as i64);
    canvas
}

/// transformers' `center_crop`: offsets `(size - crop) // 2`, zero padding if the image is
/// smaller than the crop.
fn center_crop(image: &RgbImage, crop_w: u32, crop_h: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let top = (h as i64 - crop_h as i64).div_euclid(2);
    let left = (w as i64 - crop_w as i64).div_euclid(2);
    RgbImage::from_fn(crop_w, crop_h, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

// ---- Pillow-exact resampling -------------------------------------------------------------

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

fn nearest_filter(x: f64) -> f64 {
    if (-0.5..0.5).contains(&x) { 1.0 } else { 0.0 }
}

/// Per output pixel: the first input index and the fixed-point weights.
fn coefficients(
    in_size: u32,
    out_size: u32,
    filter: fn(f64) -> f64,
    support: f64,
) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    if w < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like `PIL.Image.resize(size, resample)` on an RGB image.
pub fn resample(image: &RgbImage, out_w: u32, out_h: u32, filter_id: u32) -> RgbImage {
    let (filter, support): (fn(f64) -> f64, f64) = match filter_id {
        0 => (nearest_filter, 0.5),
        2 => (bilinear_filter, 1.0),
        _ => (bicubic_filter, 2.0),
    };
    let (w, h) = image.dimensions();
    let mut current = image.clone();
    if out_w != w {
        let coeffs = coefficients(w, out_w, filter, support);
        current = RgbImage::from_fn(out_w, h, |x, y| {
            let (start, weights) = &coeffs[x as usize];
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (i, &k) in weights.iter().enumerate() {
                let p = image.get_pixel((start + i) as u32, y);
                for c in 0..3 {
                    acc[c] += p[c] as i32 * k;
                }
            }
            image::Rgb([clip8(acc[0]), clip8(acc[1]), clip8(acc[2])])
        });
    }
    if out_h != h {
        let coeffs = coefficients(h, out_h, filter, support);
        let source = current;
        current = RgbImage::from_fn(source.width(), out_h, |x, y| {
            let (start, weights) = &coeffs[y as usize];
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (i, &k) in weights.iter().enumerate() {
                let p = source.get_pixel(x, (start + i) as u32);
                for c in 0..3 {
                    acc[c] += p[c] as i32 * k;
                }
            }
            image::Rgb([clip8(acc[0]), clip8(acc[1]), clip8(acc[2])])
        });
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_aspect_ratio() {
        assert_eq!(shortest_edge_size(512, 600, 336), (336, 393));
        assert_eq!(shortest_edge_size(640, 480, 336), (448, 336));
    }

    #[test]
    fn resizing_a_flat_image_keeps_its_colour() {
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([10, 200, 77]));
        let out = resample(&flat, 11, 31, 3);
        assert!(out.pixels().all(|p| p.0 == [10, 200, 77]));
    }

    #[test]
    fn pad_centers_the_image() {
        let img = RgbImage::from_pixel(4, 2, image::Rgb([255, 255, 255]));
        let sq = pad_to_square(&img, [1, 2, 3]);
        assert_eq!(sq.dimensions(), (4, 4));
        assert_eq!(sq.get_pixel(0, 0).0, [1, 2, 3]);
        assert_eq!(sq.get_pixel(0, 1).0, [255, 255, 255]);
        assert_eq!(sq.get_pixel(3, 3).0, [1, 2, 3]);
    }
}
