//! A tiny raster canvas for the synthetic images: filled shapes, 8x8 bitmap text (the
//! `font8x8` crate, embedded), and the degradations of the VizWiz-like task.

use font8x8::{BASIC_FONTS, UnicodeFonts};
use image::{Rgb, RgbImage};

/// The shapes objects are drawn as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A filled square.
    Square,
    /// A filled circle.
    Circle,
    /// A filled upward triangle.
    Triangle,
    /// A filled diamond.
    Diamond,
    /// A plus-shaped cross.
    Cross,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 5] = [
        Shape::Square,
        Shape::Circle,
        Shape::Triangle,
        Shape::Diamond,
        Shape::Cross,
    ];

    /// Its English name.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Square => "square",
            Shape::Circle => "circle",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
        }
    }
}

/// Named colours, far apart in RGB.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 215, 40]),
    ("purple", [150, 60, 190]),
    ("orange", [240, 140, 30]),
];

/// A square axis-aligned box in pixels: `[x0, y0, x1, y1)` .
pub type PixelBox = [u32; 4];

/// An RGB canvas.
pub struct Canvas {
    /// The pixels.
    pub image: RgbImage,
}

impl Canvas {
    /// A `size` x `size` canvas filled with `background`.
    pub fn new(size: u32, background: [u8; 3]) -> Self {
        Self::with_size(size, size, background)
    }

    /// A `width` x `height` canvas filled with `background`.
    pub fn with_size(width: u32, height: u32, background: [u8; 3]) -> Self {
        Self {
            image: RgbImage::from_pixel(width, height, Rgb(background)),
        }
    }

    fn put(&mut self, x: i64, y: i64, colour: [u8; 3]) {
        let (w, h) = self.image.dimensions();
        if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
            self.image.put_pixel(x as u32, y as u32, Rgb(colour));
        }
    }

    /// Fills the rectangle `b`.
    pub fn rect(&mut self, b: PixelBox, colour: [u8; 3]) {
        for y in b[1]..b[3] {
            for x in b[0]..b[2] {
                self.put(x as i64, y as i64, colour);
            }
        }
    }

    /// Draws `shape` filling the box `b` (its bounding box).
    pub fn shape(&mut self, shape: Shape, b: PixelBox, colour: [u8; 3]) {
        let (w, h) = ((b[2] - b[0]) as f64, (b[3] - b[1]) as f64);
        for y in b[1]..b[3] {
            for x in b[0]..b[2] {
                // Pixel centre relative to the box, in [0, 1].
                let u = (x - b[0]) as f64 / w + 0.5 / w;
                let v = (y - b[1]) as f64 / h + 0.5 / h;
                let inside = match shape {
                    Shape::Square => true,
                    Shape::Circle => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
                    Shape::Triangle => (u - 0.5).abs() <= v / 2.0,
                    Shape::Diamond => (u - 0.5).abs() + (v - 0.5).abs() <= 0.5,
                    Shape::Cross => (u - 0.5).abs() <= 0.17 || (v - 0.5).abs() <= 0.17,
                };
                if inside {
                    self.put(x as i64, y as i64, colour);
                }
            }
        }
    }

    /// Writes `text` with the 8x8 font scaled by `scale`, top-left at `(x, y)`.
    pub fn text(&mut self, text: &str, x: u32, y: u32, scale: u32, colour: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let glyph = BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            let left = x + i as u32 * 8 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        let px = left + col * scale;
                        let py = y + row as u32 * scale;
                        self.rect([px, py, px + scale, py + scale], colour);
                    }
                }
            }
        }
    }

    /// Gaussian blur with standard deviation `sigma`.
    pub fn blur(&mut self, sigma: f32) {
        self.image = image::imageops::blur(&self.image, sigma);
    }

    /// Multiplies every channel by `factor`.
    pub fn darken(&mut self, factor: f32) {
        for p in self.image.pixels_mut() {
            for c in &mut p.0 {
                *c = (*c as f32 * factor).round() as u8;
            }
        }
    }
}
