//! PNG decoding, pixel conversion (SPEC §3.3) and PNG writing.
//!
//! Every PNG colour type and bit depth is accepted (the `png` decoder expands 1/2/4-bit grey to 0–255 and palettes
//! to RGB/RGBA). Images become 8-bit grey with PIL's integer ITU-R 601 luma; masks become binary with "any colour
//! channel > 0" (alpha ignored).
use crate::{Error, Result};
use image::DynamicImage;
use std::path::Path;

/// An 8-bit single-channel raster, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Gray {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height);
        Self {
            width,
            height,
            data,
        }
    }
    pub fn zeros(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height],
        }
    }
    /// `(height, width)`.
    pub fn hw(&self) -> (usize, usize) {
        (self.height, self.width)
    }
}

/// Reads and decodes one PNG. A zero-byte or undecodable file is an error naming the file and the problem.
pub fn decode_png(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_png_bytes(path, &bytes)
}

/// Decodes PNG bytes read from `path` (the path is used in error messages only).
pub fn decode_png_bytes(path: &Path, bytes: &[u8]) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::file(path, "empty file (0 bytes), not a PNG"));
    }
    if bytes.len() < 8 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" {
        return Err(Error::file(path, "not a PNG file (bad signature)"));
    }
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Png);
    reader.no_limits();
    reader
        .decode()
        .map_err(|e| Error::file(path, format!("corrupt PNG: {e}")))
}

/// PIL's luma: `(19595·R + 38470·G + 7471·B + 32768) ≫ 16`.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 32768) >> 16) as u8
}

/// 16-bit → 8-bit: `round(v/257)` (never a tie for integer v).
#[inline]
pub fn u16_to_u8(v: u16) -> u8 {
    ((2 * v as u32 + 257) / 514) as u8
}

fn float_to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Any decoded image → 8-bit grey (SPEC §3.3 "Images").
pub fn to_gray(img: &DynamicImage) -> Result<Gray> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<u8> = match img {
        DynamicImage::ImageLuma8(b) => b.as_raw().clone(),
        DynamicImage::ImageLumaA8(b) => b.as_raw().chunks_exact(2).map(|p| p[0]).collect(),
        DynamicImage::ImageRgb8(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma(p[0], p[1], p[2]))
            .collect(),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma(p[0], p[1], p[2]))
            .collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| u16_to_u8(v)).collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| u16_to_u8(p[0]))
            .collect(),
        DynamicImage::ImageRgb16(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma(u16_to_u8(p[0]), u16_to_u8(p[1]), u16_to_u8(p[2])))
            .collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma(u16_to_u8(p[0]), u16_to_u8(p[1]), u16_to_u8(p[2])))
            .collect(),
        DynamicImage::ImageRgb32F(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma(float_to_u8(p[0]), float_to_u8(p[1]), float_to_u8(p[2])))
            .collect(),
        DynamicImage::ImageRgba32F(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| luma(float_to_u8(p[0]), float_to_u8(p[1]), float_to_u8(p[2])))
            .collect(),
        other => other.to_luma8().into_raw(),
    };
    Ok(Gray::new(w, h, data))
}

/// Any decoded mask → binary {0,1}: foreground iff any colour channel (alpha ignored) is non-zero (SPEC §3.3 "Masks").
pub fn to_binary_mask(img: &DynamicImage) -> Gray {
    let (w, h) = (img.width() as usize, img.height() as usize);
    fn any<T: Copy + PartialEq + Default>(raw: &[T], stride: usize, colour: usize) -> Vec<u8> {
        let zero = T::default();
        raw.chunks_exact(stride)
            .map(|p| p[..colour].iter().any(|&c| c != zero) as u8)
            .collect()
    }
    let data = match img {
        DynamicImage::ImageLuma8(b) => any(b.as_raw(), 1, 1),
        DynamicImage::ImageLumaA8(b) => any(b.as_raw(), 2, 1),
        DynamicImage::ImageRgb8(b) => any(b.as_raw(), 3, 3),
        DynamicImage::ImageRgba8(b) => any(b.as_raw(), 4, 3),
        DynamicImage::ImageLuma16(b) => any(b.as_raw(), 1, 1),
        DynamicImage::ImageLumaA16(b) => any(b.as_raw(), 2, 1),
        DynamicImage::ImageRgb16(b) => any(b.as_raw(), 3, 3),
        DynamicImage::ImageRgba16(b) => any(b.as_raw(), 4, 3),
        DynamicImage::ImageRgb32F(b) => b
            .as_raw()
            .chunks_exact(3)
            .map(|p| p.iter().any(|&c| c > 0.0) as u8)
            .collect(),
        DynamicImage::ImageRgba32F(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| p[..3].iter().any(|&c| c > 0.0) as u8)
            .collect(),
        other => other
            .to_rgb8()
            .as_raw()
            .chunks_exact(3)
            .map(|p| p.iter().any(|&c| c != 0) as u8)
            .collect(),
    };
    Gray::new(w, h, data)
}

