//! Presets: documented sizes, output shapes, and padding invariance of the text tower.

mod common;

use common::*;
use plip_model::dfdx::prelude::*;
use plip_model::text::TokenBatch;
use plip_model::{Params, Plip, Preset};

/// The ResNet image towers have exactly torchvision's tensors: ResNet-50's body (23,508,032
/// parameters: `resnet50` without its 1000-way `fc`) in `rn50`, ResNet-18's (11,176,512) in
/// `tiny` at torchvision's widths, each with its running statistics, under `image.` with the
/// same names and (for convolutions, in files) the same `(O, I, kH, kW)` shapes.
#[test]
fn resnet_towers_have_torchvisions_tensors() {
    for (p, body, convs) in [
        (Preset::rn50(), 23_508_032usize, 53usize),
        (
            Preset::tiny()
                .with_conv_widths(&[64, 128, 256, 512])
                .unwrap(),
            11_176_512,
            20,
        ),
    ] {
        let m = Plip::<f32, Cpu>::new(&cpu(), &p, 1).unwrap();
        let is_body = |n: &str| {
            n.starts_with("image.conv1")
                || n.starts_with("image.bn1")
                || n.starts_with("image.layer")
        };
        let params: usize = m
            .params()
            .iter()
            .filter(|(n, _)| is_body(n))
            .map(|(_, t)| t.len())
            .sum();
        assert_eq!(params, body, "{}", p.name);
        let names: Vec<String> = m.state().into_iter().map(|(n, _)| n).collect();
        for n in [
            "image.conv1.weight",
            "image.bn1.running_var",
            "image.layer2.0.downsample.0.weight",
            "image.layer2.0.downsample.1.running_mean",
            "image.layer4.1.conv2.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "{}: no {n}", p.name);
        }
        let mut shapes = Vec::new();
        m.visit_convs("", &mut shapes);
        assert_eq!(shapes.len(), convs, "{}", p.name);
        assert!(shapes.contains(&("image.conv1.weight".to_string(), [64, 3, 7, 7])));
    }
    let m = Plip::<f32, Cpu>::new(&cpu(), &Preset::rn50(), 1).unwrap();
    let mut shapes = Vec::new();
    m.visit_convs("", &mut shapes);
    for (name, shape) in [
        ("image.layer1.0.conv3.weight", [256, 64, 1, 1]),
        ("image.layer3.5.conv2.weight", [256, 256, 3, 3]),
        ("image.layer4.0.downsample.0.weight", [2048, 1024, 1, 1]),
    ] {
        assert!(shapes.contains(&(name.to_string(), shape)), "{name}");
    }
}

/// Each preset builds, has the parameter count its documentation states, and embeds images and
/// captions to unit-length rows of the joint width.
#[test]
fn presets_have_documented_sizes_and_shapes() {
    let documented = [
        ("test", 147_049usize),
        ("test-vit", 129_377),
        ("tiny", 15_881_649),
        ("tiny-vit", 9_302_177),
        ("small", 60_110_337),
        ("rn50", 81_109_761),
    ];
    for (name, count) in documented {
        let p = Preset::by_name(name).unwrap();
        let m = Plip::<f32, Cpu>::new(&cpu(), &p, 1).unwrap();
        assert_eq!(
            m.num_params(),
            count,
            "{name}: update the table in preset.rs and the README"
        );
        let images = vec![0.1f32; 2 * p.image_len()];
        let e = m.embed_images(&images, 2);
        assert_eq!((e.rows, e.dim, e.data.len()), (2, p.embed, 2 * p.embed));
        let tokens = TokenBatch {
            ids: vec![2, 9, 3, 0, 2, 3, 0, 0],
            mask: vec![1., 1., 1., 0., 1., 1., 0., 0.],
            batch: 2,
            len: 4,
        };
        let t = m.embed_texts(&tokens, 8);
        assert_eq!((t.rows, t.dim), (2, p.embed));
        for r in 0..2 {
            let n: f32 = t.row(r).iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "{name}: norm {n}");
        }
    }
    assert!(Preset::by_name("huge")
        .unwrap_err()
        .to_string()
        .contains("test, test-vit, tiny, tiny-vit, small"));
}

/// Adding padding to a caption leaves its text embedding unchanged: the same tokens at length
/// 9 and 24, and beside a longer caption in one batch; with the hashed bigram embedding too.
#[test]
fn padding_leaves_text_embedding_unchanged() {
    padding_leaves_text_embedding_unchanged_for(Preset::test());
    padding_leaves_text_embedding_unchanged_for(Preset::test().with_text_bigrams(64));
}

