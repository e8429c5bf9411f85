//! Pack files: the stored images' bytes, outside sled.
//!
//! A sample's record in sled holds its metadata and a [`PackRef`] — pack number, offset, length
//! and CRC-32 of its JPEG — and the bytes themselves are appended to `packs/pack-NNNNNNNN` in
//! the state folder. sled rewrites a leaf, values included, each time it consolidates it, so
//! 3 KB images kept inside it were written many times over (16,000 images of 128×64 — 50 MB —
//! made the daemon write 285 MB, and the device 780 MB); appended to a pack they are written
//! once, and sled's records shrink to a few hundred bytes.
//!
//! Durability, in order: a delivery's images are appended (no fsync), then [`Packs::sync_upto`]
//! makes them durable — one `fdatasync` serves every delivery whose bytes it covers (group
//! commit: a caller that finds its bytes synced by another's call returns at once) — and only
//! then are the metadata records written and flushed and the delivery acknowledged. A record
//! therefore never points at bytes that a crash could lose.
//!
//! Reclaiming: each pack counts its referenced entries. An entry whose record is removed
//! (forget, the training-sample cap) has its bytes punched out of the file at once
//! (`fallocate(PUNCH_HOLE)`, zeros written where the file system cannot punch), so a forgotten
//! person's images do not stay on disk; a pack with no entry left is deleted. After a crash,
//! bytes appended but never referenced (their delivery was not acknowledged and comes back) are
//! found when the state folder is opened: everything between referenced entries is punched out,
//! packs with none are deleted, and writing resumes in a new pack (packs are never appended to
//! after a restart).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where a sample's image bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
    /// CRC-32 (IEEE) of the bytes, checked on every read.
    pub crc: u32,
}

/// Size after which writing moves on to a new pack.
pub const PACK_MAX_BYTES: u64 = 256 << 20;

/// The folder's name inside the state folder.
pub const PACKS_DIR: &str = "packs";

fn pack_name(n: u32) -> String {
    format!("pack-{n:08}")
}

fn pack_number(name: &str) -> Option<u32> {
    name.strip_prefix("pack-")?.parse().ok()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every holder leaves the state consistent between statements; a panic elsewhere must not
    // make the store unusable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Writer {
    pack: u32,
    file: Arc<File>,
    end: u64,
}

/// The pack files of a state folder.
pub struct Packs {
    dir: PathBuf,
    max_bytes: u64,
    writer: Mutex<Writer>,
    /// Held by the one caller running `fdatasync`; the others wait and then find their bytes
    /// synced.
    syncing: Mutex<()>,
    /// (pack, end) known durable.
    synced: Mutex<(u32, u64)>,
    /// Open handles (read and write) of the packs read or released so far.
    handles: Mutex<HashMap<u32, Arc<File>>>,
    /// Referenced entries per pack.
    live: Mutex<HashMap<u32, u64>>,
}

/// What opening found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Packs deleted because no record referenced them.
    pub packs_deleted: u64,
    /// Unreferenced bytes punched out of the remaining packs (or truncated off their ends).
    pub orphan_bytes: u64,
}