/// Encodes an 8-bit grey raster as PNG bytes.
pub fn encode_gray_png(g: &Gray) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    enc.write_image(
        &g.data,
        g.width as u32,
        g.height as u32,
        image::ExtendedColorType::L8,
    )
    .map_err(|e| Error::msg(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Encodes raw samples of any `image` colour type as PNG bytes (used by the phantom and by tests).
pub fn encode_png(
    data: &[u8],
    width: usize,
    height: usize,
    color: image::ExtendedColorType,
) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    enc.write_image(data, width as u32, height as u32, color)
        .map_err(|e| Error::msg(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Writes an 8-bit grey PNG atomically (temp file + rename).
pub fn write_gray_png(path: &Path, g: &Gray) -> Result<()> {
    let bytes = encode_gray_png(g).map_err(|e| Error::file(path, e.to_string()))?;
    super::write_atomic(path, &bytes)
}

/// Minimal PNG writer for colour types the `image` encoder cannot produce: palette (colour type 3) and low bit-depth
/// grey (colour type 0 with 1/2/4 bits). `samples` holds one value per pixel (palette index or grey level < 2^bits);
/// the IDAT stream uses stored (uncompressed) deflate blocks.
pub fn encode_png_indexed(
    width: usize,
    height: usize,
    bit_depth: u8,
    palette: Option<&[[u8; 3]]>,
    samples: &[u8],
) -> Result<Vec<u8>> {
    if ![1u8, 2, 4, 8].contains(&bit_depth) || samples.len() != width * height {
        return Err(Error::msg(
            "encode_png_indexed: bad bit depth or sample count",
        ));
    }
    let colour_type: u8 = if palette.is_some() { 3 } else { 0 };
    let row_bytes = (width * bit_depth as usize).div_ceil(8);
    let mut raw = Vec::with_capacity(height * (row_bytes + 1));
    for y in 0..height {
        raw.push(0u8); // filter: none
        let mut row = vec![0u8; row_bytes];
        for x in 0..width {
            let v = samples[y * width + x] & ((1u16 << bit_depth) - 1) as u8;
            let bit = x * bit_depth as usize;
            row[bit / 8] |= v << (8 - bit_depth as usize - bit % 8);
        }
        raw.extend_from_slice(&row);
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, colour_type, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    if let Some(p) = palette {
        let plte: Vec<u8> = p.iter().flatten().copied().collect();
        png_chunk(&mut out, b"PLTE", &plte);
    }
    png_chunk(&mut out, b"IDAT", &zlib_stored(&raw));
    png_chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    c ^ 0xffff_ffff
}

fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(65535).collect()
    };
    for (i, c) in chunks.iter().enumerate() {
        out.push((i + 1 == chunks.len()) as u8);
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_matches_pil_rounding() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
        assert_eq!(luma(0, 0, 1), 0); // a colour whose luma is 0 but is still mask foreground
        assert_eq!(u16_to_u8(65535), 255);
        assert_eq!(u16_to_u8(128), 0);
        assert_eq!(u16_to_u8(129), 1);
    }

    #[test]
    fn indexed_png_round_trips() {
        let p = Path::new("x.png");
        let samples: Vec<u8> = (0..35).map(|i| (i % 3 == 0) as u8).collect();
        let bytes = encode_png_indexed(7, 5, 1, Some(&[[0, 0, 0], [0, 0, 1]]), &samples).unwrap();
        let img = decode_png_bytes(p, &bytes).unwrap();
        let m = to_binary_mask(&img);
        assert_eq!(m.data, samples);
        let bytes = encode_png_indexed(7, 5, 1, None, &samples).unwrap();
        let g = to_gray(&decode_png_bytes(p, &bytes).unwrap()).unwrap();
        assert_eq!(g.data, samples.iter().map(|&s| s * 255).collect::<Vec<_>>());
    }
}
