//! The sample store on real sled: idempotent by id, durable across reopen, canonical JPEG,
//! retention order, probe split.

use image::{Rgb, RgbImage};
use plip_actors::state::State;
use plip_actors::store::is_probe;
use plip_ingest::wire::{Purpose, ValidImage};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("plipd-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn img(id: &str, person: &str, purpose: Purpose) -> ValidImage {
    ValidImage {
        id: id.into(),
        person_id: Some(person.into()),
        camera_id: Some("c1".into()),
        captions: vec!["a woman in a red coat".into()],
        attributes: None,
        purpose,
        pixels: RgbImage::from_pixel(40, 90, Rgb([200, 30, 30])),
        encoded: None,
    }
}

/// A re-sent id is stored once; what was stored survives reopening the folder; samples are
/// canonical 256×128 JPEGs with their captions' phrases.
#[test]
fn idempotent_and_durable() {
    let dir = tmp("idem");
    {
        let st = State::open(&dir).unwrap();
        let s = st.samples(10).unwrap();
        assert_eq!(
            s.put_batch(&[
                img("a", "1", Purpose::Train),
                img("b", "2", Purpose::Gallery)
            ])
            .unwrap(),
            vec![true, true]
        );
        assert_eq!(
            s.put_batch(&[img("a", "1", Purpose::Train), img("c", "3", Purpose::Both)])
                .unwrap(),
            vec![false, true]
        );
        assert_eq!(s.len(), 3);
    }
    let st = State::open(&dir).unwrap();
    let s = st.samples(10).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s.ids_by_arrival(), vec!["a", "b", "c"]);
    let a = s.get("a").unwrap().unwrap();
    let decoded = image::load_from_memory(&a.jpeg).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (128, 256));
    assert_eq!(a.meta.captions[0].phrase_text(1), "red coat");
    let c = s.counts();
    assert_eq!((c.train, c.gallery, c.both), (1, 1, 1));
    let _ = std::fs::remove_dir_all(dir);
}

/// Retention evicts the oldest training samples first and never gallery or probe samples.
#[test]
fn eviction_oldest_training_first() {
    let dir = tmp("evict");
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    for i in 0..5 {
        s.put_batch(&[img(&format!("t{i}"), &format!("p{i}"), Purpose::Train)])
            .unwrap();
    }
    s.put_batch(&[img("g", "pg", Purpose::Gallery)]).unwrap();
    assert_eq!(s.evict_training(2).unwrap(), 3);
    assert_eq!(s.ids_by_arrival(), vec!["t3", "t4", "g"]);
    assert!(s.get("t0").unwrap().is_none());
    let _ = std::fs::remove_dir_all(dir);
}

/// The probe split is a deterministic fraction of person ids.
#[test]
fn probe_split_is_deterministic() {
    let n = (0..10_000)
        .filter(|i| is_probe(Some(&format!("{i:04}")), "x", 10))
        .count();
    assert!((800..1200).contains(&n), "{n}");
    assert_eq!(
        is_probe(Some("0042"), "a", 10),
        is_probe(Some("0042"), "b", 10)
    );
    assert!(!is_probe(Some("0042"), "a", 0));
}

/// Images arriving through intake (`IntakeImage::decode`): a JPEG within 256×128 is stored as
/// the producer's bytes (its Exif segment removed), one larger is stored as the canonical
/// 256×128 JPEG; both decode to what the producer sent, at their stored sizes.
#[test]
fn small_jpegs_are_stored_as_sent_and_large_ones_canonical() {
    use plip_ingest::image::IntakeLimits;
    use plip_ingest::wire::IntakeImage;
    let dir = tmp("as-sent");
    let st = State::open(&dir).unwrap();
    let s = st.samples(10).unwrap();
    let jpeg = |w: u32, h: u32| {
        let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 5 % 256) as u8, (y % 256) as u8, 90]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        let plain = out.into_inner();
        // An Exif segment after the start-of-image marker.
        let exif = b"Exif\0\0GPS 48.85N 2.35E";
        let mut tagged = plain[..2].to_vec();
        tagged.extend_from_slice(&[0xff, 0xe1]);
        tagged.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        tagged.extend_from_slice(exif);
        tagged.extend_from_slice(&plain[2..]);
        (plain, tagged)
    };
    let intake = |id: &str, bytes: Vec<u8>, (w, h): (u32, u32)| {
        IntakeImage {
            id: id.into(),
            person_id: Some("1".into()),
            camera_id: Some("c1".into()),
            captions: vec!["a man in a blue coat".into()],
            attributes: None,
            purpose: Purpose::Train,
            bytes,
            width: w,
            height: h,
        }
        .decode(&IntakeLimits::default())
        .unwrap()
    };
    let (small_plain, small) = jpeg(64, 128);
    let (_, large) = jpeg(200, 400);
    s.put_batch(&[
        intake("small", small, (64, 128)),
        intake("large", large, (200, 400)),
    ])
    .unwrap();
    let got = s.get("small").unwrap().unwrap();
    assert_eq!(got.jpeg, small_plain, "the producer's bytes, without Exif");
    let large = s.get("large").unwrap().unwrap();
    let decoded = image::load_from_memory(&large.jpeg).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (128, 256));
    let _ = std::fs::remove_dir_all(dir);
}
