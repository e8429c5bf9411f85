//! The attribute head at serving time: per-field readings, and ranking by attribute agreement
//! through the index rows.

mod common;

use common::*;
use plip_model::batch::normalize_rgb;
use plip_model::dfdx::prelude::*;
use plip_model::{Plip, Preset};

/// Readings are per-field distributions, and with `attribute_weight` λ the dot product of a
/// caption's row with an image's row is the cosine of their joint features plus λ times the
/// expected fraction of fields on which the two readings agree — exactly, in the index's own
/// arithmetic; an image against an image likewise. λ = 0 leaves the rows as they were.
#[test]
fn agreement_rows_add_lambda_times_the_fields_agreed() {
    let fields = [3usize, 4];
    let p = Preset::test().with_attributes(&fields);
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 5);
    let images: Vec<f32> = toys
        .iter()
        .flat_map(|t| normalize_rgb(&t.rgb, p.image_height, p.image_width))
        .collect();
    let captions: Vec<String> = toys.iter().map(|t| t.caption.clone()).collect();
    let tokens = tk.encode_batch(&captions, p.text_len).unwrap();
    let plain = Plip::<f32, Cpu>::new(&cpu(), &p, 4).unwrap();
    let mut ranked = plain.clone();
    ranked.preset.attribute_weight = 2.0;
    assert_eq!(plain.preset.index_dim(), p.embed);
    assert_eq!(ranked.preset.index_dim(), p.embed + 7);

    let ta = plain.text_attributes(&tokens, 4).unwrap();
    let ia = plain.image_attributes(&images, 4).unwrap();
    for row in ta.chunks(7).chain(ia.chunks(7)) {
        assert!((row[..3].iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
        assert!((row[3..].iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
    }
    let (t0, i0) = (
        plain.embed_texts(&tokens, 4),
        plain.embed_images(&images, 4),
    );
    let (t1, i1) = (
        ranked.embed_texts(&tokens, 4),
        ranked.embed_images(&images, 4),
    );
    assert_eq!(
        (t0.dim, t1.dim, i1.dim),
        (p.embed, p.embed + 7, p.embed + 7)
    );
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let agree = |a: &[f32], b: &[f32]| dot(a, b) / fields.len() as f32;
    for i in 0..toys.len() {
        for j in 0..toys.len() {
            let want = dot(t0.row(i), i0.row(j))
                + 2.0 * agree(&ta[i * 7..(i + 1) * 7], &ia[j * 7..(j + 1) * 7]);
            let got = dot(t1.row(i), i1.row(j));
            assert!(
                (got - want).abs() < 1e-5,
                "caption {i} image {j}: {got} vs {want}"
            );
            let want = dot(i0.row(i), i0.row(j))
                + 2.0 * agree(&ia[i * 7..(i + 1) * 7], &ia[j * 7..(j + 1) * 7]);
            let got = dot(i1.row(i), i1.row(j));
            assert!(
                (got - want).abs() < 1e-5,
                "image {i} image {j}: {got} vs {want}"
            );
        }
    }
    // Without the head there is nothing to read and nothing is appended.
    let mut no_head = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 4).unwrap();
    no_head.preset.attribute_weight = 2.0;
    assert!(no_head.text_attributes(&tokens, 4).is_none());
    assert_eq!(no_head.embed_images(&images, 4).dim, p.embed);
}