fn padding_leaves_text_embedding_unchanged_for(p: Preset) {
    let tk = tokenizer(&p);
    let m = Plip::<f32, Cpu>::new(&cpu(), &p, 4).unwrap();
    let short = "a person wearing a red shirt";
    let dev = cpu();
    let alone = |len: usize| {
        let tb = tk.encode_batch(&[short], len).unwrap();
        m.text.embed(&dev, &tb, NoneTape).as_vec()
    };
    let a = alone(9);
    let b = alone(24);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "padding changed the embedding by {worst}");
    let mixed = tk
        .encode_batch(
            &[
                "a person wearing a green shirt and black trousers with a backpack",
                short,
            ],
            24,
        )
        .unwrap();
    let e = m.text.embed(&dev, &mixed, NoneTape).as_vec();
    let second = &e[p.embed..];
    let worst = second
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-5,
        "batch neighbour changed the embedding by {worst}"
    );
    // Sanity: the mask matters — without it the padded version differs.
    let mut unmasked = tk.encode_batch(&[short], 24).unwrap();
    unmasked.mask = vec![1.0; 24];
    let c = m.text.embed(&dev, &unmasked, NoneTape).as_vec();
    assert!(c.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
}

/// The hashed bigram embedding: its rows add `rows × dim` parameters (drawn after everything
/// else, so the other weights initialise as without it); a token's row depends on the next
/// real token, with the same end marker after the last real token alone and padded; and the
/// rows change the caption's embedding.
#[test]
fn bigram_embedding_reads_each_token_with_its_neighbour() {
    use plip_model::text::bigram_ids;
    let p = Preset::test();
    let q = p.with_text_bigrams(64);
    let plain = Plip::<f32, Cpu>::new(&cpu(), &p, 4).unwrap();
    let with = Plip::<f32, Cpu>::new(&cpu(), &q, 4).unwrap();
    assert_eq!(with.num_params(), plain.num_params() + 64 * p.dim);
    let other: Vec<Vec<f32>> = plain.params().iter().map(|(_, t)| t.to_host()).collect();
    let same: Vec<Vec<f32>> = with
        .params()
        .iter()
        .filter(|(n, _)| n != "text.bigram_embed")
        .map(|(_, t)| t.to_host())
        .collect();
    assert_eq!(
        other, same,
        "the other weights initialise as without bigrams"
    );
    let padded = TokenBatch {
        ids: vec![5, 6, 7, 0, 0, 5, 7, 6, 8, 9],
        mask: vec![1., 1., 1., 0., 0., 1., 1., 1., 1., 1.],
        batch: 2,
        len: 5,
    };
    let ids = bigram_ids(&padded, 64);
    assert!(ids.iter().all(|&i| i < 64));
    let alone = TokenBatch {
        ids: vec![5, 6, 7],
        mask: vec![1.; 3],
        batch: 1,
        len: 3,
    };
    assert_eq!(
        bigram_ids(&alone, 64),
        ids[..3],
        "end marker differs alone and padded"
    );
    // (5, 6) in the first caption and (5, 7) in the second: the next token picks the row.
    let wide = bigram_ids(&padded, 1 << 20);
    assert_ne!(wide[0], wide[5]);
    assert_eq!(bigram_ids(&alone, 1 << 20)[0], wide[0]);
    let dev = cpu();
    let a = plain.text.embed(&dev, &alone, NoneTape).as_vec();
    let b = with.text.embed(&dev, &alone, NoneTape).as_vec();
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
}

/// A text-depth override builds, and a checkpoint of another depth is refused with an error
/// that says how to keep training it.
#[test]
fn text_depth_override_and_its_mismatch() {
    let p = Preset::test();
    assert_eq!(p.with_text_layers(0).unwrap(), p);
    let one = p.with_text_layers(1).unwrap();
    assert_eq!(one.text_layers, 1);
    let m = Plip::<f32, Cpu>::new(&cpu(), &one, 0).unwrap();
    assert!(m.num_params() < Plip::<f32, Cpu>::new(&cpu(), &p, 0).unwrap().num_params());
    let why = p.mismatch(&one).expect("another depth is refused");
    assert!(
        why.contains("1-block text tower") && why.contains("trainer.text_layers = 1"),
        "{why}"
    );
    assert!(one.mismatch(&one).is_none());
}

/// A ResNet-width override builds a wider tower whose joint embedding is as wide as its last
/// stage; a checkpoint of other widths is refused with an error that names the key to set;
/// bad width lists and the ViT are refused.
#[test]
fn conv_width_override_and_its_mismatch() {
    let p = Preset::test();
    assert_eq!(p.with_conv_widths(&[]).unwrap(), p);
    let wide = p.with_conv_widths(&[8, 16, 32, 48]).unwrap();
    assert_eq!(
        (wide.conv_widths.clone(), wide.embed),
        (vec![8, 16, 32, 48], 48)
    );
    let m = Plip::<f32, Cpu>::new(&cpu(), &wide, 0).unwrap();
    assert!(m.num_params() > Plip::<f32, Cpu>::new(&cpu(), &p, 0).unwrap().num_params());
    let why = wide.mismatch(&p).expect("other widths are refused");
    assert!(
        why.contains("8,16,32,32") && why.contains("trainer.conv_widths = [8, 16, 32, 32]"),
        "{why}"
    );
    assert!(wide.mismatch(&wide).is_none());
    assert!(p.with_conv_widths(&[8, 16, 32]).is_err());
    assert!(p.with_conv_widths(&[8, 16, 0, 32]).is_err());
    assert!(Preset::test_vit()
        .with_conv_widths(&[8, 16, 32, 32])
        .is_err());
}
