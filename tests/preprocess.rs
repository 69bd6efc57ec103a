//! Image preprocessing against transformers' CLIP / LLaVA processors (Pillow backend).

mod common;

use cmoe_test_support::scratch;
use common::{fixture, max_abs_diff, photo};
use llava_cmoe::data::ImageProcessorConfig;
use llava_cmoe::data::image::{CLIP_MEAN, CLIP_STD, SizeSpec};
use llava_cmoe::tensor_io::{HostTensor, read_tensor};

fn process(config: &ImageProcessorConfig, path: &std::path::Path) -> HostTensor {
    let pv = config.preprocess_file(path).unwrap();
    HostTensor {
        data: pv.data,
        shape: vec![1, 3, pv.height, pv.width],
    }
}

fn clip(edge: u32, pad: bool) -> ImageProcessorConfig {
    ImageProcessorConfig {
        do_pad: pad,
        ..ImageProcessorConfig::clip(edge)
    }
}

/// On a lossless PNG the only source of difference is arithmetic: resampling is Pillow's.
#[test]
fn png_matches_pillow_exactly() {
    let png = fixture("photo-crop.png");
    let reference = fixture("png-pixels.safetensors");
    for (name, config) in [
        ("down_64", clip(64, false)),
        ("up_150", clip(150, false)),
        ("pad_96", clip(96, true)),
    ] {
        let diff = max_abs_diff(
            &process(&config, &png),
            &read_tensor(&reference, name).unwrap(),
        );
        assert!(diff <= 1e-5, "{name}: differs by {diff}");
    }
}

/// JPEGs are decoded with libjpeg-turbo as in Pillow, so the real photo at LLaVA-1.5's settings
/// matches to float precision too (the issue asks for 2e-2; other decoders differ by up to 3
/// grey levels here, 4e-2).
#[test]
fn jpeg_at_llava_336_matches_pillow() {
    let reference = fixture("clip-336-pixels.safetensors");
    for (name, pad) in [("pixel_values", false), ("pixel_values_pad", true)] {
        let ours = process(&clip(336, pad), &photo());
        assert_eq!(ours.shape, vec![1, 3, 336, 336]);
        let diff = max_abs_diff(&ours, &read_tensor(&reference, name).unwrap());
        assert!(diff <= 1e-5, "{name}: differs by {diff}");
    }
}

#[test]
fn preprocessor_config_is_read_from_the_model_dir() {
    let config = ImageProcessorConfig::from_model_dir(&fixture("tiny-llava-b"), 999).unwrap();
    assert!(config.do_pad);
    assert!(matches!(
        config.size,
        SizeSpec::ShortestEdge { shortest_edge: 28 }
    ));
    assert_eq!(config.image_mean, CLIP_MEAN.to_vec());
    assert_eq!(config.image_std, CLIP_STD.to_vec());
    // Without a preprocessor_config.json: CLIP's processor at the tower's resolution.
    let fallback = ImageProcessorConfig::from_model_dir(&fixture("."), 336).unwrap();
    assert!(matches!(
        fallback.size,
        SizeSpec::ShortestEdge { shortest_edge: 336 }
    ));
}

#[test]
fn unreadable_images_are_errors_that_name_the_file() {
    let dir = scratch("bad-image");
    let corrupt = dir.join("corrupt.jpg");
    let mut bytes = std::fs::read(photo()).unwrap();
    bytes.truncate(200);
    std::fs::write(&corrupt, bytes).unwrap();
    let config = ImageProcessorConfig::clip(32);
    for path in [corrupt, dir.join("missing.png")] {
        let err = config.preprocess_file(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
