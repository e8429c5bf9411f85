//! The sample store on real sled: idempotent by id, durable across reopen, canonical JPEG,
//! retention order, probe split.

use image::{Rgb, RgbImage};
use plip_actors::base::state::State;
use plip_actors::base::store::is_probe;
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

fn pack_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join(plip_actors::base::packs::PACKS_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn noise_image(id: &str, person: &str, seed: u32) -> ValidImage {
    let mut v = img(id, person, Purpose::Train);
    v.pixels = RgbImage::from_fn(64, 128, |x, y| {
        Rgb([
            ((x * 37 + y * 91 + seed * 13) % 256) as u8,
            ((x * 53 + seed) % 256) as u8,
            ((y * 29 + seed * 7) % 256) as u8,
        ])
    });
    v
}

/// Images are appended to pack files, not kept in sled's records; what a sample's record
/// points at reads back byte for byte after reopening; an image that came without captions is
/// captioned as it is stored (no captioning ticket left), from the colours of its pixels.
#[test]
fn images_live_in_pack_files_and_uncaptioned_ones_are_captioned_at_intake() {
    let dir = tmp("packs");
    let stored: Vec<Vec<u8>>;
    {
        let st = State::open(&dir).unwrap();
        let s = st.samples(0).unwrap();
        let mut plain = img("red", "1", Purpose::Train);
        plain.captions.clear();
        let mut batch = vec![plain];
        batch.extend((0..5).map(|i| noise_image(&format!("n{i}"), "2", i)));
        assert_eq!(s.put_batch(&batch).unwrap(), vec![true; 6]);
        assert_eq!(s.uncaptioned_len(), 0);
        let red = s.get("red").unwrap().unwrap();
        assert!(!red.meta.captions.is_empty());
        assert!(
            red.meta.captions.iter().any(|c| c.text.contains("red")),
            "{:?}",
            red.meta.captions
        );
        stored = batch
            .iter()
            .map(|b| s.get(&b.id).unwrap().unwrap().jpeg)
            .collect();
        let packs: Vec<u8> = pack_files(&dir)
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap())
            .collect();
        for jpeg in &stored {
            assert!(contains(&packs, jpeg));
        }
    }
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    for (i, id) in ["red", "n0", "n1", "n2", "n3", "n4"].iter().enumerate() {
        assert_eq!(s.get(id).unwrap().unwrap().jpeg, stored[i], "{id}");
    }
    assert_eq!(s.len(), 6);
    let _ = std::fs::remove_dir_all(dir);
}

/// Forgetting a person removes its images' bytes from the pack files at once.
#[test]
fn forgetting_a_person_removes_the_image_bytes_from_disk() {
    let dir = tmp("forget-bytes");
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    s.put_batch(&[noise_image("keep", "1", 1), noise_image("gone", "2", 2)])
        .unwrap();
    let keep = s.get("keep").unwrap().unwrap().jpeg;
    let gone = s.get("gone").unwrap().unwrap().jpeg;
    let packs = || -> Vec<u8> {
        pack_files(&dir)
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap())
            .collect()
    };
    assert!(contains(&packs(), &gone));
    assert_eq!(s.forget_person("2").unwrap(), vec!["gone".to_string()]);
    let after = packs();
    assert!(
        !contains(&after, &gone),
        "the forgotten image is still on disk"
    );
    assert!(contains(&after, &keep));
    assert_eq!(s.get("keep").unwrap().unwrap().jpeg, keep);
    let _ = std::fs::remove_dir_all(dir);
}

