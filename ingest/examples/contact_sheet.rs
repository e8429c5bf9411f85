//! Renders a contact sheet of synthetic pedestrians: `cargo run -p plip-ingest --example
//! contact_sheet -- OUT.png [difficulty]` (rows = identities, columns = images).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "contact_sheet.png".into());
    let difficulty: f64 = args.next().map(|d| d.parse()).transpose()?.unwrap_or(0.7);
    let cfg = plip_ingest::synth::SynthConfig {
        train_ids: 8,
        test_ids: 0,
        images_per_id: 8,
        difficulty,
        ..Default::default()
    };
    let rendered = plip_ingest::synth::render_all(&cfg);
    let (w, h) = (128u32, 256u32);
    let mut sheet = image::RgbImage::new(w * 8, h * 8);
    for (n, (r, _)) in rendered.iter().enumerate() {
        let img = image::RgbImage::from_raw(w, h, r.rgb.clone()).ok_or("size")?;
        image::imageops::replace(
            &mut sheet,
            &img,
            i64::from((n % 8) as u32 * w),
            i64::from((n / 8) as u32 * h),
        );
    }
    let small =
        image::imageops::resize(&sheet, w * 4, h * 4, image::imageops::FilterType::Triangle);
    small.save(&out)?;
    Ok(())
}