impl Packs {
    /// Opens the packs under `state_dir`, given every reference the records hold: unreferenced
    /// bytes are reclaimed (see the module documentation) and a new pack is started.
    ///
    /// # Errors
    /// The folder cannot be read or written.
    pub fn open(
        state_dir: &Path,
        referenced: impl IntoIterator<Item = PackRef>,
        max_bytes: u64,
    ) -> io::Result<(Self, Recovered)> {
        let dir = state_dir.join(PACKS_DIR);
        std::fs::create_dir_all(&dir)?;
        let mut by_pack: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for r in referenced {
            by_pack
                .entry(r.pack)
                .or_default()
                .push((r.offset, r.offset + u64::from(r.len)));
        }
        let mut recovered = Recovered::default();
        let mut newest = 0u32;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let Some(n) = entry.file_name().to_str().and_then(pack_number) else {
                continue;
            };
            newest = newest.max(n);
            let path = entry.path();
            match by_pack.get_mut(&n) {
                None => {
                    std::fs::remove_file(&path)?;
                    recovered.packs_deleted += 1;
                }
                Some(ranges) => {
                    ranges.sort_unstable();
                    let file = OpenOptions::new().read(true).write(true).open(&path)?;
                    let size = file.metadata()?.len();
                    let mut at = 0u64;
                    for &(start, end) in ranges.iter() {
                        if start > at {
                            recovered.orphan_bytes += punch(&file, at, start - at)?;
                        }
                        at = at.max(end);
                    }
                    if size > at {
                        // The tail of the pack being written at a crash: never appended to again.
                        file.set_len(at)?;
                        file.sync_all()?;
                        recovered.orphan_bytes += size - at;
                    }
                }
            }
        }
        let live = by_pack.iter().map(|(&n, r)| (n, r.len() as u64)).collect();
        let pack = newest + 1;
        let file = create_pack(&dir, pack)?;
        Ok((
            Packs {
                dir,
                max_bytes: max_bytes.max(1),
                writer: Mutex::new(Writer {
                    pack,
                    file: Arc::new(file),
                    end: 0,
                }),
                syncing: Mutex::new(()),
                synced: Mutex::new((pack, 0)),
                handles: Mutex::new(HashMap::new()),
                live: Mutex::new(live),
            },
            recovered,
        ))
    }

    /// Appends `bytes` to the current pack (not yet durable: see [`Packs::sync_upto`]).
    ///
    /// # Errors
    /// The write failed (a full disk, say).
    pub fn append(&self, bytes: &[u8]) -> io::Result<PackRef> {
        let mut refs = self.append_all(&[bytes])?;
        refs.pop()
            .ok_or_else(|| io::Error::other("an append returned no reference"))
    }

    /// Appends every item, in order, to the current pack with one write (one per pack when the
    /// items fill it and writing moves on to the next): a delivery's images cost one system
    /// call, not one each. Not yet durable: see [`Packs::sync_upto`].
    ///
    /// # Errors
    /// A write failed (a full disk, say); what this call wrote before is never referenced and
    /// is written over or reclaimed like any orphan.
    pub fn append_all(&self, items: &[&[u8]]) -> io::Result<Vec<PackRef>> {
        let mut refs = Vec::with_capacity(items.len());
        let mut w = lock(&self.writer);
        // The bytes not yet written, which belong at `w.end` of the current pack.
        let mut run: Vec<u8> = Vec::with_capacity(items.iter().map(|b| b.len()).sum());
        for bytes in items {
            let len = u32::try_from(bytes.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image over 4 GiB"))?;
            let end = w.end + run.len() as u64;
            if end > 0 && end + u64::from(len) > self.max_bytes {
                // Everything in the full pack is made durable before moving on, so a reference
                // to an older pack never needs a sync.
                w.file.write_all_at(&run, w.end)?;
                w.end = end;
                run.clear();
                w.file.sync_data()?;
                let pack = w.pack + 1;
                let file = create_pack(&self.dir, pack)?;
                *w = Writer {
                    pack,
                    file: Arc::new(file),
                    end: 0,
                };
            }
            refs.push(PackRef {
                pack: w.pack,
                offset: w.end + run.len() as u64,
                len,
                crc: crc32fast::hash(bytes),
            });
            run.extend_from_slice(bytes);
        }
        // Written under the lock: a sync that covers `end` covers every byte before it.
        w.file.write_all_at(&run, w.end)?;
        w.end += run.len() as u64;
        drop(w);
        // Counted from the append, not the commit: a pack with an entry still on its way to
        // its record is never deleted under it.
        let mut live = lock(&self.live);
        for r in &refs {
            *live.entry(r.pack).or_default() += 1;
        }
        Ok(refs)
    }

    /// Makes every byte up to the end of `r` durable. Calls that arrive while another is
    /// syncing wait for it and return without a second sync when it covered them.
    ///
    /// # Errors
    /// `fdatasync` failed.
    pub fn sync_upto(&self, r: &PackRef) -> io::Result<()> {
        let want = (r.pack, r.offset + u64::from(r.len));
        let _one = lock(&self.syncing);
        if *lock(&self.synced) >= want {
            return Ok(());
        }
        let (file, pack, end) = {
            let w = lock(&self.writer);
            (w.file.clone(), w.pack, w.end)
        };
        if pack > r.pack {
            return Ok(()); // synced when the pack was closed
        }
        file.sync_data()?;
        *lock(&self.synced) = (pack, end);
        Ok(())
    }

    /// The bytes `r` points at, checked against its CRC.
    ///
    /// # Errors
    /// The pack is missing or unreadable, or the bytes do not match the CRC.
    pub fn read(&self, r: &PackRef) -> io::Result<Vec<u8>> {
        let file = self.handle(r.pack)?;
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.offset)?;
        if crc32fast::hash(&buf) != r.crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "CRC mismatch in {} at offset {} ({} bytes)",
                    pack_name(r.pack),
                    r.offset,
                    r.len
                ),
            ));
        }
        Ok(buf)
    }

    /// The pack's open handle (opened once, for reading and punching).
    fn handle(&self, pack: u32) -> io::Result<Arc<File>> {
        let mut handles = lock(&self.handles);
        if let Some(f) = handles.get(&pack) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.dir.join(pack_name(pack)))?,
        );
        handles.insert(pack, f.clone());
        Ok(f)
    }

    /// Gives up bytes whose record was removed (or that will never get one): they are punched
    /// out of the pack, and a pack left without entries is deleted (the one being written
    /// excepted).
    ///
    /// # Errors
    /// The pack could not be written or removed.
    pub fn release(&self, r: &PackRef) -> io::Result<()> {
        let current = lock(&self.writer).pack;
        let empty = {
            let mut live = lock(&self.live);
            let n = live.entry(r.pack).or_default();
            *n = n.saturating_sub(1);
            let empty = *n == 0 && r.pack != current;
            if empty {
                live.remove(&r.pack);
            }
            empty
        };
        let path = self.dir.join(pack_name(r.pack));
        if empty {
            lock(&self.handles).remove(&r.pack);
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        match self.handle(r.pack) {
            Ok(file) => punch(&file, r.offset, u64::from(r.len)).map(|_| ()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn create_pack(dir: &Path, n: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(pack_name(n)))?;
    // The new name must survive a crash before any reference to it does.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Frees `len` bytes at `offset` (they read as zeros afterwards); where the file system cannot
/// punch holes, zeros are written over them. Returns `len`.
fn punch(file: &File, offset: u64, len: u64) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    if len == 0 {
        return Ok(0);
    }
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: a valid open descriptor and a byte range; fallocate touches nothing else.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
    }
    Ok(len)
}