/// Bytes appended to a pack whose records were never committed (a crash between the two
/// steps) are reclaimed when the folder is opened again; committed ones stay readable, and
/// writing resumes in a new pack.
#[test]
fn bytes_without_a_record_are_reclaimed_on_open() {
    let dir = tmp("orphans");
    let orphan;
    {
        let st = State::open(&dir).unwrap();
        let s = st.samples(0).unwrap();
        s.put_batch(&[noise_image("kept", "1", 1)]).unwrap();
        // Staged but never committed: as if the process died before the records were written.
        let staged = s.stage(&noise_image("lost", "1", 2)).unwrap().unwrap();
        let all: Vec<u8> = pack_files(&dir)
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap())
            .collect();
        let kept = s.get("kept").unwrap().unwrap().jpeg;
        assert!(all.len() > kept.len(), "the staged bytes are in the pack");
        orphan = all[kept.len()..].to_vec();
        drop(staged);
    }
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    assert!(s.get("lost").unwrap().is_none());
    let kept = s.get("kept").unwrap().unwrap().jpeg;
    let files = pack_files(&dir);
    let first = std::fs::read(&files[0]).unwrap();
    assert_eq!(first, kept, "the orphan tail was cut off the first pack");
    assert!(!contains(&first, &orphan));
    assert_eq!(files.len(), 2, "a new pack for new writes: {files:?}");
    s.put_batch(&[noise_image("later", "1", 3)]).unwrap();
    assert_eq!(
        std::fs::read(&files[1]).unwrap(),
        s.get("later").unwrap().unwrap().jpeg
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A pack byte changed on disk is reported by its checksum, never served as an image.
#[test]
fn a_corrupted_pack_entry_is_an_error() {
    let dir = tmp("crc");
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    s.put_batch(&[noise_image("x", "1", 1)]).unwrap();
    let file = pack_files(&dir)[0].clone();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[40] ^= 0x55;
    std::fs::write(&file, bytes).unwrap();
    let err = s.get("x").unwrap_err().to_string();
    assert!(err.contains("CRC mismatch"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A format-1 state folder (JPEGs inside sled's records, captioning tickets) opens with this
/// build: its images read as before, the figures count them, the folder is marked format 2
/// (older builds then refuse it), and the caption workers' path still captions its tickets.
#[test]
fn format_1_folders_with_inline_images_are_read_and_upgraded() {
    let dir = tmp("format1");
    let jpeg = {
        let img = RgbImage::from_pixel(64, 128, Rgb([20, 30, 160]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    };
    {
        // Written as a format-1 build wrote it.
        let db = sled::open(&dir).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format_version", "1")
            .unwrap();
        let meta = serde_json::json!({
            "id": "old", "person_id": "7", "camera_id": "c1", "captions": [],
            "attributes": null, "purpose": "train", "probe": false, "seq": 3
        });
        let json = serde_json::to_vec(&meta).unwrap();
        let mut record = (json.len() as u64).to_le_bytes().to_vec();
        record.extend_from_slice(&json);
        record.extend_from_slice(&jpeg);
        db.open_tree("samples")
            .unwrap()
            .insert("old", record)
            .unwrap();
        db.open_tree("arrivals")
            .unwrap()
            .insert(3u64.to_be_bytes(), "old")
            .unwrap();
        db.open_tree("uncaptioned")
            .unwrap()
            .insert("old", &[])
            .unwrap();
        db.flush().unwrap();
    }
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    assert_eq!((s.len(), s.uncaptioned_len(), s.counts().train), (1, 1, 1));
    let old = s.get("old").unwrap().unwrap();
    assert_eq!(old.jpeg, jpeg);
    assert!(old.meta.image.is_none());
    let attrs = plip_ingest::captions::estimate_colours(
        &plip_ingest::image::decode(&old.jpeg, &Default::default()).unwrap(),
    );
    s.set_captions("old", plip_actors::base::store::daemon_captions(&attrs, 3))
        .unwrap();
    assert_eq!(s.uncaptioned_len(), 0);
    let old = s.get("old").unwrap().unwrap();
    assert_eq!(old.jpeg, jpeg, "the inline image survives the new captions");
    assert!(old.meta.captions.iter().any(|c| c.text.contains("blue")));
    drop(s);
    drop(st);
    let db = sled::open(&dir).unwrap();
    let v = db.open_tree("meta").unwrap().get("format_version").unwrap();
    assert_eq!(v.as_deref(), Some(&b"2"[..]));
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
}

/// Deliveries committing side by side share pack syncs and all land: four threads staging and
/// committing 50 images each, every image readable afterwards and counted once.
#[test]
fn concurrent_commits_all_land() {
    let dir = tmp("concurrent");
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            let s = s.clone();
            scope.spawn(move || {
                for chunk in (0..50u32).collect::<Vec<_>>().chunks(10) {
                    let staged: Vec<_> = chunk
                        .iter()
                        .filter_map(|i| {
                            s.stage(&noise_image(&format!("t{t}-{i}"), "p", t * 100 + i))
                                .unwrap()
                        })
                        .collect();
                    let puts = s.commit(staged).unwrap();
                    assert!(puts.iter().all(|p| p.fresh));
                    s.flush().unwrap();
                }
            });
        }
    });
    assert_eq!(s.len(), 200);
    for t in 0..4 {
        for i in 0..50 {
            let got = s.get(&format!("t{t}-{i}")).unwrap().unwrap();
            assert!(plip_ingest::image::decode(&got.jpeg, &Default::default()).is_ok());
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Writing moves to a new pack past the size limit; a pack whose every entry is released is
/// deleted (the one being written is kept), and a sync of an entry in a closed pack needs no
/// second `fdatasync`.
#[test]
fn packs_rotate_and_empty_ones_are_deleted() {
    use plip_actors::base::packs::Packs;
    let dir = tmp("rotate");
    std::fs::create_dir_all(&dir).unwrap();
    let (packs, recovered) = Packs::open(&dir, [], 1000).unwrap();
    assert_eq!(recovered, Default::default());
    let refs: Vec<_> = (0..6u8).map(|i| packs.append(&[i; 400]).unwrap()).collect();
    let numbers: Vec<u32> = refs.iter().map(|r| r.pack).collect();
    assert_eq!(numbers, vec![1, 1, 2, 2, 3, 3]);
    for r in &refs {
        packs.sync_upto(r).unwrap();
    }
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(packs.read(r).unwrap(), vec![i as u8; 400]);
    }
    let names = || pack_files(&dir).len();
    assert_eq!(names(), 3);
    packs.release(&refs[0]).unwrap();
    assert_eq!(names(), 3, "pack 1 still holds an entry");
    assert_eq!(packs.read(&refs[1]).unwrap(), vec![1u8; 400]);
    packs.release(&refs[1]).unwrap();
    assert_eq!(names(), 2, "pack 1 deleted");
    packs.release(&refs[4]).unwrap();
    packs.release(&refs[5]).unwrap();
    assert_eq!(names(), 2, "the pack being written stays");
    drop(packs);
    // Reopened knowing only pack 2's entries: pack 3 (nothing referenced) goes.
    let (packs, recovered) = Packs::open(&dir, [refs[2], refs[3]], 1000).unwrap();
    assert_eq!(recovered.packs_deleted, 1);
    assert_eq!(packs.read(&refs[3]).unwrap(), vec![3u8; 400]);
    // Several items in one append (one write per pack): the same layout as one at a time,
    // moving on to new packs (4 is the one opened above) as they fill.
    let items: Vec<Vec<u8>> = (10..15u8).map(|i| vec![i; 400]).collect();
    let slices: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
    let batch = packs.append_all(&slices).unwrap();
    let placed: Vec<(u32, u64)> = batch.iter().map(|r| (r.pack, r.offset)).collect();
    assert_eq!(placed, vec![(4, 0), (4, 400), (5, 0), (5, 400), (6, 0)]);
    packs.sync_upto(&batch[4]).unwrap();
    for (r, item) in batch.iter().zip(&items) {
        assert_eq!(&packs.read(r).unwrap(), item);
    }
    assert!(packs.append_all(&[]).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

/// Arrivals handed out but not committed hold back `settled_below` (a follower of the arrivals
/// must not pass them: concurrent deliveries commit out of order); a committed or abandoned one
/// releases it. `forget_ids` deletes exactly the named samples.
#[test]
fn unsettled_arrivals_hold_followers_back() {
    let dir = tmp("settled");
    let st = State::open(&dir).unwrap();
    let s = st.samples(0).unwrap();
    assert_eq!(s.settled_below(), u64::MAX);
    let a = s.stage(&img("a", "1", Purpose::Gallery)).unwrap().unwrap();
    let b = s.stage(&img("b", "1", Purpose::Gallery)).unwrap().unwrap();
    let first = s.settled_below();
    s.commit(vec![b]).unwrap();
    // b is stored, yet a (numbered before it) is not: followers stop before a.
    assert_eq!(s.settled_below(), first);
    let stored: Vec<u64> = s.arrivals_from(0, 10).iter().map(|(seq, _)| *seq).collect();
    assert_eq!(stored.len(), 1);
    assert!(stored[0] > first);
    drop(a); // abandoned (a failed delivery is nacked and comes again)
    assert_eq!(s.settled_below(), u64::MAX);
    s.put_one(&img("c", "2", Purpose::Gallery)).unwrap();
    s.put_one(&img("d", "2", Purpose::Gallery)).unwrap();
    let (ids, _) = s.person_ids("2");
    assert_eq!(ids.len(), 2);
    let gone = s
        .forget_ids(&["c".to_string(), "nope".to_string()])
        .unwrap();
    assert_eq!(gone, vec!["c".to_string()]);
    assert!(s.get("c").unwrap().is_none());
    assert!(s.get("d").unwrap().is_some());
    assert!(s.get("b").unwrap().is_some());
    let _ = std::fs::remove_dir_all(dir);
}
